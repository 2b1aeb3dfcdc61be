"""Benchmark: `/setup` and `/webhook` latency while the backend runs a full training job.

A real Label Studio holds N annotated photo-sized JPEG uploads; our backend runs as its own
process (`labelloop serve`'s app and uvicorn, so training competes with request handling exactly
as in production). Annotations reach the backend as Label Studio's webhooks; *Start Training*
(through Label Studio's API) queues a fast update and then the full fine-tune. While the full
job runs, this process sends `/setup` and `/webhook` requests like Label Studio's (a re-sent
ANNOTATION_UPDATED of a real annotation) and records their latency; the same requests with the
backend idle are the baseline. Label Studio gives `/setup` 3 s and webhooks 1 s. The whole
sequence runs once per training CPU priority (`--nice`; 0 is how training ran before it was
lowered), each with a fresh backend, so the comparison shares one machine state. Appends a dated
section to docs/benchmarks.md unless --no-record.

    .venv/bin/python bench/responsiveness.py --annotated 80
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _common import append_section, machine, publish_random_model
from _stack import Stack, label_studio, make_photos, percentile, quiet_logs

from labelloop.dev.demo import LABEL_GROUPS
from labelloop.dev.launcher import free_port

TARGET_MS = 100.0
INTERVAL_S = 0.05  # between requests: a busy Label Studio, far above what annotators cause

# The backend as `labelloop serve` builds and runs it, with knobs the CLI does not expose.
_SERVER = """
import logging, sys
import uvicorn
from labelloop.serve.app import build_app
from labelloop.serve.settings import settings_from
from labelloop.loop.updates import TrainerSettings
model_dir, port, epochs, nice = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
settings = settings_from({"model_dir": model_dir, "port": port, "refresh": False})
app = build_app(
    settings,
    TrainerSettings(
        auto_train_after=10**6,
        quiet_seconds=10**6,
        full_epochs=epochs,
        full_patience=epochs,
        train_nice=nice,
    ),
)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


@dataclass(frozen=True)
class Summary:
    phase: str
    route: str
    samples: list[float]

    def row(self) -> str:
        s = self.samples
        return (
            f"| {self.phase} | `{self.route}` | {len(s)} | {percentile(s, 50):.1f} ms | "
            f"{percentile(s, 95):.1f} ms | **{percentile(s, 99):.1f} ms** | {max(s):.1f} ms |"
        )


