"""Benchmark: end-to-end `/predict` throughput versus the backbone's raw forward throughput.

A real Label Studio serves N photo-sized JPEG uploads (640-1024 px, quality 90). For each
backbone (random init: speed does not depend on the weights) our backend runs in this process
with LABEL_STUDIO_URL and a token, so it downloads every image from Label Studio, and one
`/predict` carrying all N tasks (as Label Studio's API lists them) is timed. The reference is the
served runtime's forward pass on random tensors at the server's batch size and threads (eager
PyTorch alongside). A small *Retrieve Predictions* through Label Studio measures its own
per-task overhead, which with ours gives the most tasks one click can take within Label Studio's
100 s timeout. Single-threaded download and decode+transform timings, and optionally a py-spy
profile of the /predict run, explain the gap. Appends a dated section to docs/benchmarks.md
unless --no-record.

    .venv/bin/python bench/bulk_predict.py --tasks 512 --profile
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from _common import append_section, machine, publish_random_model
from _stack import PredictLog, Stack, backend, download_all, label_studio, make_photos, quiet_logs

from labelloop.ml.images import decode_image
from labelloop.runtime.inference import build_runner
from labelloop.runtime.predictor import LoadedModel
from labelloop.serve.settings import ServeSettings
from labelloop.store import load_bundle

RETRIEVE_LIMIT_S = 100.0  # Label Studio's timeout on the one /predict of Retrieve Predictions
BATCH = int(ServeSettings.model_fields["batch_size"].default)


@dataclass
class Result:
    backbone: str
    runner: str
    raw_ips: float  # served runtime, random tensors
    eager_ips: float  # eager PyTorch, random tensors
    predict_s: float
    predict_forward_s: float
    tasks: int
    predicted: int
    ls_overhead_s: float  # Label Studio's own seconds per task in Retrieve Predictions
    retrieve_tasks: int
    download_ms: float
    decode_ms: float

    @property
    def predict_ips(self) -> float:
        return self.tasks / self.predict_s

    @property
    def ratio(self) -> float:
        return self.predict_ips / self.raw_ips

    @property
    def per_task_s(self) -> float:
        return self.predict_s / self.tasks + self.ls_overhead_s

    @property
    def max_tasks(self) -> int:
        return int(RETRIEVE_LIMIT_S / self.per_task_s)


def forward_ips(runner, image_px: int, images: int) -> float:
    batch = torch.randn(BATCH, 3, image_px, image_px)
    for _ in range(2):
        runner(batch)
    steps = max(1, images // BATCH)
    started = time.perf_counter()
    for _ in range(steps):
        runner(batch)
    return steps * BATCH / (time.perf_counter() - started)


def post_predict(url: str, body: dict) -> tuple[list, float]:
    with httpx.Client(timeout=3600) as http:
        started = time.perf_counter()
        reply = http.post(f"{url}/predict", json=body)
        seconds = time.perf_counter() - started
    reply.raise_for_status()
    return reply.json()["results"], seconds


class Profiler:
    """py-spy sampling this whole process (every thread) while a block runs."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Profiler:
        self.proc = subprocess.Popen(
            [str(_py_spy()), "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", "50"]
            + ["--output", str(self.out), "--nonblocking", "--threads"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # let it attach before the timed work starts
        return self

    def __exit__(self, *_: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(2)  # SIGINT: py-spy writes what it has
        self.proc.wait(timeout=60)

    def summary(self, top: int = 8) -> list[tuple[str, float]]:
        """Share of busy samples by activity, judged from the innermost labelloop-relevant
        frame of each stack; idle waits (locks, queues, sleeping event loops) are left out."""
        buckets: collections.Counter[str] = collections.Counter()
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            buckets[_classify(frames)] += int(count)
        buckets.pop("idle", None)
        busy = sum(buckets.values()) or 1
        return [(name, n / busy) for name, n in buckets.most_common(top)]


def _py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).is_file():
        print("py-spy is not installed (.venv/bin/pip install py-spy): no profile")
        return None
    return found


_CATEGORIES = (
    ("forward (ONNX Runtime)", ("onnxruntime",)),
    ("forward (PyTorch)", ("torch/nn/modules",)),
    ("JPEG decode", ("PIL/ImageFile.py", "decode_image", "PIL/Image.py")),
    ("transform (resize, crop, normalise)", ("torchvision/transforms",)),
    ("download (httpx, sockets)", ("httpx", "httpcore", "ssl.py", "socket.py")),
    ("image cache write/read", ("DiskCache",)),
    ("request/response JSON, validation", ("pydantic", "json/", "fastapi", "starlette")),
    ("build and validate results", ("build_predictions", "validate_prediction")),
)
_IDLE = ("wait (threading.py", "_worker (concurrent", "select (", "_run_once", "sleep")


def _classify(frames: list[str]) -> str:
    leaf = frames[-1]
    if any(marker in leaf for marker in _IDLE) or "acquire" in leaf or "wait" in leaf:
        return "idle"
    for frame in reversed(frames):
        for name, markers in _CATEGORIES:
            if any(m in frame for m in markers):
                return name
    return "other Python"


def measure(
    stack: Stack,
    root: Path,
    backbone: str,
    args: argparse.Namespace,
    tasks: list[dict],
    retrieve_photos: list[Path],
) -> tuple[Result, list[tuple[str, float]]]:
    model_dir = root / f"model-{backbone}"
    publish_random_model(model_dir, args.input_px, backbone)
    bundle = load_bundle(model_dir)
    served = build_runner(bundle.model, image_size=args.input_px, runtime=args.runtime)
    raw = forward_ips(served, args.input_px, args.forward_images)
    eager = forward_ips(
        build_runner(bundle.model, image_size=args.input_px, runtime="torch"),
        args.input_px,
        args.forward_images,
    )
    print(f"{backbone}: raw forward {raw:.1f} img/s on {served.name}, eager torch {eager:.1f}")

    # What each stage costs alone, one image at a time, on a sample of the same uploads.
    sample = [t["data"]["image"] for t in tasks[: args.sample]]
    bodies, download_s = download_all(stack.ls, sample)
    loaded = LoadedModel.from_bundle(bundle, runtime="torch")
    started = time.perf_counter()
    for body in bodies:
        loaded.transform(decode_image(body, min_side=loaded.decode_side))
    decode_s = time.perf_counter() - started

    profile: list[tuple[str, float]] = []
    log = PredictLog()
    with log.attached(), backend(model_dir, stack.ls, runtime=args.runtime) as url:
        body = stack.predict_body("bulk", tasks)
        if args.profile and backbone == args.backbones[0] and _py_spy() is not None:
            profiler = Profiler(root / f"profile-{backbone}.txt")
            with profiler:
                results, predict_s = post_predict(url, body)
            profile = profiler.summary()
        else:
            results, predict_s = post_predict(url, body)
        predicted = sum(1 for r in results if r)
        if len(results) != len(tasks) or predicted < len(tasks):
            raise RuntimeError(f"{predicted}/{len(tasks)} tasks predicted ({len(results)} items)")
        forward_s = log.runs[-1]["forward"]
        print(f"{backbone}: /predict {len(tasks)} tasks in {predict_s:.1f} s on {log.runner}")

        # Label Studio's own share of Retrieve Predictions: its wall time minus our /predict.
        pid = stack.project(f"retrieve {backbone}", retrieve_photos)
        stack.client.connect_ml_backend(pid, url, title=f"bench {backbone}", timeout_s=100)
        runs_before = len(log.runs)
        started = time.perf_counter()
        stack.client.retrieve_predictions(pid)
        retrieve_s = time.perf_counter() - started
        ours = sum(r["seconds"] for r in log.runs[runs_before:])
        stored = len(stack.client.predictions(project_id=pid))
        if stored != len(retrieve_photos):
            raise RuntimeError(f"Retrieve Predictions stored {stored}/{len(retrieve_photos)}")
    n = len(retrieve_photos)
    result = Result(
        backbone=backbone,
        runner=log.runner or served.name,
        raw_ips=raw,
        eager_ips=eager,
        predict_s=predict_s,
        predict_forward_s=forward_s,
        tasks=len(tasks),
        predicted=predicted,
        ls_overhead_s=max(retrieve_s - ours, 0.0) / n,
        retrieve_tasks=n,
        download_ms=download_s / len(bodies) * 1000,
        decode_ms=decode_s / len(bodies) * 1000,
    )
    return result, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=512, help="tasks in the timed /predict")
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--input-px", type=int, default=224, help="model input side")
    parser.add_argument("--min-px", type=int, default=640)
    parser.add_argument("--max-px", type=int, default=1024)
    parser.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "torch"])
    parser.add_argument("--retrieve-tasks", type=int, default=64, help="Retrieve Predictions size")
    parser.add_argument("--forward-images", type=int, default=256, help="raw forward images")
    parser.add_argument("--sample", type=int, default=64, help="images timed stage by stage")
    parser.add_argument("--profile", action="store_true", help="py-spy the first backbone's run")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/")
    args = parser.parse_args()
    quiet_logs()
    results: list[Result] = []
    profile: list[tuple[str, float]] = []
    photo_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = make_photos(root / "photos", args.tasks, min_px=args.min_px, max_px=args.max_px)
        photo_bytes = sum(p.stat().st_size for p in photos)
        with label_studio(root) as stack:
            stack.project("bulk", photos)
            tasks = stack.tasks("bulk")
            for backbone in args.backbones:
                result, first_profile = measure(
                    stack, root, backbone, args, tasks, photos[: args.retrieve_tasks]
                )
                profile = profile or first_profile
                results.append(result)
    print()
    print(table(results))
    if profile:
        print("\nprofile of the first /predict (share of busy samples):")
        for name, share in profile:
            print(f"  {share:6.1%}  {name}")
    if not args.no_record:
        record(results, profile, args, photo_bytes / max(args.tasks, 1) / 1024)


