"""Shared by the benchmark scripts: the machine description, a model to time, the report."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from labelloop.config import PreprocessConfig
from labelloop.dev.demo import LABEL_GROUPS
from labelloop.labels import LabelSpace
from labelloop.ml.model import build_model
from labelloop.store import ModelStore, manifest_for, write_model_files

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    threads = torch.get_num_threads()
    return f"{os.cpu_count()} cores, {cpu}, torch {torch.__version__}, {threads} threads"


def publish_random_model(
    model_dir: Path,
    image_size: int,
    backbone: str = "resnet18",
    *,
    store: ModelStore | None = None,
    make_current: bool = True,
) -> None:
    """A model over the demo classes, random init: timings do not depend on the weights.
    Published into `store` when given (e.g. an object store's lineage), else `model_dir`."""
    space = LabelSpace.from_mapping({g: list(c) for g, c in LABEL_GROUPS.items()})
    store = store or ModelStore(model_dir)
    torch.manual_seed(0)
    with store.staging() as staged:
        write_model_files(staged, build_model(backbone, len(space)), space, [0.5] * len(space))
        store.publish(
            staged,
            manifest_for(
                version=store.next_version_name(),
                backbone=backbone,
                dropout=0.0,
                label_space=space,
                preprocess=PreprocessConfig(image_size=image_size),
            ),
            make_current=make_current,
        )


def append_section(text: str) -> None:
    if not REPORT.exists():
        REPORT.write_text("# Benchmarks\n\nFigures from `bench/`; each section is one dated run.\n")
    with REPORT.open("a") as handle:
        # A section starts after a blank line, whatever the last one ended with.
        existing = REPORT.read_text()
        handle.write(
            ("" if existing.endswith("\n\n") else "\n" if existing.endswith("\n") else "\n\n")
            + text
        )
