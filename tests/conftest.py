"""Shared fixtures: a tiny demo dataset and a tiny trained model, made once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from labelloop.config import TrainConfig
from labelloop.demo import LABEL_GROUPS, DemoDataset, generate_demo_dataset
from labelloop.pipeline import DataSource, TrainOptions, TrainOutcome, run_training

# Two cores: more threads only add contention in the tests.
torch.set_num_threads(2)


def tiny_config(**optim: object) -> TrainConfig:
    """ResNet18 at 32 px, random init: seconds per epoch on two CPU cores."""
    return TrainConfig().with_overrides(
        {
            "data": {"classes": {g: list(c) for g, c in LABEL_GROUPS.items()}},
            "preprocess": {"image_size": 32},
            "model": {"weights": "none"},
            "optim": {"epochs": 2, "batch_size": 16, "lr": 2e-3, **optim},
        }
    )


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), n=120, seed=3, size=48)


@pytest.fixture(scope="session")
def trained_model(
    demo_dataset: DemoDataset, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TrainOutcome]:
    model_dir = tmp_path_factory.mktemp("model")
    outcome = run_training(
        tiny_config(),
        DataSource(images=demo_dataset.images_dir, metadata=demo_dataset.metadata_csv),
        TrainOptions(model_dir=model_dir, show_progress=False),
    )
    assert outcome is not None
    return model_dir, outcome
