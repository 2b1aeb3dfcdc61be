"""Batched, pipelined prediction for Label Studio tasks.

Images are downloaded and decoded by worker threads while the request thread runs batched
forward passes; at most `window` tasks are in flight, so memory stays flat however many tasks a
*Retrieve Predictions* click sends.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.label_config import (
    ControlMapping,
    LabelConfig,
    map_controls,
    parse_label_config,
)
from labelloop.labelstudio.protocol import Task, TaskPrediction
from labelloop.labelstudio.results import (
    ResultValidationError,
    build_predictions,
    validate_prediction,
)
from labelloop.labelstudio.urls import ImageFetchError
from labelloop.ml.transforms import eval_transform, resize_size
from labelloop.runtime.inference import Runner, build_runner
from labelloop.store import ModelBundle, store_onnx, stored_onnx

logger = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class LoadedModel:
    """An immutable snapshot: a request uses one from start to end, whatever swaps meanwhile."""

    bundle: ModelBundle
    transform: Callable[[Image.Image], torch.Tensor]
    thresholds: np.ndarray
    runner: Runner

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def decode_side(self) -> int:
        """The shorter side the eval transform resizes to: decoding finer than that is waste."""
        return resize_size(self.bundle.preprocess)

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, *, runtime: str = "auto") -> LoadedModel:
        runner = build_runner(
            bundle.model,
            image_size=bundle.preprocess.image_size,
            runtime=runtime,
            graph=stored_onnx(bundle),
            on_export=lambda graph: store_onnx(bundle, graph),
        )
        logger.info("%s runs on %s", bundle.version, runner.name)
        return cls(
            bundle,
            eval_transform(bundle.preprocess),
            np.asarray(bundle.thresholds, dtype=np.float32),
            runner,
        )


@lru_cache(maxsize=64)
def _resolve_cached(
    digest: str, xml: str, classes: tuple[str, ...]
) -> tuple[LabelConfig, ControlMapping]:
    config = parse_label_config(xml)
    return config, map_controls(config, classes)


def resolve_config(xml: str, classes: Sequence[str]) -> tuple[LabelConfig, ControlMapping]:
    """Parse a label config and bind it to the model's classes, once per distinct pair.

    Label Studio sends the whole config with every request; parsing it per task would be waste.
    Raises LabelConfigError when the config is unusable for this model.
    """
    return _resolve_cached(hashlib.sha256(xml.encode()).hexdigest(), xml, tuple(classes))


@dataclass
class PredictStats:
    tasks: int = 0
    predicted: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    forward_seconds: float = 0.0
    # Task id -> the backbone embedding its forward pass computed, when asked for and the
    # runtime gives them (the labelling order ranks the pool with them).
    features: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else 0.0


_Prepared = tuple[int, torch.Tensor | None, str | None]  # position, tensor, failure reason


class Predictor:
    def __init__(self, *, batch_size: int = 16, workers: int = 8) -> None:
        self.batch_size = batch_size
        self.window = batch_size * 2 + workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
        # Two cores: concurrent forward passes only fight over them; serialising is faster.
        self._forward_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def predict(
        self,
        tasks: Sequence[Task],
        label_config: str,
        fetcher: ImageFetcher,
        *,
        model: LoadedModel,
        features: bool = False,
    ) -> tuple[list[TaskPrediction | list], PredictStats]:
        """One item per task, in order: a prediction, or [] when its image failed.

        `model` is a snapshot: a long pre-annotation run keeps one across many calls, whatever
        is promoted meanwhile. `features`: also keep each task's backbone embedding from the
        same forward pass in `stats.features`, where the runtime gives it.
        """
        started = time.perf_counter()
        config, mapping = resolve_config(label_config, model.classes)
        image_key = mapping.bindings[0].control.image_key
        stats = PredictStats(tasks=len(tasks))
        results: list[TaskPrediction | list] = [[] for _ in tasks]

        batch_positions: list[int] = []
        batch_tensors: list[torch.Tensor] = []
        last_log = started

        def flush() -> None:
            if not batch_tensors:
                return
            t0 = time.perf_counter()
            probs, vectors = self._forward(model, torch.stack(batch_tensors), features)
            stats.forward_seconds += time.perf_counter() - t0
            if vectors is not None:
                for position, vector in zip(batch_positions, vectors, strict=True):
                    stats.features[tasks[position].id] = vector
            for position, prediction in zip(
                batch_positions,
                build_predictions(probs, model.thresholds, mapping, model.version),
                strict=True,
            ):
                try:
                    validate_prediction(prediction, config)
                except ResultValidationError as exc:
                    logger.error(
                        "Dropping an invalid prediction for task %s: %s", tasks[position].id, exc
                    )
                    stats.failed["invalid result"] += 1
                    continue
                results[position] = prediction
                stats.predicted += 1
            batch_positions.clear()
            batch_tensors.clear()

        for position, tensor, reason in self._prepared(tasks, image_key, model, fetcher):
            if tensor is None:
                stats.failed[reason or "unknown"] += 1
                logger.warning("Task %s gets no prediction: %s", tasks[position].id, reason)
                continue
            batch_positions.append(position)
            batch_tensors.append(tensor)
            if len(batch_tensors) >= self.batch_size:
                flush()
            now = time.perf_counter()
            if now - last_log >= _PROGRESS_EVERY_S:
                done = position + 1
                logger.info(
                    "predict: %d/%d tasks, %.1f tasks/s", done, len(tasks), done / (now - started)
                )
                last_log = now
        flush()
        stats.seconds = time.perf_counter() - started
        if len(tasks) > 1:
            logger.info(
                "predict: %d tasks in %.2f s (%.1f tasks/s; forward %.2f s), %d failed",
                len(tasks),
                stats.seconds,
                stats.throughput,
                stats.forward_seconds,
                sum(stats.failed.values()),
            )
        return results, stats

    def _forward(
        self, model: LoadedModel, batch: torch.Tensor, features: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        with self._forward_lock:
            return model.runner.with_features(batch) if features else (model.runner(batch), None)

    def _prepared(
        self, tasks: Sequence[Task], image_key: str, model: LoadedModel, fetcher: ImageFetcher
    ):
        """Yield (position, tensor or None, reason) in task order, keeping `window` in flight."""
        in_flight: deque[Future[_Prepared]] = deque()
        for position, task in enumerate(tasks):
            in_flight.append(self._pool.submit(_prepare, position, task, image_key, model, fetcher))
            if len(in_flight) >= self.window:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def _prepare(
    position: int, task: Task, image_key: str, model: LoadedModel, fetcher: ImageFetcher
) -> _Prepared:
    url = task.data.get(image_key)
    if not isinstance(url, str) or not url:
        return position, None, f"task data has no {image_key!r} image URL"
    try:
        image = fetcher.fetch_image(url, task_id=task.id, min_side=model.decode_side)
        return position, model.transform(image), None
    except ImageFetchError as exc:
        return position, None, exc.reason
    except Exception as exc:  # noqa: BLE001 - one bad image must not sink the batch
        logger.exception("Unexpected error preparing task %s", task.id)
        return position, None, f"{type(exc).__name__}"
