"""The updates a training job runs: fast (head on cached embeddings) and full (fine-tune),
the gate that decides whether a candidate replaces the served model, and its publication.

Both updates build their candidate with the training core (labelloop.training.core), with the
class-weight and threshold settings of the model they start from, as `labelloop train` does.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import f1_score
from torch import nn

from labelloop.config import DataConfig, ModelConfig, PreprocessConfig, TrainConfig
from labelloop.labels import LabelSpace
from labelloop.labelstudio.export import load_labelstudio_export
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.label_config import (
    ChoicesControl,
    LabelConfig,
    LabelConfigError,
    parse_label_config,
)
from labelloop.labelstudio.urls import ImageFetchError
from labelloop.loop.jobs import JobKind, JobState
from labelloop.loop.ledger import AnnotationLedger, Job, TrainingExample
from labelloop.loop.priority import run_at_lower_priority
from labelloop.ml.data import DataError, load_metadata
from labelloop.ml.embeddings import EmbeddingCache, embed_images, embedding_space
from labelloop.ml.head import extend_head, fit_head, head_of, model_with_head, predict_features
from labelloop.ml.model import build_model
from labelloop.ml.train import predict, resolve_device
from labelloop.runtime.predictor import ModelHolder
from labelloop.store import ArtifactStore, Manifest, ModelBundle, load_bundle
from labelloop.training.core import (
    carried_thresholds,
    class_weights,
    config_of,
    fine_tune,
    image_loader,
    publish,
    tune,
)

logger = logging.getLogger(__name__)


class TrainerSettings(BaseModel):
    """Knobs of incremental training; defaults suit a team labelling a few hundred images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Auto-train after this many new or changed annotations...
    auto_train_after: int = Field(10, ge=1)
    # ...or after this many seconds without a new change, whichever comes first.
    quiet_seconds: float = Field(60.0, gt=0)
    # Cold start: the first model waits until every control has this many positive labels.
    min_labels_per_control: int = Field(3, ge=1)
    # Share of annotated tasks (by task-id hash) never trained on, used to compare models.
    holdout_percent: int = Field(20, ge=0, le=50)
    # Share of the rest used to tune thresholds.
    val_percent: int = Field(20, ge=0, le=50)
    # Promote unless macro-F1 on the held-out tasks drops by more than this.
    tolerance: float = Field(0.02, ge=0.0, le=1.0)
    cold_start_backbone: str = "resnet18"
    cold_start_weights: str = "imagenet"
    cold_start_image_size: int = Field(224, ge=32)
    # Full update: fine-tune everything from the current weights, annotations + replayed data.
    full_epochs: int = Field(5, ge=1)
    full_lr: float = Field(1e-4, gt=0)
    full_patience: int = Field(2, ge=1)
    full_batch_size: int = Field(16, ge=1)
    replay_max: int = Field(2000, ge=0)
    fetch_workers: int = Field(8, ge=1)
    poll_seconds: float = Field(0.5, gt=0)
    # The full fine-tune runs at this much lower CPU priority (Linux nice increment) than
    # request handling: on a few cores its compute threads otherwise compete with /setup,
    # webhooks and /predict for the CPU (bench/responsiveness.py). No effect on an idle machine.
    train_nice: int = Field(10, ge=0, le=19)


def split_of(task_id: int, settings: TrainerSettings) -> str:
    """'holdout', 'val' or 'train', stable for a task forever (a hash, not a random draw)."""
    bucket = int(hashlib.sha256(f"task:{task_id}".encode()).hexdigest()[:8], 16) % 100
    if bucket < settings.holdout_percent:
        return "holdout"
    if bucket < settings.holdout_percent + settings.val_percent:
        return "val"
    return "train"


class NothingToTrain(Exception):
    """The job has nothing to train on yet; the message says what is missing."""


