"""Benchmark: does the label review (labelloop.loop.review) put wrong labels at the top?

Issue 18's measurement: 300 annotated labelloop.realdata images, 10 % of the labels flipped at
random; precision at 20 and at 50 of the ranked list (the share of flags that are really
flipped). Target: precision@20 >= 0.6.

"A wrong label" is one (image, class) entry flipped, present <-> absent, as an annotator who
ticks a wrong box or misses one makes it. The main reading, `per-image`: 10 % of the images
(30) each get one entry flipped, its class drawn uniformly. The other reading, `entries`: 10 %
of all image x class entries flipped (210 of 2100), so some images carry several.

Two feature sources, i.e. two model bundles handed to `review_project`:

* `imagenet`: the cold start's backbone (`resolve_backbone("auto", "imagenet")`, MobileNetV2
  with the ImageNet features shipped offline), what a project without a trained model has;
* `fine-tuned`: the same backbone after `labelloop train` on 600 *other* realdata images (seed
  100), as a model trained offline before the project; it never saw a reviewed image.

The review runs end to end through `review_project` (a ledger, a fetch callable, the embedding
cache); the three scorings are compared on the same out-of-fold probabilities. The fine-tuned
model and the embeddings are kept under --work, so a rerun takes a minute, not half an hour.
Runs on demand, not in the tests:

    nice -n 10 .venv/bin/python bench/label_review.py --record
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _common import REPO, machine

from labelloop.config import PreprocessConfig, TrainConfig
from labelloop.labels import LabelSpace
from labelloop.labelstudio.annotations import AnnotationRecord
from labelloop.loop.ledger import Ledger, TrainingExample
from labelloop.loop.review import (
    DEFAULT_FOLDS,
    DEFAULT_SCORING,
    SCORINGS,
    Flag,
    oof_probabilities,
    review_project,
    suspects,
)
from labelloop.ml.embeddings import EmbeddingCache, embed_images
from labelloop.ml.model import build_model, resolve_backbone
from labelloop.realdata import (
    ComponentPool,
    build_realdata,
    fashion_mnist_dir,
    load_fashion_mnist,
)
from labelloop.store import ModelBundle, ModelStore, load_bundle, manifest_for
from labelloop.training.offline import DataSource, TrainOptions, run_training

PROJECT = 1
READINGS = ("per-image", "entries")
FEATURES = ("imagenet", "fine-tuned")
KS = (20, 50)
# The offline model of the `fine-tuned` source: images, seed (other photos' crops and items
# than the reviewed seeds'), and epochs (validation mAP stops improving after about five).
OFFLINE_N = 600
OFFLINE_SEED = 100
OFFLINE_EPOCHS = 5


@dataclass(frozen=True)
class Outcome:
    features: str
    reading: str
    scoring: str
    seed: int
    n_flipped: int
    n_entries: int
    n_flagged: int
    hits: dict[int, int]  # k -> flipped entries among the first k flags

    def precision(self, k: int) -> float:
        # Out of k even when fewer were flagged: an empty slot finds no wrong label.
        return self.hits[k] / k

    def recall(self, k: int) -> float:
        return self.hits[k] / self.n_flipped


def flip(y: np.ndarray, reading: str, share: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of y with `share` of the images (one random class each) or of the entries
    flipped."""
    noisy = y.copy()
    n, n_classes = y.shape
    if reading == "per-image":
        rows = rng.choice(n, size=round(share * n), replace=False)
        cols = rng.integers(0, n_classes, size=len(rows))
    else:
        flat = rng.choice(n * n_classes, size=round(share * n * n_classes), replace=False)
        rows, cols = np.divmod(flat, n_classes)
    noisy[rows, cols] = 1.0 - noisy[rows, cols]
    return noisy


def fetch(example: TrainingExample) -> bytes | None:
    """The image of a task: the bench's image refs are file paths."""
    return Path(example.image_ref).read_bytes()


def imagenet_bundle(groups: dict[str, tuple[str, ...]]) -> ModelBundle:
    """The backbone a project without a model starts from, with a head over `groups`."""
    space = LabelSpace.from_mapping({g: list(c) for g, c in groups.items()})
    backbone = resolve_backbone("auto", "imagenet")
    model = build_model(backbone, len(space), weights="imagenet").eval()
    preprocess = PreprocessConfig(image_size=224)
    manifest = manifest_for(
        version="imagenet",
        backbone=backbone,
        dropout=0.0,
        label_space=space,
        preprocess=preprocess,
    )
    return ModelBundle(model, space, [0.5] * len(space), preprocess, manifest, Path("."))


