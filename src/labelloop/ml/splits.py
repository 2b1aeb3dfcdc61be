"""Iterative stratified train/val/test splits, the split manifest, and class weights."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from labelloop.config import SplitConfig
from labelloop.ml.data import DataError, Sample

SPLIT_NAMES = ("train", "val", "test")


def stratified_split(targets: np.ndarray, config: SplitConfig) -> dict[str, np.ndarray]:
    """Deterministic multi-label stratified train/val/test indices (iterative stratification).

    One row per image, so the split is grouped by image. An extra "no labels" column keeps
    clean images spread across the splits too.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    n = len(targets)
    n_test = int(round(n * config.test_fraction))
    n_val = int(round(n * config.val_fraction))
    if n - n_test - n_val < 1 or n_val < 1:
        raise DataError(
            f"{n} usable images are too few for val {config.val_fraction:.0%} and test "
            f"{config.test_fraction:.0%}; label more images or lower the fractions"
        )
    strat = np.concatenate([targets, (targets.sum(axis=1) == 0)[:, None]], axis=1).astype(int)
    indices = np.arange(n)

    def carve(pool: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if size == 0:
            return pool, pool[:0]
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=size, random_state=seed)
        keep, take = next(splitter.split(pool[:, None], strat[pool]))
        return np.sort(pool[keep]), np.sort(pool[take])

    rest, test = carve(indices, n_test, config.seed)
    train, val = carve(rest, n_val, config.seed + 1)
    return {"train": train, "val": val, "test": test}


def write_split_manifest(
    path: Path, samples: Sequence[Sample], splits: Mapping[str, np.ndarray]
) -> None:
    rows = [
        {"image_id": samples[i].image_id, "split": name}
        for name in SPLIT_NAMES
        for i in splits.get(name, [])
    ]
    pd.DataFrame(rows, columns=["image_id", "split"]).to_csv(path, index=False)


def materialize_splits(
    samples: Sequence[Sample], splits: Mapping[str, np.ndarray], out_dir: Path
) -> Path:
    """Hard-link (or copy, across file systems) images into out_dir/{train,val,test}/."""
    for name, indices in splits.items():
        folder = out_dir / name
        for i in indices:
            sample = samples[i]
            target = folder / sample.image_id
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.unlink()
            try:
                os.link(sample.path, target)
            except OSError:
                shutil.copy2(sample.path, target)
    return out_dir


def compute_pos_weight(
    targets: np.ndarray, *, min_weight: float, max_weight: float
) -> tuple[torch.Tensor, list[int]]:
    """sqrt(negatives / positives) per class, clipped; returns the weights and empty classes.

    A class with no positives gets weight 1: the loss then only teaches it to stay off, which is
    all the data can say, and nothing is divided by zero.
    """
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    empty = [int(i) for i in np.flatnonzero(positives == 0)]
    ratio = np.divide(
        negatives, positives, out=np.ones_like(positives, dtype=np.float64), where=positives > 0
    )
    weights = np.clip(np.sqrt(ratio), min_weight, max_weight)
    weights[empty] = 1.0
    return torch.tensor(weights, dtype=torch.float32), empty
