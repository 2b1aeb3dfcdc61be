"""Benchmark: the distributed mode against the embedded one, in one run on this machine.

Starts a real PostgreSQL 15, SeaweedFS (S3) and Redis on 127.0.0.1 (the test suite's servers,
tests/postgres.py, tests/objectstore.py, tests/redisserver.py), one embedded `labelloop serve`
(SQLite ledger, versions in MODEL_DIR) and two distributed replicas (PostgreSQL, S3, Redis),
all serving the same model, and times:

* a webhook (one annotation, committed before the answer): embedded vs a replica;
* a one-task /predict (image from a local-files root): embedded vs a replica;
* a promotion (a new version published into a project's lineage in the store and `current`
  moved, what a worker does) until every replica serves it, at LABELLOOP_STORE_POLL_SECONDS 2
  (the default) and 0.5.

    .venv/bin/python bench/distributed.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import append_section, machine, publish_random_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from objectstore import SeaweedS3  # noqa: E402
from postgres import PostgresServer  # noqa: E402
from redisserver import RedisServer  # noqa: E402
from servers import BackendProcess  # noqa: E402

from labelloop.dev.demo import generate_demo_dataset  # noqa: E402
from labelloop.lineages import Lineages  # noqa: E402

PROJECT = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webhooks", type=int, default=200)
    parser.add_argument("--predicts", type=int, default=50)
    parser.add_argument("--promotions", type=int, default=5)
    parser.add_argument("--input-px", type=int, default=224)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        PostgresServer() as postgres,
        SeaweedS3() as s3,
    ):
        root = Path(tmp)
        redis = RedisServer(root / "redis")
        os.environ.update(s3.env())
        try:
            rows = run(root, postgres, s3, redis, args)
        finally:
            redis.close()
    text = report(rows, args)
    print(text)
    if not args.no_record:
        append_section(text)


def run(root: Path, postgres: Any, s3: Any, redis: RedisServer, args) -> dict[str, Any]:
    data = generate_demo_dataset(root / "data", n=16, size=256)
    config = data.label_config.read_text()
    images = sorted(data.images_dir.glob("*.png"))
    postgres.create_database("bench")
    store_url = s3.url("bench")
    embedded_dir = root / "embedded"
    publish_random_model(embedded_dir, args.input_px)
    publish_random_model(
        root / "seed",
        args.input_px,
        store=Lineages(root / "seed-cache", store_url=store_url).base(),
    )
    common = {
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(data.root),
        "LOG_LEVEL": "WARNING",
    }
    distributed = {
        **common,
        **s3.env(),
        "LABELLOOP_DATABASE_URL": postgres.url("bench"),
        "LABELLOOP_STORE_URL": store_url,
        "LABELLOOP_QUEUE_URL": redis.url,
    }
    rows: dict[str, Any] = {}
    embedded = BackendProcess(embedded_dir, root / "embedded.log", env=common)
    try:
        rows["webhook", "embedded"] = webhooks(embedded.url, config, images, args.webhooks, 0)
        rows["predict", "embedded"] = predicts(embedded.url, config, images, args.predicts)
    finally:
        embedded.stop()
    for poll in ("2", "0.5"):
        env = {**distributed, "LABELLOOP_STORE_POLL_SECONDS": poll}
        replicas = [
            BackendProcess(root / f"r{poll}-{i}", root / f"replica-{poll}-{i}.log", env=env)
            for i in (1, 2)
        ]
        try:
            if poll == "2":
                offset = 10 * args.webhooks
                rows["webhook", "replica"] = webhooks(
                    replicas[0].url, config, images, args.webhooks, offset
                )
                rows["predict", "replica"] = predicts(
                    replicas[0].url, config, images, args.predicts
                )
            rows["promotion", poll] = promotions(
                root, store_url, replicas, args.promotions, args.input_px
            )
        finally:
            for replica in replicas:
                replica.stop()
    return rows


def webhooks(url: str, config: str, images: list[Path], n: int, offset: int) -> list[float]:
    times = []
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            ref = f"/data/local-files/?d=images/{images[i % len(images)].name}"
            event = {
                "action": "ANNOTATION_CREATED",
                "project": {"id": PROJECT, "label_config": config},
                "annotation": {
                    "id": 1 + offset + i,
                    "task": 1 + offset + i,
                    "result": [
                        {
                            "from_name": "components",
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": ["bolt"]},
                        }
                    ],
                    "updated_at": "2026-12-02T00:00:00Z",
                },
                "task": {
                    "id": 1 + offset + i,
                    "data": {"image": ref},
                },
            }
            started = time.perf_counter()
            client.post(f"{url}/webhook", json=event).raise_for_status()
            times.append(time.perf_counter() - started)
    return times


def predicts(url: str, config: str, images: list[Path], n: int) -> list[float]:
    times = []
    with httpx.Client(timeout=60) as client:
        for i in range(n + 3):
            task = {
                "id": i + 1,
                "data": {"image": f"/data/local-files/?d=images/{images[i % len(images)].name}"},
            }
            body = {"tasks": [task], "label_config": config, "project": f"{PROJECT}.1"}
            started = time.perf_counter()
            client.post(f"{url}/predict", json=body).raise_for_status()
            if i >= 3:  # the first calls load the model and warm the image cache
                times.append(time.perf_counter() - started)
    return times


def promotions(
    root: Path, store_url: str, replicas: list[BackendProcess], n: int, input_px: int
) -> list[float]:
    """Seconds from `current` moved in the store until both replicas serve the version."""
    lineage = Lineages(root / f"writer-{time.monotonic_ns()}", store_url=store_url).project(PROJECT)
    times = []
    for _ in range(n):
        publish_random_model(root / "unused", input_px, store=lineage, make_current=False)
        version = lineage.versions()[-1]
        started = time.perf_counter()
        lineage.set_current(version, reason="promotion")
        pending = {r.url for r in replicas}
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for replica in replicas:
                if replica.url in pending:
                    served = httpx.get(
                        f"{replica.url}/versions", params={"project": PROJECT}, timeout=10
                    ).json()["served"]
                    if served == version:
                        pending.discard(replica.url)
            time.sleep(0.02)  # polling cadence of the measurement, not synchronisation
        if pending:
            raise RuntimeError(f"replicas {pending} did not serve {version} within 60 s")
        times.append(time.perf_counter() - started)
    return times


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
    return f"{1000 * statistics.median(values):.1f} / {1000 * p95:.1f}"


def report(rows: dict[str, Any], args) -> str:
    today = dt.date.today().isoformat()
    wh_e, wh_r = rows["webhook", "embedded"], rows["webhook", "replica"]
    pr_e, pr_r = rows["predict", "embedded"], rows["predict", "replica"]
    ratio_wh = statistics.median(wh_r) / statistics.median(wh_e)
    ratio_pr = statistics.median(pr_r) / statistics.median(pr_e)
    lines = [
        f"\n## Distributed mode vs embedded, {today}\n",
        f"Machine: {machine()}. `bench/distributed.py`: real PostgreSQL 15, SeaweedFS (S3) and "
        "Redis on 127.0.0.1, one embedded `labelloop serve` (SQLite ledger) and two replicas "
        f"(PostgreSQL ledger, versions in S3), ResNet18 at {args.input_px} px (random init; "
        "timings do not depend on the weights), images from a local-files root.\n",
        "| what | embedded (SQLite, MODEL_DIR) | replica (PostgreSQL, S3) | replica / embedded |",
        "|---|---|---|---|",
        f"| webhook, one annotation committed, median / p95 ms ({len(wh_e)} sequential) | "
        f"{_ms(wh_e)} | {_ms(wh_r)} | {ratio_wh:.2f}x |",
        f"| `/predict`, one task, median / p95 ms ({len(pr_e)} sequential, warm) | "
        f"{_ms(pr_e)} | {_ms(pr_r)} | {ratio_pr:.2f}x |",
        "",
        "Promotion in the store (`current` moved) until both replicas serve the new version "
        f"({args.promotions} promotions each, made the way a worker promotes: the version "
        "loaded and its ONNX graph uploaded before `current` moves; includes each replica's "
        "download into its cache, the checksum check and the load of the stored graph):\n",
        "| LABELLOOP_STORE_POLL_SECONDS | median s | max s |",
        "|---|---|---|",
    ]
    for poll in ("2", "0.5"):
        values = rows["promotion", poll]
        lines.append(f"| {poll} | {statistics.median(values):.2f} | {max(values):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
