"""The background trainer: turns ledger changes into new model versions, off the request path.

One job at a time in one thread. Requests while a job runs coalesce into a single follow-up per
project. A *fast update* refits the head on cached backbone embeddings and re-tunes thresholds;
the candidate is compared with the current model on a held-out share of annotated tasks that is
never trained on, and promoted only if it is not worse by more than a tolerance.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader

from labelloop.config import DataConfig, OptimConfig, PreprocessConfig
from labelloop.labels import LabelSpace
from labelloop.labelstudio.annotations import record_from_task_annotation
from labelloop.labelstudio.client import LabelStudioAPIError, LabelStudioClient
from labelloop.labelstudio.export import load_labelstudio_export
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.label_config import (
    ChoicesControl,
    LabelConfig,
    LabelConfigError,
    parse_label_config,
)
from labelloop.labelstudio.urls import ImageFetchError
from labelloop.loop.ledger import Job, Ledger, ReconcileResult, TrainingExample
from labelloop.loop.runner import run_at_lower_priority
from labelloop.ml.data import DataError, load_metadata
from labelloop.ml.dataset import ImageDataset, collate_skip_none
from labelloop.ml.embeddings import EmbeddingCache, embed_images
from labelloop.ml.head import extend_head, fit_head, head_of, model_with_head, predict_features
from labelloop.ml.model import build_model
from labelloop.ml.splits import compute_pos_weight
from labelloop.ml.thresholds import tune_thresholds
from labelloop.ml.train import fit, predict, resolve_device
from labelloop.ml.transforms import eval_transform, resize_size, train_decode_side, train_transform
from labelloop.runtime.predictor import ModelHolder
from labelloop.store import (
    ModelBundle,
    ModelStore,
    StoreError,
    load_bundle,
    manifest_for,
    write_model_files,
)

logger = logging.getLogger(__name__)

FAST = "fast"
FULL = "full"


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


class Trainer:
    def __init__(
        self,
        *,
        store: ModelStore,
        ledger: Ledger,
        holder: ModelHolder,
        fetcher: Callable[[], ImageFetcher],
        embeddings: EmbeddingCache,
        settings: TrainerSettings,
        label_studio: Callable[[], LabelStudioClient | None] | None = None,
        on_promote: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.holder = holder
        self.fetcher = fetcher
        self.embeddings = embeddings
        self.settings = settings
        self.label_studio = label_studio
        self.on_promote = on_promote
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._request_lock = threading.Lock()
        self.current_job: Job | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        recovered = self.ledger.recover_interrupted()
        for job in recovered:
            logger.warning("Re-queued job %d of project %d after a restart", job.id, job.project_id)
        self._thread = threading.Thread(target=self._loop, name="trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    # -- requests ----------------------------------------------------------------------------

    def request(self, project_id: int, kinds: Sequence[str], trigger: str) -> list[Job]:
        """Queue jobs; a kind already queued for the project is not queued twice."""
        jobs = []
        with self._request_lock:
            queued = {(j.project_id, j.kind): j for j in self.ledger.pending_jobs()}
            for kind in kinds:
                existing = queued.get((project_id, kind))
                jobs.append(existing or self.ledger.create_job(project_id, kind, trigger))
        self._wake.set()
        return jobs

    def notify_change(self) -> None:
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------

    def reconcile(self, project_id: int) -> ReconcileResult | None:
        """Bring the ledger in line with Label Studio: recovers webhooks that never arrived
        (backend down, 1 s timeout) and deletions made while we were not listening."""
        client = self.label_studio() if self.label_studio is not None else None
        if client is None:
            logger.info(
                "Cannot reconcile project %d: no Label Studio URL and token yet", project_id
            )
            return None
        as_of = time.time()
        try:
            with client:
                tasks = client.export_annotated(project_id)
                config = self.ledger.label_config(project_id)
                if config is None:
                    config = client.get_project(project_id).get("label_config")
                    if config:
                        self.ledger.set_label_config(project_id, config)
        except LabelStudioAPIError as exc:
            logger.warning("Reconciling project %d with Label Studio failed: %s", project_id, exc)
            return None
        records = [
            record_from_task_annotation(project_id, task, annotation, config)
            for task in tasks
            for annotation in task.get("annotations") or []
        ]
        result = self.ledger.reconcile(project_id, records, as_of=as_of)
        logger.info(
            "Reconciled project %d with Label Studio: %d added, %d updated, %d deleted",
            project_id,
            result.added,
            result.updated,
            result.deleted,
        )
        return result

    def _reconcile_all(self) -> None:
        for project_id in self.ledger.projects():
            try:
                self.reconcile(project_id)
            except Exception:  # noqa: BLE001 - start-up must not fail because Label Studio is down
                logger.exception("Reconciling project %d at start-up failed", project_id)

    def _loop(self) -> None:
        self._reconcile_all()
        while not self._stop.is_set():
            self._wake.wait(self.settings.poll_seconds)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._follow_current()
                self._queue_auto_training()
                pending = self.ledger.pending_jobs()
                if pending:
                    self._run(pending[0])
            except Exception:  # noqa: BLE001 - the trainer thread must outlive any one failure
                logger.exception("Trainer loop error")
                time.sleep(self.settings.poll_seconds)

    def _follow_current(self) -> None:
        """Serve what `current` names, so `labelloop rollback` takes effect without a restart."""
        wanted = self.store.current_version()
        served = self.holder.current.version if self.holder.current is not None else None
        if wanted is None or wanted == served:
            return
        try:
            bundle = load_bundle(self.store.version_dir(wanted))
        except StoreError as exc:
            logger.error(
                "current names %s, which cannot be loaded (%s); still serving %s",
                wanted,
                exc,
                served,
            )
            return
        self.holder.swap(self.holder.load(bundle))

    def _last_trained_seq(self, project_id: int) -> int:
        for job in self.ledger.jobs(project_id=project_id, limit=50):
            if job.state in ("succeeded", "rejected", "skipped") and job.trained_seq is not None:
                return int(job.trained_seq)
        return 0

    def _queue_auto_training(self) -> None:
        now = time.time()
        for project_id in self.ledger.projects():
            seq = self.ledger.change_seq(project_id)
            pending = seq - self._last_trained_seq(project_id)
            if pending <= 0:
                continue
            last_change = self.ledger.last_change_at(project_id) or now
            if (
                pending >= self.settings.auto_train_after
                or now - last_change >= self.settings.quiet_seconds
            ):
                if not any(j.project_id == project_id for j in self.ledger.pending_jobs()):
                    logger.info("Auto-training project %d after %d change(s)", project_id, pending)
                    self.request(project_id, [FAST], "auto")

    def _run(self, job: Job) -> None:
        started = time.time()
        seq = self.ledger.change_seq(job.project_id)
        job = self.ledger.update_job(
            job.id, state="running", started_at=started, progress="starting"
        )
        self.current_job = job
        try:
            if job.trigger == "start_training" and job.kind == FAST:
                self._progress(job, "reconciling with Label Studio")
                self.reconcile(job.project_id)
                seq = self.ledger.change_seq(job.project_id)
            update = self._fast_update if job.kind == FAST else self._full_update
            outcome = update(job)
        except Exception as exc:  # noqa: BLE001 - a failed job is recorded, the last model serves on
            logger.exception("Job %d (%s, project %d) failed", job.id, job.kind, job.project_id)
            self.ledger.update_job(
                job.id,
                state="failed",
                finished_at=time.time(),
                error=f"{type(exc).__name__}: {exc}",
                trained_seq=seq,
            )
        else:
            self.ledger.update_job(job.id, finished_at=time.time(), trained_seq=seq, **outcome)
        finally:
            self.current_job = None

    def _progress(self, job: Job, text: str) -> None:
        self.ledger.update_job(job.id, progress=text)
        logger.info("job %d: %s", job.id, text)

    def _inputs(self, job: Job) -> tuple[LabelConfig, list[TrainingExample]] | str:
        """The project's parsed label config and training set, or why there is nothing to do."""
        config_xml = self.ledger.label_config(job.project_id)
        if config_xml is None:
            return "the project's label config is not known yet"
        try:
            config = parse_label_config(config_xml)
        except LabelConfigError as exc:
            # A config Label Studio would not accept either: nothing to train, no traceback.
            return f"the project's label config is unusable: {exc}"
        return config, self.ledger.training_set(job.project_id)

    # -- fast update --------------------------------------------------------------------------

    def _fast_update(self, job: Job) -> dict[str, Any]:
        inputs = self._inputs(job)
        if isinstance(inputs, str):
            return {"state": "skipped", "error": inputs}
        config, examples = inputs
        controls = [c.name for c in config.controls]
        current = self.holder.current
        base = current.bundle if current is not None else None
        if base is None:
            missing = self._cold_start_shortfall(examples, controls)
            if missing:
                return {"state": "skipped", "error": f"cold start: waiting for labels ({missing})"}
            base = self._cold_start_bundle(config)

        space = _label_space_for(base.label_space, config.controls, examples)
        fetched = self._fetch(job, examples)
        self._progress(job, f"embedding {len(fetched)} images")
        features, failed = embed_images(
            base, [(str(e.task_id), data) for e, data in fetched], self.embeddings
        )
        failed_keys = set(failed)
        kept = [e for e, _ in fetched if str(e.task_id) not in failed_keys]
        targets = _targets(space, kept, controls)
        splits = np.array([split_of(e.task_id, self.settings) for e in kept])
        train = splits == "train"
        if not train.any() or not targets[train].any():
            return {"state": "skipped", "error": "no labelled training images yet"}

        self._progress(job, f"fitting the head on {int(train.sum())} images")
        init = extend_head(head_of(base.model), base.label_space.classes, space.classes)
        pos_weight, _ = compute_pos_weight(targets[train], min_weight=1.0, max_weight=10.0)
        head = fit_head(features[train], targets[train], init=init, pos_weight=pos_weight.numpy())

        val, holdout = splits == "val", splits == "holdout"
        thresholds = _tuned(targets[val], predict_features(features[val], head), space, base)
        current_probs = (
            predict_features(features[holdout], head_of(base.model)) if current else None
        )
        metrics = self._gate_metrics(
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
        return self._finish(
            job, base, model_with_head(base.model, head), space, thresholds, metrics
        )

    # -- full update --------------------------------------------------------------------------

    def _full_update(self, job: Job) -> dict[str, Any]:
        """Fine-tune the whole network from the current weights on the annotations plus the
        offline training data (replayed, so what the model knew is not forgotten)."""
        current = self.holder.current
        if current is None:
            return {
                "state": "skipped",
                "error": "no model to fine-tune yet (a fast update makes one)",
            }
        inputs = self._inputs(job)
        if isinstance(inputs, str):
            return {"state": "skipped", "error": inputs}
        config, examples = inputs
        controls = [c.name for c in config.controls]
        base = current.bundle
        space = _label_space_for(base.label_space, config.controls, examples)
        fetched = self._fetch(job, examples)
        annotated = [data for _, data in fetched]
        targets = _targets(space, [e for e, _ in fetched], controls)
        splits = np.array([split_of(e.task_id, self.settings) for e, _ in fetched])
        replay_items, replay_targets = self._replay(base, space)
        train_items = [a for a, s in zip(annotated, splits, strict=True) if s == "train"]
        train_items += replay_items
        train_targets = np.concatenate([targets[splits == "train"], replay_targets])
        if not len(train_items) or not train_targets.any():
            return {"state": "skipped", "error": "no labelled training images yet"}

        s = self.settings
        transform_train = train_transform(base.preprocess)
        transform_eval = eval_transform(base.preprocess)

        # Annotated images are usually photos far larger than the model input: decode them
        # only as finely as the transforms need (JPEG DCT scaling), as serving does.
        eval_side = resize_size(base.preprocess)

        def loader(
            items: Sequence[Path | bytes],
            targets: np.ndarray,
            transform: Callable,
            shuffle: bool = False,
            min_side: int = eval_side,
        ) -> DataLoader:
            dataset = ImageDataset(items, targets, transform, min_side=min_side)
            return DataLoader(
                dataset, batch_size=s.full_batch_size, shuffle=shuffle, collate_fn=collate_skip_none
            )

        val_mask, holdout = splits == "val", splits == "holdout"
        val_items = [a for a, m in zip(annotated, val_mask, strict=True) if m]
        val_loader = loader(
            val_items or train_items[:1],
            targets[val_mask] if val_items else train_targets[:1],
            transform_eval,
        )
        model = model_with_head(
            base.model, extend_head(head_of(base.model), base.label_space.classes, space.classes)
        )
        pos_weight, _ = compute_pos_weight(train_targets, min_weight=1.0, max_weight=10.0)
        device = resolve_device("auto")
        work_dir = self.store.root / "work" / f"job-{job.id}"
        self._progress(
            job,
            f"fine-tuning on {len(train_items)} images "
            f"({len(replay_items)} replayed from offline data)",
        )
        result = run_at_lower_priority(
            s.train_nice,
            fit,
            model,
            loader(
                train_items,
                train_targets,
                transform_train,
                shuffle=True,
                min_side=train_decode_side(base.preprocess),
            ),
            val_loader,
            pos_weight=pos_weight,
            config=OptimConfig(
                epochs=s.full_epochs,
                batch_size=s.full_batch_size,
                lr=s.full_lr,
                patience=s.full_patience,
                monitor="loss",
            ),
            device=device,
            work_dir=work_dir,
            show_progress=False,
            on_epoch=lambda row: self._progress(
                job, f"epoch {row['epoch']}/{s.full_epochs}: val loss {row['val_loss']:.4f}"
            ),
        )
        shutil.rmtree(work_dir, ignore_errors=True)
        model.cpu().eval()

        val_probs, val_true, _, _ = predict(model, val_loader, device, show_progress=False)
        thresholds = (
            _tuned(val_true, val_probs, space, base)
            if val_items
            else _carried_thresholds(space, base)
        )
        holdout_items = [a for a, m in zip(annotated, holdout, strict=True) if m]
        holdout_true = targets[holdout]
        candidate_probs = current_probs = np.zeros((0, len(space)))
        if holdout_items:
            candidate_probs, _, _, _ = predict(
                model,
                loader(holdout_items, holdout_true, transform_eval),
                device,
                show_progress=False,
            )
            current_probs, _, _, _ = predict(
                base.model,
                loader(holdout_items, holdout_true, eval_transform(base.preprocess)),
                torch.device("cpu"),
                show_progress=False,
            )
        metrics = self._gate_metrics(
            space, holdout_true, candidate_probs, thresholds, base, current_probs
        )
        metrics.update(
            n_train=len(train_items),
            n_replay=len(replay_items),
            n_val=len(val_items),
            best_epoch=result.best_epoch,
        )
        return self._finish(job, base, model, space, thresholds, metrics)

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
            loader = load_labelstudio_export if source.endswith(".json") else load_metadata
            data = loader(Path(source), Path(images), data_config)
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

    def _gate_metrics(
        self,
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
        metrics["candidate_f1"] = float(
            f1_score(y_true, candidate, average="macro", zero_division=0)
        )
        if current is None or current_probs is None:
            metrics["current_f1"] = 0.0
            return metrics
        index = {name: i for i, name in enumerate(current.label_space.classes)}
        current_pred = np.zeros_like(candidate)
        for j, name in enumerate(space.classes):
            if name in index:
                i = index[name]
                current_pred[:, j] = current_probs[:, i] >= current.thresholds[i]
        metrics["current_f1"] = float(
            f1_score(y_true, current_pred, average="macro", zero_division=0)
        )
        return metrics

    def _finish(
        self,
        job: Job,
        base: ModelBundle,
        model: torch.nn.Module,
        space: LabelSpace,
        thresholds: list[float],
        metrics: dict[str, Any],
    ) -> dict[str, Any]:
        """Publish the candidate (kept even when rejected) and promote it if it passes the gate."""
        current = self.holder.current
        promote = current is None or (
            metrics["candidate_f1"] >= metrics["current_f1"] - self.settings.tolerance
        )
        version = self.store.next_version_name()
        with self.store.staging() as staged:
            write_model_files(staged, model, space, thresholds)
            manifest = manifest_for(
                version=version,
                backbone=base.manifest.backbone,
                dropout=base.manifest.dropout,
                label_space=space,
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
            )
            self.store.publish(staged, manifest, make_current=promote)
        result: dict[str, Any] = {"metrics": metrics, "candidate_version": version}
        if not promote:
            logger.warning("Candidate %s rejected: %s", version, metrics)
            result.update(state="rejected", progress="rejected: worse on held-out tasks")
            return result
        self.holder.swap(self.holder.load(load_bundle(self.store.version_dir(version))))
        if self.on_promote is not None:
            self.on_promote(version)
        result.update(state="succeeded", promoted_version=version, progress="promoted")
        return result

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
        from labelloop.store import Manifest

        space = LabelSpace.from_mapping({c.name: list(c.choices) for c in config.controls})
        model = build_model(
            self.settings.cold_start_backbone, len(space), weights=self.settings.cold_start_weights
        )
        model.eval()
        preprocess = PreprocessConfig(image_size=self.settings.cold_start_image_size)
        manifest = Manifest(
            version="cold-start",
            created_at="",
            backbone=self.settings.cold_start_backbone,
            num_classes=len(space),
            label_groups=space.as_dict(),
            preprocess=preprocess,
        )
        return ModelBundle(model, space, [0.5] * len(space), preprocess, manifest, Path("."))


def _targets(
    space: LabelSpace, examples: Sequence[TrainingExample], controls: Sequence[str]
) -> np.ndarray:
    known = space.index()
    return space.binarize(
        [name for control in controls for name in e.labels.get(control, ()) if name in known]
        for e in examples
    )


def _carried_thresholds(space: LabelSpace, base: ModelBundle) -> list[float]:
    previous = dict(zip(base.label_space.classes, base.thresholds, strict=True))
    return [previous.get(name, 0.5) for name in space.classes]


def _tuned(
    y_true: np.ndarray, probs: np.ndarray, space: LabelSpace, base: ModelBundle
) -> list[float]:
    """Thresholds tuned on validation; too few positives to tune keeps the class's old one."""
    carried = _carried_thresholds(space, base)
    tuned = tune_thresholds(y_true, probs, min_positives=2)
    return [
        old if method == "default" else float(t)
        for old, t, method in zip(carried, tuned.thresholds, tuned.methods, strict=True)
    ]


def _label_space_for(
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
