"""The updates a training job runs: fast (head on cached embeddings) and full (fine-tune),
the gate that decides whether a candidate replaces the served model, and its publication.

Both updates build their candidate with the training core (labelloop.training.core), with the
class-weight and threshold settings of the model they start from, as `labelloop train` does.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from labelloop.config import BACKBONES, DataConfig, ModelConfig, PreprocessConfig, TrainConfig
from labelloop.labels import LabelSpace
from labelloop.labelstudio.export import load_labelstudio_export
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.label_config import (
    LabelConfig,
    LabelConfigError,
    parse_label_config,
)
from labelloop.loop.examples import label_space_for, targets_of
from labelloop.loop.gate import decide, macro_f1, predictions_for
from labelloop.loop.jobs import JobKind, JobState
from labelloop.loop.ledger import AnnotationLedger, Job, TrainingExample
from labelloop.loop.priority import run_at_lower_priority
from labelloop.loop.review import NothingToReview, flag_record, review_examples
from labelloop.ml.data import DataError, Sample, load_metadata
from labelloop.ml.embeddings import EmbeddingCache, content_key, embed_images, embedding_space
from labelloop.ml.evaluate import compute_metrics, pr_curve_points
from labelloop.ml.head import (
    extend_head,
    fit_head,
    head_of,
    model_with_head,
    out_of_fold,
    predict_features,
)
from labelloop.ml.model import build_model, resolve_backbone
from labelloop.ml.train import predict, resolve_device
from labelloop.runtime.projects import ProjectModels
from labelloop.store import SPLITS_FILE, Manifest, ModelBundle, ModelStore, load_bundle
from labelloop.training.core import (
    carried_thresholds,
    class_weights,
    config_of,
    fine_tune,
    image_loader,
    publish,
    tune,
)
from labelloop.training.ddp import fine_tune_distributed, processes_for

logger = logging.getLogger(__name__)


# How many of a fast update's review flags its version keeps for the project's page: a
# reviewer's session, not the whole list (`labelloop review` prints every one).
REVIEW_LISTED = 50


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
    # Promote unless macro-F1 on the held-out items drops by more than this (loop/gate.py).
    tolerance: float = Field(0.01, ge=0.0, le=1.0)
    # Below this many held-out items, a drop the bootstrap cannot tell from noise is accepted.
    min_gate_items: int = Field(30, ge=1)
    # Out-of-fold folds for the fast update's thresholds.
    folds: int = Field(5, ge=2, le=20)
    # One annotation counts as up to this many replayed offline images in the head's fit.
    annotation_weight_max: float = Field(5.0, ge=1.0)
    # Rejected candidates whose weights are kept (the rest keep manifest and metrics only).
    keep_rejected: int = Field(3, ge=0)
    # The first model of a project with no model: "auto" is the best backbone whose ImageNet
    # weights are available offline (ml.model.best_pretrained_backbone); weights "imagenet",
    # "none" or a checkpoint path.
    cold_start_backbone: str = "auto"
    cold_start_weights: str = "imagenet"
    cold_start_image_size: int = Field(224, ge=32)
    # Full update: fine-tune everything from the current weights, annotations + replayed data.
    # Scheduled without a button once the labels grew by `full_growth` and by `full_min_new`
    # changes since the last one (Start Training forces one at once).
    auto_full: bool = True
    full_min_new: int = Field(50, ge=1)
    full_growth: float = Field(0.25, ge=0.0)
    # Offline images replayed in a full update: as many as the annotations times this ratio,
    # at least `full_replay_min` (and at most `replay_max`), so it stays minutes, not hours.
    full_replay_ratio: float = Field(1.0, ge=0.0)
    full_replay_min: int = Field(200, ge=0)
    # Epochs and patience of a full update; the learning rate, monitor and class weights are
    # the model's own TrainConfig's (`labelloop train`'s recipe), unless `full_lr` is set.
    full_epochs: int = Field(15, ge=1)
    full_lr: float | None = Field(None, gt=0)
    full_patience: int = Field(3, ge=1)
    full_batch_size: int = Field(16, ge=1)
    # Ranks of a full update's DDP (torchrun's launcher, training/ddp.py); 0: one per CUDA GPU,
    # and on a machine without CUDA one process, which already uses every core.
    full_processes: int = Field(0, ge=0)
    replay_max: int = Field(2000, ge=0)
    fetch_workers: int = Field(8, ge=1)
    poll_seconds: float = Field(0.5, gt=0)
    # Label Studio is reconciled at start and then this often: a webhook lost while the backend
    # or its database was down (Label Studio never sends one again) is recovered by it.
    reconcile_seconds: float = Field(600.0, gt=0)
    # A worker's claim on a job (distributed mode): renewed every third of it while the job
    # runs; a worker silent for longer is taken for dead and its job is queued again.
    lease_seconds: float = Field(60.0, ge=3)
    # The full fine-tune runs at this much lower CPU priority (Linux nice increment) than
    # request handling: on a few cores its compute threads otherwise compete with /setup,
    # webhooks and /predict for the CPU (bench/responsiveness.py). No effect on an idle machine.
    train_nice: int = Field(10, ge=0, le=19)

    @field_validator("cold_start_backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in (*BACKBONES, "auto"):
            raise ValueError(f"expected auto or one of {list(BACKBONES)}, got {value!r}")
        return value


def split_of(task_id: int, settings: TrainerSettings) -> str:
    """'holdout', 'val' or 'train', stable for a task forever (a hash, not a random draw)."""
    bucket = int(hashlib.sha256(f"task:{task_id}".encode()).hexdigest()[:8], 16) % 100
    if bucket < settings.holdout_percent:
        return "holdout"
    if bucket < settings.holdout_percent + settings.val_percent:
        return "val"
    return "train"


COLD_START = "cold-start"  # the version name of a cold start's untrained parent


def _lineage_of(parent: ModelBundle, store: ModelStore) -> str:
    if parent.version == COLD_START:
        return "cold-start"
    return "project" if parent.path.parent.resolve() == store.versions_dir.resolve() else "base"


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
        models: ProjectModels,
        ledger: AnnotationLedger,
        fetcher: Callable[[], ImageFetcher],
        embeddings: EmbeddingCache,
        settings: TrainerSettings,
        on_promote: Callable[[int, str], None] | None = None,
    ) -> None:
        self.models = models
        self.ledger = ledger
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
        """Refit the head on cached embeddings of everything known: the project's annotations
        (weighted up) and the offline data the model was trained on (replayed), with thresholds
        from out-of-fold predictions. Seconds, with a warm cache."""
        config, examples = self._inputs(job)
        controls = [c.name for c in config.controls]
        current = self.models.parent_for(job.project_id, config)
        base = current.bundle if current is not None else None
        if base is None:
            missing = self._cold_start_shortfall(examples, controls)
            if missing:
                raise NothingToTrain(f"cold start: waiting for labels ({missing})")
            base = self._cold_start_bundle(config)
        train_config = config_of(base)
        space = label_space_for(base.label_space, config.controls, examples)

        fetched = self._fetch(job, examples)
        self._progress(job, f"embedding {len(fetched)} annotated images")
        features, failed = embed_images(
            base, [(str(e.task_id), data) for e, data in fetched], self.embeddings
        )
        failed_keys = set(failed)
        kept = [(e, d) for e, d in fetched if str(e.task_id) not in failed_keys]
        annotated_keys = {content_key(d) for _, d in kept}
        targets = targets_of(space, [e for e, _ in kept], controls)
        holdout = np.array(
            [split_of(e.task_id, self.settings) == "holdout" for e, _ in kept], dtype=bool
        )

        train = ~holdout
        n_annotated = int(train.sum())
        if not n_annotated:
            # Replay alone would only refit what the model already knows.
            unreadable = len(examples) - len(kept)
            raise NothingToTrain(
                f"none of the {len(examples)} annotated images could be read"
                if examples and unreadable == len(examples)
                else "no annotated training images yet (held-out tasks are never trained on)"
            )
        offline = self._offline(base, space)
        replay_x, replay_y = self._embed_offline(
            job, base, offline.fit_items, offline.fit_targets, annotated_keys
        )
        test_x, test_y = self._embed_offline(
            job, base, offline.test_items, offline.test_targets, annotated_keys
        )
        x = np.concatenate([features[train], replay_x])
        y = np.concatenate([targets[train], replay_y])
        if not y.any():
            raise NothingToTrain("no positive label among the training images yet")
        weight = self._annotation_weight(n_annotated, len(replay_x))
        w = np.concatenate([np.full(n_annotated, weight), np.ones(len(replay_x))])

        self._progress(
            job,
            f"fitting the head on {n_annotated} annotated (x{weight:g}) + {len(replay_x)} "
            "replayed images",
        )
        init = extend_head(head_of(base.model), base.label_space.classes, space.classes)
        pos_weight = class_weights(y, train_config.optim, space.classes).numpy()
        carried = carried_thresholds(space, base, train_config.thresholds.default)
        oof = out_of_fold(x, y, w, init=init, pos_weight=pos_weight, folds=self.settings.folds)
        if oof is None:
            thresholds = carried
            oof_f1 = None
        else:
            thresholds = tune(
                y, oof, train_config.thresholds, space.classes, carried=carried
            ).values
            oof_f1 = macro_f1(y, oof >= np.asarray(thresholds))
        head = fit_head(x, y, init=init, pos_weight=pos_weight, sample_weight=w)

        eval_x = np.concatenate([features[holdout], test_x])
        eval_y = np.concatenate([targets[holdout], test_y])
        candidate_probs = predict_features(eval_x, head)
        candidate_pred = candidate_probs >= np.asarray(thresholds)
        current_pred = None
        if current is not None:
            current_pred = predictions_for(
                space.classes,
                base.label_space.classes,
                predict_features(eval_x, head_of(base.model)),
                base.thresholds,
            )
        decision = decide(
            eval_y,
            candidate_pred,
            current_pred,
            tolerance=self.settings.tolerance,
            min_items=self.settings.min_gate_items,
            candidate_oof_f1=oof_f1,
            sources={"annotated": int(holdout.sum()), "offline_test": len(test_x)},
        )
        metrics: dict[str, Any] = {
            "n_train": n_annotated,
            "n_replay": len(replay_x),
            "annotation_weight": weight,
            "n_failed": len(examples) - len(kept),
            "n_labelled": len(examples),
            "threshold_method": "out-of-fold" if oof is not None else "carried",
            "evaluation": evaluation_of(eval_y, candidate_pred, candidate_probs, space.classes),
            "review": self._review(job, config, space, [e for e, _ in kept], features),
        }
        candidate = model_with_head(base.model, head)
        return self.finish(job, base, candidate, space, thresholds, metrics, decision)

    def _review(
        self,
        job: Job,
        config: LabelConfig,
        space: LabelSpace,
        examples: list[TrainingExample],
        features: np.ndarray,
    ) -> dict[str, Any]:
        """The labels to re-check as of this update (loop/review.py, on the features the update
        has just embedded, held-out tasks included), kept with the version for the project's
        page: the first REVIEW_LISTED, their total, or why there is no list. It never fails the
        update: the review is advice, the new version is the point."""
        started = time.perf_counter()
        try:
            flags = review_examples(
                config.controls,
                space,
                examples,
                features,
                folds=self.settings.folds,
                skipped_level=logging.INFO,
            )
        except NothingToReview as exc:
            return {"flags": [], "n_flagged": 0, "n_judged": len(examples), "reason": str(exc)}
        except Exception:
            logger.exception("job %d: the label review failed; the update goes on", job.id)
            return {"flags": [], "n_flagged": 0, "n_judged": len(examples), "reason": "failed"}
        return {
            "flags": [flag_record(f) for f in flags[:REVIEW_LISTED]],
            "n_flagged": len(flags),
            "n_judged": len(examples),
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _annotation_weight(self, n_annotated: int, n_replay: int) -> float:
        """How much one annotation counts against one replayed offline image: up to
        `annotation_weight_max`, so a few dozen annotations are not drowned by thousands of
        offline images, but never less than 1."""
        if not n_annotated or not n_replay:
            return 1.0
        ratio = n_replay / n_annotated
        return float(min(self.settings.annotation_weight_max, max(1.0, ratio)))

    def _embed_offline(
        self,
        job: Job,
        base: ModelBundle,
        items: Sequence[Path],
        targets: np.ndarray,
        skip_keys: set[str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of offline images, less those a project annotation now labels (the latest
        annotation of an image overrides its offline label)."""
        dim = head_of(base.model).dim
        kept = _not_relabelled(items, skip_keys)
        pairs = [(str(items[i]), data) for i, data in kept]
        rows = [i for i, _ in kept]
        if not pairs:
            return np.zeros((0, dim), np.float32), np.zeros((0, targets.shape[1]), np.float32)
        self._progress(job, f"embedding {len(pairs)} offline images")
        x, failed = embed_images(base, pairs, self.embeddings)
        bad = set(failed)
        keep = [r for (key, _), r in zip(pairs, rows, strict=True) if key not in bad]
        return x, targets[keep]

    # -- full update --------------------------------------------------------------------------

    def full(self, job: Job) -> UpdateOutcome:
        """Fine-tune the whole network from the current weights on the annotations plus the
        offline training data (replayed, so what the model knew is not forgotten)."""
        config, examples = self._inputs(job)
        current = self.models.parent_for(job.project_id, config)
        if current is None:
            raise NothingToTrain("no model to fine-tune yet (a fast update makes one)")
        controls = [c.name for c in config.controls]
        base = current.bundle
        s = self.settings
        train_config = config_of(base)
        optim = train_config.optim.model_copy(
            update={
                "epochs": s.full_epochs,
                "batch_size": s.full_batch_size,
                "lr": s.full_lr or train_config.optim.lr,
                "patience": s.full_patience,
                "num_workers": 0,
            }
        )
        space = label_space_for(base.label_space, config.controls, examples)
        fetched = self._fetch(job, examples)
        annotated = [data for _, data in fetched]
        annotated_keys = {content_key(d) for d in annotated}
        targets = targets_of(space, [e for e, _ in fetched], controls)
        splits = np.array([split_of(e.task_id, s) for e, _ in fetched], dtype=object)
        offline = self._offline(base, space)
        n_replay = max(s.full_replay_min, int(s.full_replay_ratio * int((splits == "train").sum())))
        replay_items, replay_targets = _without(
            offline.train_items[:n_replay], offline.train_targets[:n_replay], annotated_keys
        )
        offline_val, offline_val_y = _without(
            offline.val_items, offline.val_targets, annotated_keys
        )
        offline_test, offline_test_y = _without(
            offline.test_items, offline.test_targets, annotated_keys
        )

        def pick(mask: np.ndarray) -> list[Path | bytes]:
            return [a for a, m in zip(annotated, mask, strict=True) if m]

        train_mask, val_mask, holdout = splits == "train", splits == "val", splits == "holdout"
        train_items: list[Path | bytes] = pick(train_mask) + list(replay_items)
        train_targets = np.concatenate([targets[train_mask], replay_targets])
        if not len(train_items) or not train_targets.any():
            raise NothingToTrain("no labelled training images yet")
        val_items: list[Path | bytes] = pick(val_mask) + list(offline_val)
        val_targets = np.concatenate([targets[val_mask], offline_val_y])

        def loader(
            items: Sequence[Path | bytes], y: np.ndarray, preprocess: PreprocessConfig, **kw: Any
        ) -> torch.utils.data.DataLoader:
            return image_loader(items, y, preprocess, batch_size=optim.batch_size, **kw)

        # Without val tasks the fit still needs a val set (one training image); the thresholds
        # then stay carried.
        fit_val_items, fit_val_targets = (
            (val_items, val_targets) if val_items else (train_items[:1], train_targets[:1])
        )
        val_loader = loader(fit_val_items, fit_val_targets, base.preprocess, train=False)
        model = model_with_head(
            base.model, extend_head(head_of(base.model), base.label_space.classes, space.classes)
        )
        device = resolve_device("auto")
        work_dir = self.models.store(job.project_id).scratch_dir(f"job-{job.id}")
        self._progress(
            job,
            f"fine-tuning on {len(train_items)} images "
            f"({len(replay_items)} replayed from offline data)",
        )

        def on_epoch(row: dict[str, float]) -> None:
            self._progress(
                job, f"epoch {row['epoch']}/{optim.epochs}: val loss {row['val_loss']:.4f}"
            )

        processes = processes_for(s.full_processes)
        ranks: list[dict[str, Any]] = []
        if processes > 1:
            # The ranks are started from the niced thread, so they inherit its priority.
            fitted = run_at_lower_priority(
                s.train_nice,
                fine_tune_distributed,
                processes,
                model,
                train_items,
                train_targets,
                fit_val_items,
                fit_val_targets,
                base.preprocess,
                classes=space.classes,
                optim=optim,
                work_dir=work_dir,
                seed=job.id,
                on_epoch=on_epoch,
            )
            result, ranks = fitted.result, [asdict(r) for r in fitted.ranks]
        else:
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
                on_epoch=on_epoch,
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
        eval_items: list[Path | bytes] = pick(holdout) + list(offline_test)
        eval_true = np.concatenate([targets[holdout], offline_test_y])
        candidate_pred = current_pred = np.zeros((0, len(space)), dtype=bool)
        candidate_probs = np.zeros((0, len(space)))
        if eval_items:
            self._progress(job, f"comparing with the served model on {len(eval_items)} images")
            # One loader for both models: the same items, in the same order (unshuffled).
            eval_loader = loader(eval_items, eval_true, base.preprocess, train=False)
            candidate_probs, eval_true, _, _ = predict(
                model, eval_loader, device, show_progress=False
            )
            current_probs, _, _, _ = predict(
                base.model, eval_loader, torch.device("cpu"), show_progress=False
            )
            candidate_pred = candidate_probs >= np.asarray(thresholds)
            current_pred = predictions_for(
                space.classes, base.label_space.classes, current_probs, base.thresholds
            )
        decision = decide(
            eval_true,
            candidate_pred,
            current_pred,
            tolerance=s.tolerance,
            # No benefit of the doubt for a new backbone: a fine-tune that goes wrong goes
            # wrong by a lot, so a full update must not be worse even on a few items.
            min_items=1,
            sources={"annotated": int(holdout.sum()), "offline_test": len(offline_test)},
        )
        metrics: dict[str, Any] = {
            "n_train": len(train_items),
            "n_replay": len(replay_items),
            "n_val": len(val_items),
            "n_labelled": len(examples),
            "best_epoch": result.best_epoch,
            "processes": processes,
            **({"ranks": ranks} if ranks else {}),
            "threshold_method": "validation" if val_items else "carried",
            "evaluation": evaluation_of(eval_true, candidate_pred, candidate_probs, space.classes),
        }
        return self.finish(job, base, model, space, thresholds, metrics, decision)

    def _offline(self, base: ModelBundle, space: LabelSpace) -> OfflineData:
        """The offline data the model came from, relabelled into `space`, by its own split:
        train and val are replayed, test is only ever evaluated on (by the gate)."""
        empty = OfflineData.empty(len(space))
        source, images = base.manifest.data.get("source"), base.manifest.data.get("images")
        if not source or not images or not Path(source).is_file():
            logger.info("No offline training data to replay (none recorded, or moved)")
            return empty
        raw = dict(base.manifest.training_config.get("data") or {})
        raw.update(allow_new_classes=True)
        try:
            data_config = DataConfig.model_validate(raw)
            reader = load_labelstudio_export if source.endswith(".json") else load_metadata
            data = reader(Path(source), Path(images), data_config)
        except (DataError, ValueError) as exc:
            logger.warning("Offline training data %s cannot be replayed: %s", source, exc)
            return empty
        split_of_image = _recorded_splits(base.path)
        known = space.index()
        parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
        for sample in data.samples:
            parts.get(split_of_image.get(sample.image_id, "train"), parts["train"]).append(sample)
        cap = self.settings.replay_max

        def labelled(samples: Sequence[Sample]) -> tuple[list[Path], np.ndarray]:
            y = space.binarize([n for n in s.all_labels() if n in known] for s in samples)
            return [s.path for s in samples], y

        # replay_max caps what is replayed; train first, then val, then the test share.
        n_train = min(len(parts["train"]), cap)
        n_val = min(len(parts["val"]), cap - n_train)
        return OfflineData(
            *labelled(parts["train"][:n_train]),
            *labelled(parts["val"][:n_val]),
            *labelled(parts["test"][:cap]),
        )

    # -- shared steps -------------------------------------------------------------------------

    def _fetch(
        self, job: Job, examples: Sequence[TrainingExample]
    ) -> list[tuple[TrainingExample, bytes]]:
        self._progress(job, f"fetching {len(examples)} images")
        fetcher = self.fetcher()

        def fetch(example: TrainingExample) -> bytes | None:
            return fetcher.bytes_or_none(
                example.image_ref, task_id=example.task_id, left_out_of="training"
            )

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
        decision: dict[str, Any],
    ) -> UpdateOutcome:
        """Publish the candidate and promote it if the gate said so. A rejected candidate keeps
        its manifest and metrics; the weights of all but the last few rejected ones are pruned."""
        store = self.models.store(job.project_id)
        promote = bool(decision["promote"])
        metrics = {**metrics, "gate": decision}
        # Gate numbers at the top level too, where `labelloop status` and older tools read them.
        for key in ("candidate_f1", "current_f1", "n_items"):
            if key in decision:
                metrics[key] = decision[key]

        def carry_splits(staged: Path, version: str) -> dict[str, Any]:
            # The offline split travels with the lineage, so the gate keeps evaluating on the
            # offline test images and replay keeps leaving them out.
            recorded = base.path / SPLITS_FILE
            if recorded.is_file():
                shutil.copy2(recorded, staged / SPLITS_FILE)
            return {"incremental": metrics}

        published = publish(
            store,
            model=model,
            label_space=space,
            thresholds=thresholds,
            backbone=base.manifest.backbone,
            dropout=base.manifest.dropout,
            preprocess=base.preprocess,
            parent_version=None if base.version == COLD_START else base.version,
            training_config={
                **base.manifest.training_config,
                "incremental": {
                    "kind": job.kind,
                    "trigger": job.trigger,
                    "job": job.id,
                    "project": job.project_id,
                    # Where the parent lives: the project's own lineage, or the base model
                    # (its first version), or nowhere (a cold start).
                    "parent_lineage": _lineage_of(base, store),
                },
            },
            metrics=carry_splits,
            # Carried forward so a later full update can still replay the offline data.
            data=base.manifest.data,
            # `current` moves below, once the version is loaded here.
            make_current=False,
        )
        version = published.version
        if not promote:
            logger.warning("Candidate %s rejected: %s", version, decision["reason"])
            pruned = store.prune_rejected(keep=self.settings.keep_rejected)
            if pruned:
                logger.info("Pruned the weights of rejected candidates %s", ", ".join(pruned))
            return UpdateOutcome(
                JobState.REJECTED,
                f"rejected: {decision['reason']}",
                metrics,
                candidate_version=version,
            )
        logger.info("Candidate %s promoted: %s", version, decision["reason"])
        promoted = load_bundle(published.path)
        # Loaded (its ONNX graph exported and kept beside it) before `current` moves: the
        # first request after the switch does not pay for the load, and an object store
        # receives the graph with the version, so no replica exports it again.
        self.models.put(job.project_id, promoted)
        store.set_current(version, reason="promotion")
        # Embeddings of backbones no longer served are stale for ever (a full update moves the
        # backbone); keep the served one and its parent's, so a rollback by one stays warm.
        self.embeddings.prune({embedding_space(promoted), embedding_space(base)})
        if self.on_promote is not None:
            self.on_promote(job.project_id, version)
        return UpdateOutcome(
            JobState.SUCCEEDED,
            f"promoted: {decision['reason']}",
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
        backbone = resolve_backbone(s.cold_start_backbone, s.cold_start_weights)
        logger.info("Cold start: %s with %s weights", backbone, s.cold_start_weights)
        model = build_model(backbone, len(space), weights=s.cold_start_weights)
        model.eval()
        preprocess = PreprocessConfig(image_size=s.cold_start_image_size)
        manifest = Manifest(
            version=COLD_START,
            created_at="",
            backbone=backbone,
            num_classes=len(space),
            label_groups=space.as_dict(),
            preprocess=preprocess,
            training_config=TrainConfig(
                preprocess=preprocess,
                model=ModelConfig(backbone=backbone, weights=s.cold_start_weights),
            ).model_dump(mode="json"),
        )
        return ModelBundle(model, space, [0.5] * len(space), preprocess, manifest, Path("."))


@dataclass(frozen=True)
class OfflineData:
    """A model's offline training data by split, labelled in a project's label space."""

    train_items: list[Path]
    train_targets: np.ndarray
    val_items: list[Path]
    val_targets: np.ndarray
    test_items: list[Path]
    test_targets: np.ndarray

    @classmethod
    def empty(cls, n_classes: int) -> OfflineData:
        none = np.zeros((0, n_classes), dtype=np.float32)
        return cls([], none, [], none, [], none)

    @property
    def fit_items(self) -> list[Path]:
        """What a head refit replays: train and val (out-of-fold predictions replace val)."""
        return self.train_items + self.val_items

    @property
    def fit_targets(self) -> np.ndarray:
        return np.concatenate([self.train_targets, self.val_targets])


def _not_relabelled(items: Sequence[Path], skip_keys: set[str]) -> list[tuple[int, bytes]]:
    """(index, bytes) of the offline images that can be read and that no project annotation
    labels now (matched by content: the latest annotation of an image overrides its offline
    label)."""
    kept = []
    for i, path in enumerate(items):
        try:
            data = path.read_bytes()
        except OSError as exc:
            logger.debug("Offline image %s unreadable: %s", path, exc)
            continue
        if content_key(data) not in skip_keys:
            kept.append((i, data))
    return kept


def _without(
    items: Sequence[Path], targets: np.ndarray, skip_keys: set[str]
) -> tuple[list[Path], np.ndarray]:
    """Offline images less the unreadable ones and those a project annotation now labels."""
    keep = [i for i, _ in _not_relabelled(items, skip_keys)]
    return [items[i] for i in keep], targets[keep]


def _recorded_splits(version_dir: Path) -> dict[str, str]:
    """image_id -> "train" | "val" | "test" as `labelloop train` split them (splits.csv)."""
    path = version_dir / SPLITS_FILE
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return {row["image_id"]: row["split"] for row in csv.DictReader(handle)}
    except (OSError, KeyError, csv.Error) as exc:
        logger.warning("Cannot read %s (%s): replaying all offline images", path, exc)
        return {}


def evaluation_of(
    y_true: np.ndarray, y_pred: np.ndarray, y_prob: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """The candidate on the gate's items, per class (precision, recall, F1, support, AP) and
    its PR curves: what the project page shows of a version."""
    metrics = compute_metrics(y_true, y_pred, y_prob, classes)
    return {
        "n_items": metrics["n_samples"],
        "f1_macro": metrics.get("f1_macro"),
        "per_class": metrics["per_class"],
        "pr_curves": pr_curve_points(y_true, y_prob, classes) if len(y_true) else {},
    }
