from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config

from labelloop.config import OptimConfig
from labelloop.ml.dataset import ImageDataset, collate_skip_none
from labelloop.ml.model import build_model
from labelloop.ml.train import fit, mean_average_precision
from labelloop.store import ModelStore, load_bundle
from labelloop.training.offline import DataSource, TrainOptions, run_training


def test_validation_loss_falls_on_tiny_demo_images(demo_dataset, tmp_path: Path) -> None:
    outcome = run_training(
        tiny_config(epochs=4, patience=4, monitor="loss"),
        DataSource(images=demo_dataset.images_dir, metadata=demo_dataset.metadata_csv),
        TrainOptions(model_dir=tmp_path, show_progress=False),
    )
    assert outcome is not None
    with (outcome.version_dir / "history.csv").open() as handle:
        history = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4]
    val_losses = [float(r["val_loss"]) for r in history]
    assert min(val_losses[1:]) < val_losses[0], val_losses
    train_losses = [float(r["train_loss"]) for r in history]
    assert train_losses[-1] < train_losses[0], train_losses


def test_training_publishes_a_complete_version(trained_model) -> None:
    model_dir, outcome = trained_model
    store = ModelStore(model_dir)
    assert store.current_version() == outcome.version
    version_dir = outcome.version_dir
    for name in (
        "model.pth",
        "classes.json",
        "thresholds.json",
        "manifest.json",
        "splits.csv",
        "history.csv",
        "data_report.json",
        "config.json",
        "thresholds_detail.json",
    ):
        assert (version_dir / name).is_file(), name
    for name in ("report.md", "metrics.json", "predictions.csv", "pr_curves.png"):
        assert (version_dir / "evaluation" / name).is_file(), name
    manifest = json.loads((version_dir / "manifest.json").read_text())
    classes = json.loads((version_dir / "classes.json").read_text())
    thresholds = json.loads((version_dir / "thresholds.json").read_text())
    assert len(classes) == len(thresholds) == manifest["num_classes"] == 9
    assert manifest["label_groups"]["defects"] == ["scratch", "crack", "rust", "dent"]
    assert manifest["preprocess"]["image_size"] == 32
    assert manifest["data"]["fingerprint"] == outcome.data_report["fingerprint"]
    assert sum(manifest["data"]["splits"].values()) == 120
    assert manifest["metrics"]["test"]["f1_macro"] == pytest.approx(
        outcome.test_metrics["f1_macro"]
    )
    assert all(0.05 <= t <= 0.95 for t in thresholds)
    # The work directory (resume checkpoint) is cleaned up after a successful publish.
    assert not any((model_dir / "work").glob("*/last.pt"))
    # What serving loads is what training produced.
    bundle = load_bundle(model_dir)
    assert bundle.classes == classes and bundle.thresholds == pytest.approx(thresholds)


def test_init_from_a_previous_model_records_the_parent(
    demo_dataset, trained_model, tmp_path: Path
) -> None:
    model_dir, first = trained_model
    outcome = run_training(
        tiny_config(epochs=1),
        DataSource(images=demo_dataset.images_dir, metadata=demo_dataset.metadata_csv),
        TrainOptions(model_dir=tmp_path, init_from=model_dir, show_progress=False),
    )
    assert outcome is not None
    manifest = json.loads((outcome.version_dir / "manifest.json").read_text())
    assert manifest["parent_version"] == first.version


def _toy_loaders(tmp_path: Path):
    from PIL import Image

    from labelloop.config import PreprocessConfig
    from labelloop.ml.transforms import eval_transform

    rng = np.random.default_rng(0)
    paths, targets = [], []
    for i in range(24):
        bright = i % 2
        pixels = (
            rng.integers(150, 255, (16, 16, 3)) if bright else rng.integers(0, 100, (16, 16, 3))
        )
        path = tmp_path / f"{i}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
        targets.append([bright, 1 - bright])
    dataset = ImageDataset(
        paths, np.array(targets, dtype=np.float32), eval_transform(PreprocessConfig(image_size=32))
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate_skip_none)
    return loader


def test_resume_continues_from_the_last_epoch(tmp_path: Path) -> None:
    loader = _toy_loaders(tmp_path)
    config = OptimConfig(epochs=3, batch_size=8, patience=10, lr=1e-3)
    torch.manual_seed(0)
    fit(
        build_model("resnet18", 2),
        loader,
        loader,
        pos_weight=torch.ones(2),
        config=config,
        device=torch.device("cpu"),
        work_dir=tmp_path / "work",
        show_progress=False,
    )
    saved = torch.load(tmp_path / "work" / "last.pt", weights_only=True)
    assert saved["epoch"] == 3
    longer = config.model_copy(update={"epochs": 5})
    result = fit(
        build_model("resnet18", 2),
        loader,
        loader,
        pos_weight=torch.ones(2),
        config=longer,
        device=torch.device("cpu"),
        work_dir=tmp_path / "work",
        resume=True,
        show_progress=False,
    )
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5]


def test_early_stopping_keeps_the_best_epoch(tmp_path: Path) -> None:
    loader = _toy_loaders(tmp_path)
    config = OptimConfig(epochs=30, batch_size=8, patience=1, lr=1e-1, monitor="loss")
    torch.manual_seed(0)
    result = fit(
        build_model("resnet18", 2),
        loader,
        loader,
        pos_weight=torch.ones(2),
        config=config,
        device=torch.device("cpu"),
        work_dir=tmp_path / "w",
        show_progress=False,
    )
    assert result.stopped_early and len(result.history) < 30
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.best_epoch == best["epoch"]


def test_mean_average_precision_ignores_classes_without_positives() -> None:
    y_true = np.array([[1, 0], [0, 0], [1, 0]])
    y_prob = np.array([[0.9, 0.1], [0.1, 0.5], [0.8, 0.2]])
    assert mean_average_precision(y_true, y_prob) == pytest.approx(1.0)
    assert np.isnan(mean_average_precision(np.zeros((2, 2)), y_prob[:2]))


def test_checkpoints_are_serialised_in_memory_then_written(tmp_path: Path, monkeypatch) -> None:
    """torch.save to a path holds the GIL for the whole write (a server's request threads
    stall while a background fine-tune checkpoints); into a buffer it does not."""
    import io

    import labelloop.ml.train as train_module

    targets: list[object] = []
    real_save = torch.save

    def spy_save(obj, f, *args, **kwargs):
        targets.append(f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train_module.torch, "save", spy_save)
    loader = _toy_loaders(tmp_path)
    fit(
        build_model("resnet18", 2),
        loader,
        loader,
        pos_weight=torch.ones(2),
        config=OptimConfig(epochs=1, batch_size=8, patience=10, lr=1e-3),
        device=torch.device("cpu"),
        work_dir=tmp_path / "work",
        show_progress=False,
    )
    assert len(targets) == 1 and isinstance(targets[0], io.BytesIO)
    saved = torch.load(tmp_path / "work" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1 and "model" in saved
