"""Benchmark: the loop itself, on real photos. Does every batch of annotations make the *served*
model better?

labelloop.realdata's benchmark (Fashion-MNIST items and grass / gravel patches on brick photos;
train and test from disjoint source photos). Annotations arrive in batches of 10 in a fixed
order, each as the ledger records a webhook. After each batch the trainer does what
`labelloop serve` does (loop/trainer.py `queue_due_jobs`: a fast update after 10 changes, a full
fine-tune when the labels grew by 25 % and 30), runs the queued jobs to the end, and the served
version's test macro-F1 on the fixed test set is recorded, with every candidate's.

Scenarios: `cold` (empty model folder: the cold-start backbone, MobileNetV2 with ImageNet
features offline) and `weak` (a starter model trained offline by `labelloop train` on a few
other images). Runs on demand, not in the tests:

    .venv/bin/python bench/learning_loop.py --scenario cold --max-labels 600
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _common import append_section, machine

from labelloop.config import TrainConfig
from labelloop.labelstudio.annotations import AnnotationRecord
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.urls import FetchSettings
from labelloop.loop.gate import macro_f1
from labelloop.loop.ledger import Ledger
from labelloop.loop.trainer import Trainer
from labelloop.loop.updates import TrainerSettings
from labelloop.ml.embeddings import EmbeddingCache, embed_images
from labelloop.ml.head import head_of, predict_features
from labelloop.realdata import build_realdata, fashion_mnist_dir, load_fashion_mnist
from labelloop.runtime.projects import ProjectModels
from labelloop.store import ModelStore, load_bundle
from labelloop.training.offline import DataSource, TrainOptions, run_training

PROJECT = 1
BATCH = 10
DEFAULTS = TrainerSettings()


@dataclass
class Step:
    labels: int
    served: str
    served_f1: float
    jobs: list[str]
    seconds: float


def label_config(groups: dict[str, tuple[str, ...]]) -> str:
    controls = "".join(
        f'<Choices name="{g}" toName="image" choice="multiple">'
        + "".join(f'<Choice value="{c}"/>' for c in classes)
        + "</Choices>"
        for g, classes in groups.items()
    )
    return f'<View><Image name="image" value="$image"/>{controls}</View>'


def test_f1(store: ModelStore, version: str, test_pairs, y_test, cache: EmbeddingCache) -> float:
    """Test macro-F1 of a stored version: its features (cached per backbone) through its head."""
    bundle = load_bundle(store.version_dir(version))
    features, failed = embed_images(bundle, test_pairs, cache)
    assert not failed, failed
    probs = predict_features(features, head_of(bundle.model))
    return macro_f1(y_test, probs >= np.asarray(bundle.thresholds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("cold", "weak"), default="cold")
    parser.add_argument("--max-labels", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--image-px", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weak-n", type=int, default=60, help="offline images of the starter")
    parser.add_argument("--no-full", action="store_true", help="fast updates only")
    parser.add_argument("--cache", type=Path, default=None, help="Fashion-MNIST cache folder")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/")
    parser.add_argument(
        "--deadline-min",
        type=float,
        default=None,
        help="stop before the next batch once this many minutes have passed, and record the "
        "table of what was measured (full updates take minutes each on a busy 2-core machine)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool = load_fashion_mnist(fashion_mnist_dir(args.cache))
        data = build_realdata(
            root / "data",
            pool,
            n_train=args.max_labels,
            n_test=args.n_test,
            seed=args.seed,
            size=args.image_px,
        )
        groups = {g: tuple(c) for g, c in data.groups.items()}
        truth = data.train.labels()
        names = sorted(truth)[: args.max_labels]
        test_labels = data.test.labels()
        test_names = sorted(test_labels)
        classes = [c for cs in groups.values() for c in cs]
        y_test = np.array(
            [[c in sum(test_labels[n].values(), []) for c in classes] for n in test_names]
        )
        test_pairs = [(n, (data.test.images_dir / n).read_bytes()) for n in test_names]

        model_dir = root / "model"
        if args.scenario == "weak":
            # A starter from a few images of other photos (a different seed).
            offline = build_realdata(
                root / "offline",
                pool,
                n_train=args.weak_n,
                n_test=1,
                seed=args.seed + 100,
                size=args.image_px,
            )
            config = TrainConfig().with_overrides(
                {
                    "data": {"classes": {g: list(c) for g, c in groups.items()}},
                    "optim": {"epochs": 5, "patience": 2},
                }
            )
            run_training(
                config,
                DataSource(images=offline.train.images_dir, metadata=offline.train.metadata_csv),
                TrainOptions(model_dir=model_dir, show_progress=False),
            )
        else:
            model_dir.mkdir()
        ledger = Ledger(model_dir / "ledger.sqlite3")
        ledger.set_label_config(PROJECT, label_config(groups))
        models = ProjectModels(model_dir, runtime="torch")
        base_store, store = ModelStore(model_dir), models.store(PROJECT)
        cache = EmbeddingCache(root / "embeddings.sqlite3")
        fetcher = ImageFetcher(
            FetchSettings(label_studio_url="http://127.0.0.1:1", document_root=data.train.root),
            None,
        )
        settings = TrainerSettings(
            auto_train_after=BATCH,
            quiet_seconds=1e9,
            auto_full=not args.no_full,
            keep_rejected=10_000,
        )
        trainer = Trainer(
            models=models,
            ledger=ledger,
            fetcher=lambda: fetcher,
            embeddings=cache,
            settings=settings,
        )
        steps: list[Step] = []
        candidates: list[tuple[int, str, bool, float, float]] = []
        f1_of: dict[str, float] = {}

        def score(version: str) -> float:
            if version not in f1_of:
                lineage = store if version in store.versions() else base_store
                f1_of[version] = test_f1(lineage, version, test_pairs, y_test, cache)
            return f1_of[version]

        started_all = time.perf_counter()
        stopped = None
        for start in range(0, len(names), BATCH):
            if args.deadline_min is not None and time.perf_counter() - started_all > (
                args.deadline_min * 60
            ):
                stopped = start
                print(f"deadline: stopping at {start} labels", flush=True)
                break
            batch = names[start : start + BATCH]
            ledger.upsert(
                [
                    AnnotationRecord(
                        project_id=PROJECT,
                        annotation_id=10_000 + start + i,
                        task_id=1 + start + i,
                        image_ref=f"/data/local-files/?d=images/{name}",
                        labels={g: tuple(v) for g, v in truth[name].items()},
                        updated_at="2026-12-01T00:00:00Z",
                        was_cancelled=False,
                        ground_truth=False,
                        completed_by=1,
                    )
                    for i, name in enumerate(batch)
                ]
            )
            t0 = time.perf_counter()
            served_model = models.serving(PROJECT)
            before = served_model.version if served_model else None
            trainer.queue_due_jobs()
            kinds = []
            for job in ledger.pending_jobs():
                done = trainer.run(job)
                kinds.append(f"{done.kind}:{done.state}")
                if done.candidate_version:
                    cand = score(done.candidate_version)
                    prev = score(before) if before else 0.0
                    candidates.append(
                        (start + len(batch), done.kind, done.state == "succeeded", cand, prev)
                    )
                    if done.state == "succeeded":
                        before = done.promoted_version
            served_model = models.serving(PROJECT)
            served = served_model.version if served_model else "untrained"
            f1 = score(served) if served_model else 0.0
            steps.append(Step(start + len(batch), served, f1, kinds, time.perf_counter() - t0))
            worse = sum(1 for c in candidates if c[2] and c[3] < c[4] - 0.01)
            print(
                f"{start + len(batch):>4} labels  served {served:<24} test macro-F1 {f1:.3f}  "
                f"{' '.join(kinds):<40} {steps[-1].seconds:6.1f} s  (promoted worse so far: "
                f"{worse})",
                flush=True,
            )
        total = time.perf_counter() - started_all
        fetcher.close()
        cache.close()
        ledger.close()

    table = render(args, steps, candidates, total, stopped)
    print("\n" + table)
    if not args.no_record:
        append_section(table)


def render(args, steps: list[Step], candidates, total: float, stopped: int | None) -> str:
    at = {s.labels: s for s in steps}

    def shown(rows):
        return [(n, kind, round(cand, 3), round(prev, 3)) for n, kind, _, cand, prev in rows]

    worse_promoted = shown([c for c in candidates if c[2] and c[3] < c[4] - 0.01])
    better_rejected = shown([c for c in candidates if not c[2] and c[3] > c[4] + 0.02])
    lines = [
        f"\n## The loop on real photos ({args.scenario} start), {dt.date.today()}\n",
        f"Machine: {machine()}. `bench/learning_loop.py --scenario {args.scenario}`: "
        f"labelloop.realdata ({args.image_px} px, seed {args.seed}), {args.n_test} fixed test "
        "images from disjoint source photos; annotations in batches of 10; after each batch "
        "the trainer's own schedule (fast update per 10 changes"
        + (
            ""
            if args.no_full
            else f", full fine-tune at +{DEFAULTS.full_growth:.0%} and +{DEFAULTS.full_min_new} "
            f"labels, {DEFAULTS.full_epochs} epochs at most"
        )
        + f"); total {total / 60:.1f} min"
        + (
            f", stopped by --deadline-min {args.deadline_min:g} at {stopped} of "
            f"{args.max_labels} labels"
            if stopped is not None
            else ""
        )
        + ".\n",
        "| labels | served test macro-F1 | jobs after this batch |",
        "|---|---|---|",
    ]
    last = steps[-1].labels if steps else None
    for n in sorted({10, 20, 30, 50, 100, 150, 200, 250, 300, 400, 500, 600} | {last or 10}):
        if n in at:
            s = at[n]
            lines.append(f"| {n} | {s.served_f1:.3f} | {' '.join(s.jobs) or '-'} |")
    lines += [
        "",
        f"Candidates: {len(candidates)}, promoted {sum(c[2] for c in candidates)}. "
        f"Promoted but worse than the version they replaced by more than 0.01 test macro-F1: "
        f"{len(worse_promoted)} {worse_promoted}. "
        f"Rejected but better by more than 0.02: {len(better_rejected)} {better_rejected}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
