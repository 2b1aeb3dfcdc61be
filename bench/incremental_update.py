"""Benchmark: time from the N-th annotation to a new version being served (fast update).

Builds a ResNet18 model (random init: speed does not depend on the weights), N demo images
served from a local-files document root, a ledger holding N annotations, and times a fast update
from request to the model swap, with the embedding cache cold and then warm (one annotation
added). Appends a dated section to docs/benchmarks.md.

    .venv/bin/python bench/incremental_update.py --sizes 100 1000
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import tempfile
import time
from pathlib import Path

from _common import append_section, machine, publish_random_model

from labelloop.dev.demo import LABEL_GROUPS, generate_demo_dataset
from labelloop.labelstudio.annotations import AnnotationRecord
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.urls import FetchSettings
from labelloop.loop.ledger import Ledger
from labelloop.loop.trainer import Trainer, TrainerSettings
from labelloop.ml.embeddings import EmbeddingCache
from labelloop.runtime.projects import ProjectModels

PROJECT = 1


def config_xml() -> str:
    parts = ['<View><Image name="image" value="$image"/>']
    for group, names in LABEL_GROUPS.items():
        choices = "".join(f'<Choice value="{n}"/>' for n in names)
        parts.append(
            f'<Choices name="{group}" toName="image" choice="multiple">{choices}</Choices>'
        )
    return "".join(parts) + "</View>"


def records(data_dir: Path, n: int) -> list[AnnotationRecord]:
    with (data_dir / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:n]
    return [
        AnnotationRecord(
            PROJECT,
            10_000 + i,
            1 + i,
            f"/data/local-files/?d=images/{row['image_id']}",
            {g: tuple(x for x in row[g].split(";") if x) for g in LABEL_GROUPS},
            f"2026-11-25T00:00:00.{i:06d}Z",
            False,
            False,
            1,
        )
        for i, row in enumerate(rows)
    ]


def time_update(trainer: Trainer, ledger: Ledger, models: ProjectModels) -> tuple[float, float]:
    """Seconds from request to the new version served, and of them the label review's."""
    before = models.serving(PROJECT).version
    started = time.perf_counter()
    [job] = trainer.request(PROJECT, ["fast"], "start_training")
    while (state := ledger.job(job.id).state) in ("queued", "running"):
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    served = models.serving(PROJECT).version
    if state != "succeeded" or served == before:
        raise RuntimeError(f"job ended {state}: {ledger.job(job.id).error}")
    review = (ledger.job(job.id).metrics or {}).get("review") or {}
    return elapsed, float(review.get("seconds", 0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--image-px", type=int, default=256, help="demo image side")
    parser.add_argument("--input-px", type=int, default=224, help="model input side")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate_demo_dataset(root / "data", n=max(args.sizes) + 1, size=args.image_px)
        for n in args.sizes:
            model_dir = root / f"model-{n}"
            publish_random_model(model_dir, args.input_px)
            models = ProjectModels(model_dir)
            ledger = Ledger(model_dir / "ledger.sqlite3")
            ledger.set_label_config(PROJECT, config_xml())
            ledger.upsert(records(data.root, n))
            fetcher = ImageFetcher(
                FetchSettings("http://127.0.0.1:1", document_root=data.root), None
            )
            trainer = Trainer(
                models=models,
                ledger=ledger,
                fetcher=lambda f=fetcher: f,
                embeddings=EmbeddingCache(model_dir / "emb.sqlite3"),
                settings=TrainerSettings(
                    poll_seconds=0.01, tolerance=1.0, auto_train_after=10**9, quiet_seconds=10**9
                ),
            )
            trainer.start()
            try:
                cold, _ = time_update(trainer, ledger, models)
                ledger.upsert(records(data.root, n + 1)[-1:])  # the (N+1)-th annotation
                warm, review = time_update(trainer, ledger, models)
            finally:
                trainer.stop()
                fetcher.close()
                ledger.close()
            rows.append((n, cold, warm, review))
            print(
                f"{n:>5} labelled images: cold cache {cold:6.2f} s, warm cache {warm:6.2f} s "
                f"(label review {review:.2f} s)"
            )
    if not args.no_record:
        record(rows, args)


def record(rows: list[tuple[int, float, float, float]], args: argparse.Namespace) -> None:
    append_section(
        "\n".join(
            [
                f"\n## Annotation → new version served (fast update), {dt.date.today()}\n",
                f"Machine: {machine()}. ResNet18 at {args.input_px} px, demo images "
                f"{args.image_px} px PNG read from a local-files root. Time from queuing the "
                "job to the new model being served: fetch, embed (cold: every image; warm: "
                "the new one), head refit, threshold tuning, held-out comparison, the label "
                "review the version keeps for the project's page, publish, swap.\n",
                "| labelled images | cold embedding cache | warm embedding cache | of it, the "
                "label review |",
                "|---|---|---|---|",
                *[
                    f"| {n} | {cold:.2f} s | {warm:.2f} s | {review:.2f} s ({review / warm:.0%}) |"
                    for n, cold, warm, review in rows
                ],
                "",
            ]
        )
    )


if __name__ == "__main__":
    main()