def start_backend(
    model_dir: Path, ls_url: str, token: str, epochs: int, nice: int, log: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_URL": ls_url,
        "LABEL_STUDIO_API_KEY": token,
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(model_dir), str(port), str(epochs), str(nice)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the backend exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the backend did not start within 180 s")


def random_result(rng: np.random.Generator) -> list[dict[str, Any]]:
    result = []
    for group, names in LABEL_GROUPS.items():
        chosen = [n for n in names if rng.random() < 0.35] or [str(rng.choice(list(names)))]
        result.append(
            {
                "from_name": group,
                "to_name": "image",
                "type": "choices",
                "value": {"choices": chosen},
            }
        )
    return result


def training(http: httpx.Client, url: str) -> dict[str, Any]:
    return http.get(f"{url}/metrics").json()["training"]


def probe(
    http: httpx.Client,
    url: str,
    setup_body: dict[str, Any],
    webhook_body: dict[str, Any],
    keep_going,
    max_s: float,
) -> tuple[list[float], list[float]]:
    """Alternate /setup and /webhook every INTERVAL_S while keep_going(); latencies in ms."""
    setup_ms: list[float] = []
    webhook_ms: list[float] = []
    deadline = time.monotonic() + max_s
    while keep_going() and time.monotonic() < deadline:
        for path, body, sink in (
            ("/setup", setup_body, setup_ms),
            ("/webhook", webhook_body, webhook_ms),
        ):
            started = time.perf_counter()
            reply = http.post(f"{url}{path}", json=body)
            sink.append((time.perf_counter() - started) * 1000)
            reply.raise_for_status()
            time.sleep(INTERVAL_S)
    return setup_ms, webhook_ms


@dataclass
class Run:
    nice: int
    idle: tuple[list[float], list[float]]
    busy: tuple[list[float], list[float]]
    full_s: float
    state: str


def measure(stack: Stack, root: Path, pid: int, nice: int, args: argparse.Namespace) -> Run:
    """A fresh backend (training at `nice`) connected to the annotated project; Start Training
    makes its fast update pull every annotation from Label Studio, then the full one runs."""
    model_dir = root / f"model-nice{nice}"
    publish_random_model(model_dir, args.input_px)
    proc, url = start_backend(
        model_dir, stack.ls.url, stack.ls.token, args.epochs, nice, root / f"backend{nice}.log"
    )
    try:
        ml = stack.client.connect_ml_backend(pid, url, title=f"bench {nice}", timeout_s=100)
        task = stack.client.get_task(stack.tasks("responsiveness")[0]["id"])
        webhook_body = {
            "action": "ANNOTATION_UPDATED",
            "annotation": task["annotations"][0],
            "task": task,
            "project": stack.client.get_project(pid),
        }
        setup_body = {
            "project": f"{pid}.{int(time.time())}",
            "schema": stack.config,
            "hostname": stack.ls.url,
            "access_token": stack.ls.token,
            "extra_params": None,
        }
        with httpx.Client(timeout=30) as http:
            idle = probe(http, url, setup_body, webhook_body, lambda: True, args.idle_s)
            stack.client.train(int(ml["id"]))
            full_started = None
            deadline = time.monotonic() + args.max_s
            while time.monotonic() < deadline:
                running = training(http, url)["running"]
                if running and running["kind"] == "full":
                    full_started = time.monotonic()
                    break
                time.sleep(0.2)
            if full_started is None:
                raise RuntimeError(f"the full update never started; see {root}/backend{nice}.log")

            def full_running() -> bool:
                running = training(http, url)["running"]
                return bool(running and running["kind"] == "full")

            busy = probe(http, url, setup_body, webhook_body, full_running, args.max_s)
            full_s = time.monotonic() - full_started
            full = next(j for j in training(http, url)["jobs"] if j["kind"] == "full")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return Run(nice, idle, busy, full_s, str(full["state"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotated", type=int, default=80, help="annotated tasks")
    parser.add_argument("--epochs", type=int, default=5, help="full update epochs (serve: 5)")
    parser.add_argument("--input-px", type=int, default=224)
    parser.add_argument(
        "--nice",
        type=int,
        nargs="+",
        default=[0, 10],
        help="training CPU priorities to compare (0: as before; 10: the default)",
    )
    parser.add_argument("--idle-s", type=float, default=15.0, help="baseline duration")
    parser.add_argument("--max-s", type=float, default=600.0, help="longest training probe")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/")
    args = parser.parse_args()
    quiet_logs()
    rng = np.random.default_rng(0)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = make_photos(root / "photos", args.annotated)
        with label_studio(root) as stack:
            pid = stack.project("responsiveness", photos)
            for task in stack.tasks("responsiveness"):
                stack.client.create_annotation(task["id"], random_result(rng))
            for nice in args.nice:
                runs.append(measure(stack, root, pid, nice, args))
    header = [
        "| backend | route | requests | p50 | p95 | p99 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for run in runs:
        rows += [
            Summary(f"idle (nice {run.nice} run)", "/setup", run.idle[0]).row(),
            Summary(f"idle (nice {run.nice} run)", "/webhook", run.idle[1]).row(),
            Summary(f"full training at nice {run.nice}", "/setup", run.busy[0]).row(),
            Summary(f"full training at nice {run.nice}", "/webhook", run.busy[1]).row(),
        ]
    table = "\n".join(header + rows)
    print(table)
    for run in runs:
        worst = max(percentile(run.busy[0], 99), percentile(run.busy[1], 99))
        print(
            f"nice {run.nice}: full update {run.state} in {run.full_s:.0f} s; worst p99 "
            f"{worst:.0f} ms (target ≤ {TARGET_MS:.0f} ms)"
        )
    if not args.no_record:
        durations = ", ".join(f"{r.full_s:.0f} s at nice {r.nice}" for r in runs)
        append_section(
            "\n".join(
                [
                    f"\n## Responsiveness during a full update, {dt.date.today()}\n",
                    f"Machine: {machine()}. Backend in its own process (`labelloop serve`'s app "
                    f"and uvicorn); {args.annotated} annotated JPEG uploads (640-1024 px) in "
                    f"Label Studio 1.23.2; *Start Training* runs a fast update, then a full "
                    f"fine-tune of ResNet18 at {args.input_px} px ({args.epochs} epochs; "
                    f"{durations}). Requests alternate every {INTERVAL_S * 1000:.0f} ms. The "
                    "fine-tune runs at the trainer's `train_nice` (10 by default; 0 is how it "
                    f"ran before). Target: p99 ≤ {TARGET_MS:.0f} ms.\n",
                    table,
                    "",
                ]
            )
        )


if __name__ == "__main__":
    main()