@dataclass(frozen=True)
class UpdateOutcome:
    """What a finished update records on its job."""

    state: JobState
    progress: str
    metrics: dict[str, Any] = field(default_factory=dict)
    candidate_version: str | None = None
    promoted_version: str | None = None

    def job_fields(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "progress": self.progress,
            "metrics": self.metrics,
            "candidate_version": self.candidate_version,
            "promoted_version": self.promoted_version,
        }


class Updater:
    """Runs one job's update against the served model; publishes and hot-swaps the result."""

    def __init__(
        self,
        *,
        store: ArtifactStore,
        ledger: AnnotationLedger,
        holder: ModelHolder,
        fetcher: Callable[[], ImageFetcher],
        embeddings: EmbeddingCache,
        settings: TrainerSettings,
        on_promote: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.holder = holder
        self.fetcher = fetcher
        self.embeddings = embeddings
        self.settings = settings
        self.on_promote = on_promote

    def run(self, job: Job) -> UpdateOutcome:
        """The job's update; NothingToTrain when there is nothing to train on yet."""
        return self.fast(job) if job.kind == JobKind.FAST else self.full(job)

    def _progress(self, job: Job, text: str) -> None:
        self.ledger.update_job(job.id, progress=text)
        logger.info("job %d: %s", job.id, text)

    def _inputs(self, job: Job) -> tuple[LabelConfig, list[TrainingExample]]:
        """The project's parsed label config and its training set."""
        config_xml = self.ledger.label_config(job.project_id)
        if config_xml is None:
            raise NothingToTrain("the project's label config is not known yet")
        try:
            config = parse_label_config(config_xml)
        except LabelConfigError as exc:
            # A config Label Studio would not accept either: nothing to train, no traceback.
            raise NothingToTrain(f"the project's label config is unusable: {exc}") from exc
        return config, self.ledger.training_set(job.project_id)

    # -- fast update --------------------------------------------------------------------------

    def fast(self, job: Job) -> UpdateOutcome:
        config, examples = self._inputs(job)
        controls = [c.name for c in config.controls]
        current = self.holder.current
        base = current.bundle if current is not None else None
        if base is None:
            missing = self._cold_start_shortfall(examples, controls)
            if missing:
                raise NothingToTrain(f"cold start: waiting for labels ({missing})")
            base = self._cold_start_bundle(config)
        train_config = config_of(base)

        space = label_space_for(base.label_space, config.controls, examples)
        fetched = self._fetch(job, examples)
        self._progress(job, f"embedding {len(fetched)} images")
        features, failed = embed_images(
            base, [(str(e.task_id), data) for e, data in fetched], self.embeddings
        )
        failed_keys = set(failed)
        kept = [e for e, _ in fetched if str(e.task_id) not in failed_keys]
        targets = targets_of(space, kept, controls)
        splits = np.array([split_of(e.task_id, self.settings) for e in kept])
        train = splits == "train"
        if not train.any() or not targets[train].any():
            raise NothingToTrain("no labelled training images yet")

        self._progress(job, f"fitting the head on {int(train.sum())} images")
        init = extend_head(head_of(base.model), base.label_space.classes, space.classes)
        pos_weight = class_weights(targets[train], train_config.optim, space.classes)
        head = fit_head(features[train], targets[train], init=init, pos_weight=pos_weight.numpy())

        val, holdout = splits == "val", splits == "holdout"
        thresholds = tune(
            targets[val],
            predict_features(features[val], head),
            train_config.thresholds,
            space.classes,
            carried=carried_thresholds(space, base, train_config.thresholds.default),
        ).values
        current_probs = (
            predict_features(features[holdout], head_of(base.model)) if current else None
        )
        metrics = gate_metrics(
            space,
            targets[holdout],
            predict_features(features[holdout], head),
            thresholds,
            base if current else None,
            current_probs,
        )
        metrics.update(
            n_train=int(train.sum()), n_val=int(val.sum()), n_failed=len(examples) - len(kept)
        )
        candidate = model_with_head(base.model, head)
        return self.finish(job, base, candidate, space, thresholds, metrics)

    # -- full update --------------------------------------------------------------------------

    def full(self, job: Job) -> UpdateOutcome:
        """Fine-tune the whole network from the current weights on the annotations plus the
        offline training data (replayed, so what the model knew is not forgotten)."""
        current = self.holder.current
        if current is None:
            raise NothingToTrain("no model to fine-tune yet (a fast update makes one)")
        config, examples = self._inputs(job)
        controls = [c.name for c in config.controls]
        base = current.bundle
        s = self.settings
        train_config = config_of(base)
        optim = train_config.optim.model_copy(
            update={
                "epochs": s.full_epochs,
                "batch_size": s.full_batch_size,
                "lr": s.full_lr,
                "patience": s.full_patience,
                "monitor": "loss",
                "num_workers": 0,
            }
        )
        space = label_space_for(base.label_space, config.controls, examples)
        fetched = self._fetch(job, examples)
        annotated = [data for _, data in fetched]
        targets = targets_of(space, [e for e, _ in fetched], controls)
        splits = np.array([split_of(e.task_id, s) for e, _ in fetched])
        replay_items, replay_targets = self._replay(base, space)
        train_items: list[Path | bytes] = [
            a for a, split in zip(annotated, splits, strict=True) if split == "train"
        ]
        train_items += replay_items
        train_targets = np.concatenate([targets[splits == "train"], replay_targets])
        if not len(train_items) or not train_targets.any():
            raise NothingToTrain("no labelled training images yet")

        def loader(
            items: Sequence[Path | bytes], y: np.ndarray, preprocess: PreprocessConfig, **kw: Any
        ) -> torch.utils.data.DataLoader:
            return image_loader(items, y, preprocess, batch_size=optim.batch_size, **kw)

        val_mask, holdout = splits == "val", splits == "holdout"
        val_items: list[Path | bytes] = [a for a, m in zip(annotated, val_mask, strict=True) if m]
        val_loader = loader(
            val_items or train_items[:1],
            targets[val_mask] if val_items else train_targets[:1],
            base.preprocess,
            train=False,
        )
        model = model_with_head(
            base.model, extend_head(head_of(base.model), base.label_space.classes, space.classes)
        )
        device = resolve_device("auto")
        work_dir = self.store.scratch_dir(f"job-{job.id}")
        self._progress(
            job,
            f"fine-tuning on {len(train_items)} images "
            f"({len(replay_items)} replayed from offline data)",
        )
        result = run_at_lower_priority(
            s.train_nice,
            fine_tune,
            model,
            loader(train_items, train_targets, base.preprocess, train=True),
            val_loader,
            train_targets=train_targets,
            classes=space.classes,
            optim=optim,
            device=device,
            work_dir=work_dir,
            show_progress=False,
            on_epoch=lambda row: self._progress(
                job, f"epoch {row['epoch']}/{optim.epochs}: val loss {row['val_loss']:.4f}"
            ),
        )
        shutil.rmtree(work_dir, ignore_errors=True)
        model.cpu().eval()

        carried = carried_thresholds(space, base, train_config.thresholds.default)
        thresholds = carried
        if val_items:
            val_probs, val_true, _, _ = predict(model, val_loader, device, show_progress=False)
            thresholds = tune(
                val_true, val_probs, train_config.thresholds, space.classes, carried=carried
            ).values
        holdout_items = [a for a, m in zip(annotated, holdout, strict=True) if m]
        holdout_true = targets[holdout]
        candidate_probs = current_probs = np.zeros((0, len(space)))
        if holdout_items:
            candidate_probs, _, _, _ = predict(
                model,
                loader(holdout_items, holdout_true, base.preprocess, train=False),
                device,
                show_progress=False,
            )
            current_probs, _, _, _ = predict(
                base.model,
                loader(holdout_items, holdout_true, base.preprocess, train=False),
                torch.device("cpu"),
                show_progress=False,
            )
        metrics = gate_metrics(
            space, holdout_true, candidate_probs, thresholds, base, current_probs
        )
        metrics.update(
            n_train=len(train_items),
            n_replay=len(replay_items),
            n_val=len(val_items),
            best_epoch=result.best_epoch,
        )
        return self.finish(job, base, model, space, thresholds, metrics)

    def _replay(self, base: ModelBundle, space: LabelSpace) -> tuple[list[Path], np.ndarray]:
        """The offline training images the model came from, relabelled into `space`."""
        source, images = base.manifest.data.get("source"), base.manifest.data.get("images")
        if not source or not images or not Path(source).is_file():
            logger.info("No offline training data to replay (none recorded, or moved)")
            return [], np.zeros((0, len(space)), dtype=np.float32)
        raw = dict(base.manifest.training_config.get("data") or {})
        raw.update(allow_new_classes=True)
        try:
            data_config = DataConfig.model_validate(raw)
            reader = load_labelstudio_export if source.endswith(".json") else load_metadata
            data = reader(Path(source), Path(images), data_config)
        except (DataError, ValueError) as exc:
            logger.warning("Offline training data %s cannot be replayed: %s", source, exc)
            return [], np.zeros((0, len(space)), dtype=np.float32)
        known = space.index()
        samples = data.samples[: self.settings.replay_max]
        targets = space.binarize([n for n in s.all_labels() if n in known] for s in samples)
        return [s.path for s in samples], targets

    # -- shared steps -------------------------------------------------------------------------

    def _fetch(
        self, job: Job, examples: Sequence[TrainingExample]
    ) -> list[tuple[TrainingExample, bytes]]:
        self._progress(job, f"fetching {len(examples)} images")
        fetcher = self.fetcher()

        def fetch(example: TrainingExample) -> bytes | None:
            try:
                return fetcher.fetch_bytes(example.image_ref, task_id=example.task_id)
            except ImageFetchError as exc:
                logger.warning("Task %d left out of training: %s", example.task_id, exc.reason)
                return None

        with ThreadPoolExecutor(
            self.settings.fetch_workers, thread_name_prefix="train-fetch"
        ) as pool:
            fetched = list(pool.map(fetch, examples))
        return [(e, data) for e, data in zip(examples, fetched, strict=True) if data is not None]

    def finish(
        self,
        job: Job,
        base: ModelBundle,
        model: nn.Module,
        space: LabelSpace,
        thresholds: list[float],
        metrics: dict[str, Any],
    ) -> UpdateOutcome:
        """Publish the candidate (kept even when rejected) and promote it if it passes the gate."""
        current = self.holder.current
        promote = current is None or (
            metrics["candidate_f1"] >= metrics["current_f1"] - self.settings.tolerance
        )
        published = publish(
            self.store,
            model=model,
            label_space=space,
            thresholds=thresholds,
            backbone=base.manifest.backbone,
            dropout=base.manifest.dropout,
            preprocess=base.preprocess,
            parent_version=current.version if current is not None else None,
            training_config={
                **base.manifest.training_config,
                "incremental": {
                    "kind": job.kind,
                    "trigger": job.trigger,
                    "job": job.id,
                    "project": job.project_id,
                },
            },
            metrics={"incremental": metrics},
            # Carried forward so a later full update can still replay the offline data.
            data=base.manifest.data,
            make_current=promote,
        )
        version = published.version
        if not promote:
            logger.warning("Candidate %s rejected: %s", version, metrics)
            return UpdateOutcome(
                JobState.REJECTED,
                "rejected: worse on held-out tasks",
                metrics,
                candidate_version=version,
            )
        promoted = load_bundle(published.path)
        self.holder.swap(self.holder.load(promoted))
        # Embeddings of backbones no longer served are stale for ever (a full update moves the
        # backbone); keep the served one and its parent's, so a rollback by one stays warm.
        self.embeddings.prune({embedding_space(promoted), embedding_space(base)})
        if self.on_promote is not None:
            self.on_promote(version)
        return UpdateOutcome(
            JobState.SUCCEEDED,
            "promoted",
            metrics,
            candidate_version=version,
            promoted_version=version,
        )

    def _cold_start_shortfall(
        self, examples: Sequence[TrainingExample], controls: Sequence[str]
    ) -> str:
        counts = {name: 0 for name in controls}
        for example in examples:
            for name in controls:
                counts[name] += len(example.labels.get(name, ()))
        short = {n: c for n, c in counts.items() if c < self.settings.min_labels_per_control}
        return ", ".join(
            f"{n}: {c}/{self.settings.min_labels_per_control}" for n, c in short.items()
        )

    def _cold_start_bundle(self, config: LabelConfig) -> ModelBundle:
        """A first model from annotations alone: the configured backbone with an empty head."""
        s = self.settings
        space = LabelSpace.from_mapping({c.name: list(c.choices) for c in config.controls})
        model = build_model(s.cold_start_backbone, len(space), weights=s.cold_start_weights)
        model.eval()
        preprocess = PreprocessConfig(image_size=s.cold_start_image_size)
        manifest = Manifest(
            version="cold-start",
            created_at="",
            backbone=s.cold_start_backbone,
            num_classes=len(space),
            label_groups=space.as_dict(),
            preprocess=preprocess,
            training_config=TrainConfig(
                preprocess=preprocess,
                model=ModelConfig(backbone=s.cold_start_backbone, weights=s.cold_start_weights),
            ).model_dump(mode="json"),
        )
        return ModelBundle(model, space, [0.5] * len(space), preprocess, manifest, Path("."))


def gate_metrics(
    space: LabelSpace,
    y_true: np.ndarray,
    candidate_probs: np.ndarray,
    thresholds: list[float],
    current: ModelBundle | None,
    current_probs: np.ndarray | None,
) -> dict[str, Any]:
    """Candidate and current model on the same held-out tasks, each at its own thresholds;
    classes the current model does not know count as never predicted by it."""
    metrics: dict[str, Any] = {"n_holdout": int(len(y_true))}
    if not len(y_true):
        metrics.update(candidate_f1=0.0, current_f1=0.0, note="no held-out tasks yet")
        return metrics
    candidate = candidate_probs >= np.asarray(thresholds)
    metrics["candidate_f1"] = float(f1_score(y_true, candidate, average="macro", zero_division=0))
    if current is None or current_probs is None:
        metrics["current_f1"] = 0.0
        return metrics
    index = {name: i for i, name in enumerate(current.label_space.classes)}
    current_pred = np.zeros_like(candidate)
    for j, name in enumerate(space.classes):
        if name in index:
            i = index[name]
            current_pred[:, j] = current_probs[:, i] >= current.thresholds[i]
    metrics["current_f1"] = float(f1_score(y_true, current_pred, average="macro", zero_division=0))
    return metrics


def targets_of(
    space: LabelSpace, examples: Sequence[TrainingExample], controls: Sequence[str]
) -> np.ndarray:
    known = space.index()
    return space.binarize(
        [name for control in controls for name in e.labels.get(control, ()) if name in known]
        for e in examples
    )


def label_space_for(
    base: LabelSpace,
    controls: Sequence[ChoicesControl],
    examples: Sequence[TrainingExample],
) -> LabelSpace:
    """The model's classes plus any new choice of the config or label of the annotations.

    A new name joins the group named like its control when there is one, else the group that
    already holds most of that control's classes, else a new group named after the control.
    """
    known = set(base.classes)
    group_of = base.group_of()
    additions: dict[str, list[str]] = {}
    for control in controls:
        seen = list(control.choices)
        for example in examples:
            seen.extend(n for n in example.labels.get(control.name, ()) if n not in seen)
        new = [n for n in seen if n not in known]
        if not new:
            continue
        if control.name in base.group_names:
            group = control.name
        else:
            owners = [group_of[c] for c in control.choices if c in group_of]
            group = max(set(owners), key=owners.count) if owners else control.name
        bucket = additions.setdefault(group, [])
        bucket.extend(n for n in new if n not in bucket)
        known.update(new)
    return base.extended(additions) if additions else base
