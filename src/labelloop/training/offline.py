"""The offline jobs: train (data -> split -> fit -> thresholds -> evaluate -> publish),
evaluate a stored model on a labelled set, and predict images."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from labelloop.config import DataConfig, TrainConfig
from labelloop.labelstudio.export import load_labelstudio_export
from labelloop.lineages import Lineages
from labelloop.ml import evaluate as evaluation
from labelloop.ml.checkpoints import LoadMode, load_into, read_checkpoint
from labelloop.ml.data import DataError, LabelledData, load_metadata
from labelloop.ml.model import build_model, resolve_backbone
from labelloop.ml.splits import (
    materialize_splits,
    stratified_split,
    write_split_manifest,
)
from labelloop.ml.thresholds import prediction_confidence
from labelloop.ml.train import (
    DistInfo,
    cleanup_distributed,
    init_distributed,
    predict,
    resolve_device,
)
from labelloop.store import (
    ModelBundle,
    load_bundle,
    write_json_atomic,
)
from labelloop.training.core import fine_tune, image_loader, publish, tune

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSource:
    """Where labelled images come from: a metadata CSV or a Label Studio JSON export."""

    images: Path
    metadata: Path | None = None
    labelstudio_export: Path | None = None

    def load(self, config: DataConfig) -> LabelledData:
        if (self.metadata is None) == (self.labelstudio_export is None):
            raise DataError("give exactly one of --metadata CSV or --labelstudio-export JSON")
        if not self.images.is_dir():
            raise DataError(f"images folder {self.images} does not exist")
        if self.metadata is not None:
            return load_metadata(self.metadata, self.images, config)
        assert self.labelstudio_export is not None
        return load_labelstudio_export(self.labelstudio_export, self.images, config)


@dataclass(frozen=True)
class TrainOptions:
    model_dir: Path
    init_from: Path | None = None
    init_mode: LoadMode = LoadMode.compatible
    resume: bool = False
    materialize_splits_to: Path | None = None
    show_progress: bool = True
    # The distributed mode's object store (s3://bucket/prefix): the version is published there
    # as the base model, with model_dir as its local cache.
    store_url: str | None = None


@dataclass
class TrainOutcome:
    version: str
    version_dir: Path
    test_metrics: dict[str, Any] | None
    report: Path | None
    data_report: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _resolve_init(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """A checkpoint file, or any model folder load_bundle understands; returns state and version."""
    if path.is_dir():
        bundle = load_bundle(path)
        return bundle.model.state_dict(), bundle.version
    return read_checkpoint(path), None


def _work_key(config: TrainConfig, fingerprint: str) -> str:
    """Resume only a run with the same data and settings."""
    payload = json.dumps([config.model_dump(mode="json"), fingerprint], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def run_training(
    config: TrainConfig, source: DataSource, options: TrainOptions
) -> TrainOutcome | None:
    """Train, tune thresholds, evaluate on test and publish a new version as `current`.

    Under torchrun every rank trains; only rank 0 publishes and returns an outcome.
    """
    dist_info = init_distributed(config.optim.device)
    try:
        return _run_training(config, source, options, dist_info)
    finally:
        cleanup_distributed(dist_info)


def _run_training(
    config: TrainConfig, source: DataSource, options: TrainOptions, dist_info: DistInfo
) -> TrainOutcome | None:
    # The manifest records the backbone actually built, never "auto".
    backbone = resolve_backbone(config.model.backbone, config.model.weights)
    config = config.model_copy(
        update={"model": config.model.model_copy(update={"backbone": backbone})}
    )
    generator = seed_everything(config.split.seed)
    data = source.load(config.data)
    label_space = data.label_space
    targets = data.targets()
    splits = stratified_split(targets, config.split)
    logger.info(
        "%d images (%d excluded), %d classes; split train %d / val %d / test %d",
        len(data.samples),
        data.report.n_images - data.report.n_usable,
        len(label_space),
        len(splits["train"]),
        len(splits["val"]),
        len(splits["test"]),
    )
    parent_version = None
    model = build_model(
        config.model.backbone,
        len(label_space),
        weights=config.model.weights if options.init_from is None else "none",
        dropout=config.model.dropout,
    )
    if options.init_from is not None:
        state, parent_version = _resolve_init(options.init_from)
        report = load_into(model, state, options.init_mode)
        logger.info("Initialised from %s: %s", options.init_from, report.summary())
        for line in report.skipped[:20]:
            logger.debug("skipped %s", line)

    device = resolve_device(config.optim.device)
    paths = [s.path for s in data.samples]

    opt = config.optim

    def subset(name: str, *, train: bool, sampler: bool = False) -> DataLoader:
        idx = splits[name]
        items = [paths[i] for i in idx]
        # DistributedSampler only takes len() of its dataset, so the list of paths does; its
        # stubs ask for a torch Dataset.
        dist_sampler: DistributedSampler | None = (
            DistributedSampler(items, shuffle=True, seed=config.split.seed)  # type: ignore[arg-type]
            if sampler and dist_info.enabled
            else None
        )
        return image_loader(
            items,
            targets[idx],
            config.preprocess,
            train=train,
            batch_size=opt.batch_size,
            num_workers=opt.num_workers,
            sampler=dist_sampler,
            generator=generator if train else None,
        )

    train_loader = subset("train", train=True, sampler=True)
    val_loader = subset("val", train=False)

    work_dir = options.model_dir / "work" / _work_key(config, data.report.fingerprint)
    result = fine_tune(
        model,
        train_loader,
        val_loader,
        train_targets=targets[splits["train"]],
        classes=label_space.classes,
        optim=opt,
        device=device,
        work_dir=work_dir,
        resume=options.resume,
        dist_info=dist_info,
        show_progress=options.show_progress,
    )
    if not dist_info.is_main:
        return None

    val_probs, val_true, _, _ = predict(
        model, val_loader, device, desc="val probabilities", show_progress=options.show_progress
    )
    tuned = tune(val_true, val_probs, config.thresholds, label_space.classes)
    thresholds = tuned.values

    def evaluate_into(staged: Path, version: str) -> dict[str, Any]:
        """Splits, data report, thresholds and the test evaluation, written into the version."""
        write_split_manifest(staged / "splits.csv", data.samples, splits)
        write_json_atomic(staged / "data_report.json", data.report.to_dict())
        write_json_atomic(
            staged / "thresholds_detail.json", tuned.detail.to_dict(label_space.classes)
        )
        write_json_atomic(staged / "config.json", config.model_dump(mode="json"))
        if (work_dir / "history.csv").is_file():
            shutil.copy2(work_dir / "history.csv", staged / "history.csv")
        test_metrics = None
        if len(splits["test"]):
            test_loader = subset("test", train=False)
            probs, true, index, _ = predict(
                model, test_loader, device, desc="test", show_progress=options.show_progress
            )
            test_ids = [data.samples[splits["test"][i]].image_id for i in index]
            test_metrics = evaluation.write_evaluation(
                staged / "evaluation",
                image_ids=test_ids,
                classes=label_space.classes,
                thresholds=thresholds,
                y_true=true,
                y_prob=probs,
                groups=label_space.as_dict(),
                title=f"Test evaluation of {version}",
                extra={
                    "model version": version,
                    "backbone": config.model.backbone,
                    "data": source.metadata or source.labelstudio_export,
                    "best epoch": result.best_epoch,
                },
            ).metrics
        else:
            logger.warning("No test split (test_fraction is 0): the model is published unevaluated")
        evaluated["test"] = test_metrics
        return {
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "val": result.history[result.best_epoch - 1] if result.history else {},
            "test": _summary(test_metrics),
        }

    evaluated: dict[str, Any] = {}
    published = publish(
        Lineages(options.model_dir, store_url=options.store_url).base(),
        model=model,
        label_space=label_space,
        thresholds=thresholds,
        backbone=config.model.backbone,
        dropout=config.model.dropout,
        preprocess=config.preprocess,
        parent_version=parent_version,
        training_config=config.model_dump(mode="json"),
        metrics=evaluate_into,
        data={
            "source": str(source.metadata or source.labelstudio_export),
            "images": str(source.images),
            "fingerprint": data.report.fingerprint,
            "splits": {name: int(len(idx)) for name, idx in splits.items()},
        },
    )
    version, version_dir = published.version, published.path
    test_metrics = evaluated.get("test")
    report_path = None
    if test_metrics is not None:
        report_path = version_dir / "evaluation" / "report.md"
    if options.materialize_splits_to is not None:
        materialize_splits(data.samples, splits, options.materialize_splits_to)
        logger.info("Split folders written under %s", options.materialize_splits_to)
    shutil.rmtree(work_dir, ignore_errors=True)
    return TrainOutcome(version, version_dir, test_metrics, report_path, data.report.to_dict())


def _summary(metrics: dict[str, Any] | None) -> dict[str, Any]:
    if metrics is None:
        return {}
    keys = ("f1_macro", "f1_micro", "f1_samples", "f1_weighted", "mAP", "hamming_loss", "n_samples")
    return {k: metrics.get(k) for k in keys}


# --- evaluate and predict with a stored model --------------------------------------------------


def _data_config_for(bundle: ModelBundle, base: DataConfig) -> DataConfig:
    """Declare the model's classes for every label column, so unknown labels are reported."""
    groups = bundle.label_space.as_dict()
    declared = {col: tuple(groups.get(col, bundle.classes)) for col in base.label_columns}
    return base.model_copy(update={"classes": declared, "allow_new_classes": False})