def fine_tuned_bundle(work: Path, pool: ComponentPool, image_px: int) -> tuple[ModelBundle, str]:
    """`labelloop train` on other realdata images, trained once and kept under `work`; and
    how long that training took."""
    model_dir = work / f"model-{OFFLINE_N}-seed{OFFLINE_SEED}-{OFFLINE_EPOCHS}ep-{image_px}px"
    timing = model_dir / "bench-train-seconds.json"
    store = ModelStore(model_dir)
    if store.current_version() is None:
        t0 = time.perf_counter()
        offline = build_realdata(
            work / f"offline-{OFFLINE_SEED}",
            pool,
            n_train=OFFLINE_N,
            n_test=1,
            seed=OFFLINE_SEED,
            size=image_px,
        )
        config = TrainConfig().with_overrides(
            {
                "data": {"classes": {g: list(c) for g, c in offline.groups.items()}},
                "optim": {"epochs": OFFLINE_EPOCHS, "patience": 3},
            }
        )
        print(f"training the offline model ({OFFLINE_N} images, {OFFLINE_EPOCHS} epochs)...")
        run_training(
            config,
            DataSource(images=offline.train.images_dir, metadata=offline.train.metadata_csv),
            TrainOptions(model_dir=model_dir, show_progress=False),
        )
        timing.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    version = store.current_version()
    assert version is not None
    trained = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    took = f"{trained / 60:.0f} min" if trained is not None else "time not recorded"
    return load_bundle(store.version_dir(version)), took


