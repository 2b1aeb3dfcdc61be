"""Benchmark: `/predict` latency for one task versus raw batch-1 forward plus the image download.

A real Label Studio serves photo-sized JPEG uploads (640-1024 px, quality 90); our backend runs
in this process with LABEL_STUDIO_URL and a token, as `labelloop serve` would. Each of N
sequential `/predict` requests carries one different task, as when an annotator opens a task
with no prediction. The reference for each is what it cannot avoid: a plain GET of the same image
from Label Studio (httpx, keep-alive) plus the served runtime's batch-1 forward on a random
tensor (median). Appends a dated section to docs/benchmarks.md unless --no-record.

    .venv/bin/python bench/single_task.py --requests 50
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _common import append_section, machine, publish_random_model
from _stack import backend, label_studio, make_photos, percentile, quiet_logs

from labelloop.runtime.inference import build_runner
from labelloop.store import load_bundle

WARMUP = 3  # first requests pay one-off costs (connection pools, allocator); not timed


def forward_ms(runner, image_px: int, repeats: int) -> float:
    one = torch.randn(1, 3, image_px, image_px)
    for _ in range(WARMUP):
        runner(one)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner(one)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-px", type=int, default=224)
    parser.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "torch"])
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/")
    args = parser.parse_args()
    quiet_logs()
    predict_ms: list[float] = []
    download_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = make_photos(root / "photos", args.requests + WARMUP)
        model_dir = root / "model"
        publish_random_model(model_dir, args.input_px, args.backbone)
        runner = build_runner(
            load_bundle(model_dir).model, image_size=args.input_px, runtime=args.runtime
        )
        fwd_ms = forward_ms(runner, args.input_px, args.requests)
        with label_studio(root) as stack:
            stack.project("single", photos)
            tasks = stack.tasks("single")
            with (
                backend(model_dir, stack.ls, runtime=args.runtime) as url,
                httpx.Client(timeout=60) as http,
                httpx.Client(
                    base_url=stack.ls.url,
                    headers={"Authorization": f"Token {stack.ls.token}"},
                    timeout=60,
                ) as images,
            ):
                for i, task in enumerate(tasks):
                    body = stack.predict_body("single", [task])
                    started = time.perf_counter()
                    reply = http.post(f"{url}/predict", json=body)
                    elapsed = (time.perf_counter() - started) * 1000
                    reply.raise_for_status()
                    if not reply.json()["results"][0]:
                        raise RuntimeError(f"task {task['id']} got no prediction")
                    started = time.perf_counter()
                    images.get(task["data"]["image"]).raise_for_status()
                    fetched = (time.perf_counter() - started) * 1000
                    if i >= WARMUP:
                        predict_ms.append(elapsed)
                        download_ms.append(fetched)
    reference = [d + fwd_ms for d in download_ms]
    p50, p95 = percentile(predict_ms, 50), percentile(predict_ms, 95)
    ref50, ref95 = percentile(reference, 50), percentile(reference, 95)
    print(
        f"/predict, one task: p50 {p50:.0f} ms, p95 {p95:.0f} ms; download + forward "
        f"(batch 1 on {runner.name}: {fwd_ms:.0f} ms): p50 {ref50:.0f} ms, p95 {ref95:.0f} ms; "
        f"p50 ratio {p50 / ref50:.2f} (target ≤ 1.5)"
    )
    if not args.no_record:
        append_section(
            "\n".join(
                [
                    f"\n## Single task: `/predict` latency, {dt.date.today()}\n",
                    f"Machine: {machine()}. {args.requests} sequential `/predict` requests, one "
                    f"different task each (JPEG uploads, 640-1024 px, in Label Studio 1.23.2 on "
                    f"the same machine), {args.backbone} at {args.input_px} px on "
                    f"{runner.name}. Reference: a plain GET of the same image from Label Studio "
                    "plus the batch-1 forward on a random tensor. Target: p50 ratio ≤ 1.5.\n",
                    "| | p50 | p95 |",
                    "|---|---|---|",
                    f"| `/predict`, one task | {p50:.0f} ms | {p95:.0f} ms |",
                    f"| download + batch-1 forward ({fwd_ms:.0f} ms) | {ref50:.0f} ms | "
                    f"{ref95:.0f} ms |",
                    f"| ratio | **{p50 / ref50:.2f}** | {p95 / ref95:.2f} |",
                    "",
                ]
            )
        )


if __name__ == "__main__":
    main()