def evaluate_model(
    model_path: Path,
    source: DataSource,
    out_dir: Path,
    data_config: DataConfig,
    *,
    batch_size: int = 32,
    device_spec: str = "auto",
    show_progress: bool = True,
) -> evaluation.EvaluationReport:
    bundle = load_bundle(model_path)
    if source.metadata is not None and set(data_config.label_columns) != set(
        bundle.label_space.group_names
    ):
        logger.info(
            "Label columns %s are matched to the model's classes by name",
            list(data_config.label_columns),
        )
    data = source.load(_data_config_for(bundle, data_config))
    targets = bundle.label_space.binarize(s.all_labels() for s in data.samples)
    device = resolve_device(device_spec)
    loader = image_loader(
        [s.path for s in data.samples],
        targets,
        bundle.preprocess,
        train=False,
        batch_size=batch_size,
    )
    probs, true, index, _ = predict(
        bundle.model.to(device), loader, device, desc="evaluate", show_progress=show_progress
    )
    return evaluation.write_evaluation(
        out_dir,
        image_ids=[data.samples[i].image_id for i in index],
        classes=bundle.classes,
        thresholds=bundle.thresholds,
        y_true=true,
        y_prob=probs,
        groups=bundle.label_space.as_dict(),
        title=f"Evaluation of {bundle.version}",
        extra={
            "model version": bundle.version,
            "data": source.metadata or source.labelstudio_export,
        },
    )


