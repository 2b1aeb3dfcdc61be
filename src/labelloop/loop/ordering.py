"""The labelling order a project's prediction scores carry (docs/active-learning.md).

Label Studio's Data Manager sorts by *Prediction score*, so the score pushed with each
unlabelled task's prediction is its place in the annotators' queue. With the "margin" strategy
that score is the served confidence itself; with the greedy strategies of `ml.selection` the
score of a task depends on the whole unlabelled pool (its pick order), so it is computed when a
pre-annotation run has predicted every unlabelled task of the project (the refresh after each
promotion does), from the served model's backbone embeddings of the pool and of the labelled
tasks. The embeddings come from the project's `EmbeddingCache`: a fast update keeps the
backbone, so after the first refresh of a backbone they are read, not computed. Past the
planned places the order is margin order, so a run pushes margins as it predicts and then
changes only the planned places' scores (`planned`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.loop.priority import run_at_lower_priority
from labelloop.ml.embeddings import EmbeddingCache, embed_images
from labelloop.ml.selection import (
    DEFAULT_HORIZON,
    DEFAULT_STRATEGY,
    Strategy,
    priority_from_margins,
)
from labelloop.runtime.predictor import LoadedModel

logger = logging.getLogger(__name__)

__all__ = ["PoolTask", "LabellingOrder"]

# As the full fine-tune: embedding a pool is background work that must not slow /predict.
_EMBED_NICE = 10


@dataclass(frozen=True)
class PoolTask:
    """A task of the project: its id and image URL (and, when unlabelled, its margin)."""

    id: int
    url: str
    margin: float = 1.0


@dataclass(frozen=True)
class LabellingOrder:
    """How unlabelled tasks are scored: `strategy` over the first `horizon` places."""

    strategy: Strategy = DEFAULT_STRATEGY
    horizon: int = DEFAULT_HORIZON
    embeddings: EmbeddingCache | None = None
    fetch_workers: int = 8

    @property
    def needs_pool(self) -> bool:
        """Whether a score depends on the other tasks (so only a whole-pool run can set it)."""
        return self.strategy != "margin"

    def scores(
        self,
        model: LoadedModel,
        fetcher: ImageFetcher,
        unlabelled: Sequence[PoolTask],
        labelled: Sequence[PoolTask],
        *,
        cancel: threading.Event | None = None,
    ) -> np.ndarray:
        """The priority score of each of `unlabelled`, in [0, 1], lower = label first.

        A task whose image cannot be embedded now keeps its margin, placed after the picks as
        every unplanned task is; a labelled task whose image cannot be had is left out of the
        distances.
        """
        return self._scores(model, fetcher, unlabelled, labelled, cancel, {})[0]

    def planned(
        self,
        model: LoadedModel,
        fetcher: ImageFetcher,
        unlabelled: Sequence[PoolTask],
        labelled: Sequence[PoolTask],
        *,
        cancel: threading.Event | None = None,
        features: dict[int, np.ndarray] | None = None,
    ) -> dict[int, float]:
        """The places the strategy plans, as the scores Label Studio is given for them: task
        id -> -1 + j / k for the j-th of the k planned tasks, so that they sort before every
        margin (>= 0), in order. Every other task keeps its margin, which already sorts it
        where `scores` puts it (the tail is in margin order), so a run that pushed margins as
        it went changes only these `horizon` scores afterwards. `features`: task id -> the
        embedding the run's forward pass gave (runtime.Predictor), so those tasks' images are
        neither fetched nor embedded again."""
        scores, k = self._scores(model, fetcher, unlabelled, labelled, cancel, features or {})
        first = np.argsort(scores, kind="stable")[:k]
        return {unlabelled[int(i)].id: round(-1.0 + j / k, 6) for j, i in enumerate(first)}

    def _scores(
        self,
        model: LoadedModel,
        fetcher: ImageFetcher,
        unlabelled: Sequence[PoolTask],
        labelled: Sequence[PoolTask],
        cancel: threading.Event | None,
        given: dict[int, np.ndarray],
    ) -> tuple[np.ndarray, int]:
        """`scores`, and how many places they plan (those score below every other)."""
        margins = np.clip(np.array([t.margin for t in unlabelled], dtype=np.float64), 0.0, 1.0)
        if not self.needs_pool or not unlabelled:
            return margins, 0
        started = time.perf_counter()
        pool, pool_rows = self._pool(model, fetcher, unlabelled, cancel, given)
        known, _ = self._embed(model, fetcher, labelled, cancel)
        n = len(pool_rows)
        horizon = min(self.horizon, n)
        h = horizon / n if n else 0.0
        # Tasks without an embedding: in margin order after the picks, as the ordered tail is.
        scores = h + (1.0 - h) * margins
        if n:
            scores[pool_rows] = priority_from_margins(
                margins[pool_rows],
                strategy=self.strategy,
                unlabelled=pool,
                labelled=known if len(known) else None,
                horizon=horizon,
            )
        logger.info(
            "Labelling order (%s) of %d unlabelled tasks against %d labelled in %.1f s",
            self.strategy,
            len(unlabelled),
            len(known),
            time.perf_counter() - started,
        )
        return scores, horizon if n else 0

    def _pool(
        self,
        model: LoadedModel,
        fetcher: ImageFetcher,
        tasks: Sequence[PoolTask],
        cancel: threading.Event | None,
        given: dict[int, np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        """`_embed` of the tasks, the `given` embeddings used as they are."""
        missing = [i for i, t in enumerate(tasks) if t.id not in given]
        if len(missing) == len(tasks):
            return self._embed(model, fetcher, tasks, cancel)
        computed, computed_rows = self._embed(model, fetcher, [tasks[i] for i in missing], cancel)
        vectors = {i: given[t.id] for i, t in enumerate(tasks) if t.id in given}
        vectors.update({missing[int(r)]: v for r, v in zip(computed_rows, computed, strict=True)})
        rows = np.array(sorted(vectors), dtype=np.int64)
        return np.stack([vectors[int(i)] for i in rows]).astype(np.float32), rows

    def _embed(
        self,
        model: LoadedModel,
        fetcher: ImageFetcher,
        tasks: Sequence[PoolTask],
        cancel: threading.Event | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings of the tasks whose image can be had, and those tasks' positions."""

        def fetch(task: PoolTask) -> bytes | None:
            if cancel is not None and cancel.is_set():
                return None
            return fetcher.bytes_or_none(
                task.url, task_id=task.id, left_out_of="the labelling order"
            )

        with ThreadPoolExecutor(max(1, self.fetch_workers), thread_name_prefix="order") as pool:
            fetched = list(pool.map(fetch, tasks))
        images = [(str(i), data) for i, data in enumerate(fetched) if data is not None]
        present = [int(key) for key, _ in images]
        features, failed = run_at_lower_priority(
            _EMBED_NICE, embed_images, model.bundle, images, self.embeddings
        )
        failed_rows = {int(key) for key in failed}
        rows = np.array([i for i in present if i not in failed_rows], dtype=np.int64)
        return features, rows