def ledger_with(
    path: Path,
    label_config: str,
    images: Path,
    names: list[str],
    noisy: np.ndarray,
    groups: dict[str, tuple[str, ...]],
) -> Ledger:
    """A fresh ledger holding one annotation per image with the (noisy) labels."""
    path.unlink(missing_ok=True)
    ledger = Ledger(path)
    ledger.set_label_config(PROJECT, label_config)
    columns = [(g, c) for g, cs in groups.items() for c in cs]

    def labels(row: np.ndarray) -> dict[str, tuple[str, ...]]:
        on = [gc for gc, value in zip(columns, row, strict=True) if value]
        return {g: tuple(c for gg, c in on if gg == g) for g in groups}

    ledger.upsert(
        [
            AnnotationRecord(
                project_id=PROJECT,
                annotation_id=10_000 + i,
                task_id=1 + i,
                image_ref=str(images / name),
                labels=labels(noisy[i]),
                updated_at="2026-12-01T00:00:00Z",
                was_cancelled=False,
                ground_truth=False,
                completed_by=1,
            )
            for i, name in enumerate(names)
        ]
    )
    return ledger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--share", type=float, default=0.10, help="share of labels flipped")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-px", type=int, default=96)
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    parser.add_argument("--features", nargs="+", choices=FEATURES, default=list(FEATURES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/labelloop-review-bench"))
    parser.add_argument("--cache", type=Path, default=None, help="Fashion-MNIST cache folder")
    parser.add_argument("--record", action="store_true", help="append the section to --out")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "review.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    pool = load_fashion_mnist(fashion_mnist_dir(args.cache))
    args.work.mkdir(parents=True, exist_ok=True)
    cache = EmbeddingCache(args.work / "embeddings.sqlite3")
    outcomes: list[Outcome] = []
    review_seconds: list[float] = []
    offline_took = None
    for seed in args.seeds:
        data = build_realdata(
            args.work / f"data-{seed}",
            pool,
            n_train=args.n_train,
            n_test=1,
            seed=seed,
            size=args.image_px,
        )
        groups = {g: tuple(c) for g, c in data.groups.items()}
        truth = data.train.labels()
        names = sorted(truth)
        classes = [c for cs in groups.values() for c in cs]
        controls = [g for g, cs in groups.items() for _ in cs]
        task_ids = list(range(1, len(names) + 1))
        y = np.array(
            [[c in sum(truth[n].values(), []) for c in classes] for n in names], dtype=np.float32
        )
        images = data.train.images_dir
        label_config = data.train.label_config.read_text(encoding="utf-8")
        for source in args.features:
            if source == "imagenet":
                bundle = imagenet_bundle(groups)
            else:
                bundle, offline_took = fine_tuned_bundle(args.work, pool, args.image_px)
            assert bundle.label_space.classes == classes, bundle.label_space.classes
            features, failed = embed_images(
                bundle, [(n, (images / n).read_bytes()) for n in names], cache
            )
            assert not failed, failed
            for r, reading in enumerate(READINGS):
                noisy = flip(y, reading, args.share, np.random.default_rng([seed, r]))
                rows, cols = np.nonzero(noisy != y)
                flipped = {(1 + int(i), classes[j]) for i, j in zip(rows, cols, strict=True)}
                probs = oof_probabilities(features, noisy, folds=args.folds)
                ranked: dict[str, list[Flag]] = {}
                for scoring in SCORINGS:
                    flags = suspects(probs, noisy, classes, controls, task_ids, scoring=scoring)
                    ranked[scoring] = flags
                    found = [(f.task_id, f.label) in flipped for f in flags]
                    outcomes.append(
                        Outcome(
                            source,
                            reading,
                            scoring,
                            seed,
                            len(flipped),
                            y.size,
                            len(flags),
                            {k: sum(found[:k]) for k in KS},
                        )
                    )
                # The path the CLI takes, timed with a warm embedding cache: it must give the
                # default scoring's list above.
                path = args.work / "ledger.sqlite3"
                with ledger_with(path, label_config, images, names, noisy, groups) as ledger:
                    t0 = time.perf_counter()
                    served = review_project(ledger, PROJECT, bundle, fetch, cache)
                    review_seconds.append(time.perf_counter() - t0)
                assert served == ranked[DEFAULT_SCORING], "review_project disagrees"
                for o in outcomes[-len(SCORINGS) :]:
                    print(
                        f"seed {seed} {source:<10} {reading:<9} {o.scoring:<13} flipped "
                        f"{o.n_flipped:>3} flagged {o.n_flagged:>4}  P@20 {o.precision(20):.2f}"
                        f"  P@50 {o.precision(50):.2f}  R@50 {o.recall(50):.2f}",
                        flush=True,
                    )
    cache.close()
    total = time.perf_counter() - started
    section = render(args, outcomes, review_seconds, total, offline_took)
    print("\n" + section)
    if args.record:
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(section)


def spread(values: list[float]) -> str:
    """Mean and the range over the seeds."""
    return f"{statistics.fmean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def render(
    args: argparse.Namespace,
    outcomes: list[Outcome],
    review_seconds: list[float],
    total: float,
    offline_took: str | None,
) -> str:
    seeds = ", ".join(str(s) for s in args.seeds)
    offline = (
        f" The fine-tuned model: `labelloop train` on {OFFLINE_N} realdata images of seed "
        f"{OFFLINE_SEED}, {OFFLINE_EPOCHS} epochs ({offline_took}, once; kept under --work)."
        if offline_took is not None
        else ""
    )
    lines = [
        f"\n### Label review on real photos, {dt.date.today()}\n",
        f"Machine: {machine()}. `bench/label_review.py`: {args.n_train} labelloop.realdata "
        f"train images ({args.image_px} px) per seed, seeds {seeds} (images and flips); "
        f"MobileNetV2 features at 224 px, {args.folds}-fold out-of-fold heads.{offline} "
        f"Flipped: `per-image` = {args.share:.0%} of the images get one random class entry "
        f"flipped; `entries` = {args.share:.0%} of all image x class entries flipped. "
        "Precision@k = flipped entries among the first k flags / k (so at most "
        "flipped / k); recall@50 = flipped entries among the first 50 / all flipped; "
        "flagged = the length of the list. Mean over the seeds (min-max). Random order = the "
        f"share of entries that are flipped. This run {total / 60:.1f} min; one "
        f"`review_project` of {args.n_train} images with a warm embedding cache "
        f"{statistics.fmean(review_seconds):.1f} s.\n",
        "| features | reading | flipped | scoring | precision@20 | precision@50 | recall@50 "
        "| flagged | random order |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for source in args.features:
        for reading in READINGS:
            for scoring in SCORINGS:
                rows = [
                    o
                    for o in outcomes
                    if (o.features, o.reading, o.scoring) == (source, reading, scoring)
                ]
                chosen = " (default)" if scoring == DEFAULT_SCORING else ""
                baseline = statistics.fmean(o.n_flipped / o.n_entries for o in rows)
                lines.append(
                    f"| {source} | {reading} | {rows[0].n_flipped} of {rows[0].n_entries} "
                    f"| {scoring}{chosen} "
                    f"| {spread([o.precision(20) for o in rows])} "
                    f"| {spread([o.precision(50) for o in rows])} "
                    f"| {spread([o.recall(50) for o in rows])} "
                    f"| {statistics.fmean(o.n_flagged for o in rows):.0f} | {baseline:.3f} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