def predict_images(
    model_path: Path,
    images: Sequence[Path],
    *,
    batch_size: int = 32,
    device_spec: str = "auto",
    show_progress: bool = True,
) -> pd.DataFrame:
    """One row per image: probabilities, predicted labels, confidence, or the read error."""
    bundle = load_bundle(model_path)
    device = resolve_device(device_spec)
    probs, _, index, _ = predict(
        bundle.model.to(device),
        image_loader(list(images), None, bundle.preprocess, train=False, batch_size=batch_size),
        device,
        show_progress=show_progress,
    )
    thresholds = np.asarray(bundle.thresholds)
    rows: list[dict[str, Any]] = [
        {"image": str(p), "predicted": "", "confidence": None, "error": "could not be read"}
        for p in images
    ]
    if len(probs):
        confidence = prediction_confidence(probs, thresholds)
        for row_probs, i, conf in zip(probs, index, confidence, strict=True):
            rows[i] = {
                "image": str(images[i]),
                **{
                    f"p_{c}": round(float(p), 4)
                    for c, p in zip(bundle.classes, row_probs, strict=True)
                },
                "predicted": ";".join(bundle.label_space.decode(row_probs >= thresholds)),
                "confidence": round(float(conf), 4),
                "error": "",
            }
    columns = ["image", *[f"p_{c}" for c in bundle.classes], "predicted", "confidence", "error"]
    return pd.DataFrame(rows).reindex(columns=columns)