def table(results: list[Result]) -> str:
    lines = [
        "| backbone | runtime | raw forward | eager torch | `/predict` end to end | "
        "/predict ÷ raw | per task: ours + Label Studio | max tasks in 100 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.backbone} | {r.runner} | {r.raw_ips:.1f} img/s | {r.eager_ips:.1f} img/s | "
            f"{r.predict_ips:.1f} tasks/s ({r.tasks} in {r.predict_s:.1f} s) | "
            f"**{r.ratio:.2f}** | {r.predict_s / r.tasks * 1000:.0f} + "
            f"{r.ls_overhead_s * 1000:.0f} ms | **{r.max_tasks}** |"
        )
    lines += [
        "",
        "| backbone | forward in /predict | download alone | decode+transform alone |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.backbone} | {r.predict_forward_s / r.tasks * 1000:.1f} ms/task "
            f"({r.predict_forward_s / r.predict_s:.0%} of the wall time) | "
            f"{r.download_ms:.1f} ms/image | {r.decode_ms:.1f} ms/image |"
        )
    return "\n".join(lines)


def record(
    results: list[Result],
    profile: list[tuple[str, float]],
    args: argparse.Namespace,
    mean_kib: float,
) -> None:
    text = [
        f"\n## Bulk predict: `/predict` vs raw forward, {dt.date.today()}\n",
        f"Machine: {machine()}. {args.tasks} JPEG uploads ({args.min_px}-{args.max_px} px, "
        f"quality 90, {mean_kib:.0f} KiB on average) in Label Studio 1.23.2 on the same "
        f"machine; models at {args.input_px} px, batch {BATCH}, runtime `{args.runtime}`. "
        "*Raw forward*: the served runtime on random tensors. `/predict`: one request with every "
        "task, images downloaded from Label Studio with the token. *Label Studio* per task: "
        f"*Retrieve Predictions* over {args.retrieve_tasks} tasks minus our `/predict` time. "
        "Target: /predict ÷ raw ≥ 0.8.\n",
        table(results),
        "",
        "Download and decode+transform are timed one image at a time on "
        f"{args.sample} of the uploads, with nothing else running; in `/predict` they run on "
        "the fetch threads next to the forward passes and to Label Studio serving the files, "
        "all on the same cores.",
    ]
    if profile:
        text += [
            "",
            f"py-spy over the {results[0].backbone} `/predict` (all threads, busy samples):",
            "",
            *[f"- {share:.0%} {name}" for name, share in profile],
        ]
    append_section("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
