"""Pre-annotate a whole project: predict its tasks and push the predictions in bulk.

*Retrieve Predictions* costs Label Studio ~37 ms per task on a small machine whatever the backend
does; `POST /api/projects/<id>/import/predictions` stores thousands in seconds. So we list the
tasks, predict them with the server's batched pipeline, and push the predictions in the
background while the next ones are predicted — an interrupted run loses at most what was
predicted since the last push, and `missing` mode resumes where it stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labelloop.labelstudio.client import LabelStudioClient
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.protocol import Task, TaskPrediction
from labelloop.loop.ordering import LabellingOrder, PoolTask
from labelloop.runtime.predictor import LoadedModel, Predictor, resolve_config

logger = logging.getLogger(__name__)

_LIST_PAGE = 500
# Concurrent score changes of the planned places (_plan).
_PLAN_WORKERS = 4
# After a push that took d seconds, the next one waits _PUSH_SPACING × d (see _Pusher).
_PUSH_SPACING = 4.0


@dataclass
class PreannotateSummary:
    model_version: str
    tasks: int = 0
    predicted: int = 0
    skipped: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    list_seconds: float = 0.0
    forward_seconds: float = 0.0
    pushes: int = 0
    cancelled: bool = False
    # What the pushed scores mean: "margin" (the served confidence) or the labelling-order
    # strategy that ranked the whole unlabelled pool (loop.ordering).
    scores: str = "margin"
    order_seconds: float = 0.0
    first_stored_at: float | None = None  # wall clock: the first predictions were stored

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "tasks": self.tasks,
            "predicted": self.predicted,
            "skipped": self.skipped,
            "failed": dict(self.failed),
            "seconds": round(self.seconds, 2),
            "list_seconds": round(self.list_seconds, 2),
            "forward_seconds": round(self.forward_seconds, 2),
            "pushes": self.pushes,
            "cancelled": self.cancelled,
            "scores": self.scores,
            "order_seconds": round(self.order_seconds, 2),
            "first_stored_at": self.first_stored_at,
        }


@dataclass
class Work:
    tasks: list[dict[str, Any]]  # to predict, in project order
    skipped: int
    # Predictions of the current version that the new ones replace (`--all`), by task id.
    replaced: dict[int, list[int]] = field(default_factory=dict)
    # True when `replaced` is every prediction of the version in the project: one bulk delete.
    replaces_whole_version: bool = False
    # The project's labelled tasks, and whether `tasks` holds every unlabelled one (only then
    # can a labelling order that ranks the pool be computed).
    labelled: list[dict[str, Any]] = field(default_factory=list)
    whole_pool: bool = False


def tasks_to_predict(
    client: LabelStudioClient,
    project: Mapping[str, Any],
    model_version: str,
    *,
    missing_only: bool,
    unlabelled_only: bool = False,
    limit: int | None = None,
) -> Work:
    """The tasks of ``project`` (as Label Studio returns it) that need a prediction, and the
    predictions they replace."""
    project_id = int(project["id"])
    if project.get("evaluate_predictions_automatically"):
        # Listing through the Data Manager would make Label Studio call the backend for every
        # page of tasks without a prediction; the export never does, but is ~7x slower.
        labelled: Callable[[Mapping[str, Any]], bool] = _labelled
        listed = client.export_tasks(project_id)
    else:
        listed = client.list_tasks(
            project_id, page_size=_LIST_PAGE, include=("id", "data", "total_annotations")
        )
        labelled = _counted_labelled
    tasks = [{"id": t["id"], "data": t.get("data") or {}, "labelled": labelled(t)} for t in listed]
    current: dict[int, list[int]] = defaultdict(list)
    for prediction in client.predictions(project_id=project_id):
        if prediction.get("model_version") == model_version:
            current[int(prediction["task"])].append(int(prediction["id"]))
    skip: set[int] = set(current) if missing_only else set()
    if unlabelled_only:
        skip |= {int(t["id"]) for t in tasks if t["labelled"]}
    wanted = [t for t in tasks if int(t["id"]) not in skip]
    skipped = len(tasks) - len(wanted)  # by the filters; tasks past `limit` are not "skipped"
    if limit is not None:
        wanted = wanted[:limit]
    wanted_ids = {int(t["id"]) for t in wanted}
    replaced = {task: ids for task, ids in current.items() if task in wanted_ids}
    return Work(
        tasks=wanted,
        skipped=skipped,
        replaced=replaced,
        replaces_whole_version=bool(replaced) and len(replaced) == len(current),
        labelled=[t for t in tasks if t["labelled"]],
        whole_pool=all(int(t["id"]) in wanted_ids for t in tasks if not t["labelled"]),
    )


def _labelled(exported_task: Mapping[str, Any]) -> bool:
    """Whether an exported task has an annotation that was not a skip (what the Data Manager
    counts as ``total_annotations``)."""
    return any(not a.get("was_cancelled") for a in exported_task.get("annotations") or [])


def _counted_labelled(listed_task: Mapping[str, Any]) -> bool:
    """Whether a Data Manager task counts an annotation that was not a skip."""
    return bool(listed_task.get("total_annotations"))


def preannotate(
    client: LabelStudioClient,
    project_id: int,
    predictor: Predictor,
    fetcher: ImageFetcher,
    *,
    model: LoadedModel,
    missing_only: bool = True,
    unlabelled_only: bool = False,
    batch_size: int = 256,
    limit: int | None = None,
    cancel: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    order: LabellingOrder | None = None,
) -> PreannotateSummary:
    """Predict the project's tasks with `model` and push the predictions in bulk.

    Predictions are pushed as they are made, with the served margins as their scores. With an
    `order` whose scores rank the pool, a run that predicts every unlabelled task then ranks
    it (loop.ordering) and gives the tasks the order plans their places: scores below every
    margin, so that Label Studio's ascending *Prediction score* shows them first, in order.
    """
    started = time.perf_counter()
    project = client.get_project(project_id)
    work = tasks_to_predict(
        client,
        project,
        model.version,
        missing_only=missing_only,
        unlabelled_only=unlabelled_only,
        limit=limit,
    )
    tasks = work.tasks
    summary = PreannotateSummary(model.version, tasks=len(tasks), skipped=work.skipped)
    if work.replaces_whole_version:
        # Replacing every prediction of this version: one call instead of one per prediction.
        # A run interrupted after this leaves tasks without one; `--missing` fills them.
        deleted = client.delete_version_predictions(project_id, model.version)
        logger.info("Deleted %d predictions of %s to replace them", deleted, model.version)
        work.replaced.clear()
    # Label Studio forgets the live version when its predictions are deleted in bulk, which
    # would empty the *Prediction score* column; it is restored once the new ones are stored.
    restore_live_version = work.replaces_whole_version and (
        project.get("model_version") == model.version
    )
    summary.list_seconds = time.perf_counter() - started
    ranked = order is not None and order.needs_pool and work.whole_pool
    if order is not None and order.needs_pool and not ranked:
        logger.info(
            "Project %d: this run predicts part of the unlabelled tasks, so their scores are "
            "margins; the labelling order (%s) is set by a run over all of them",
            project_id,
            order.strategy,
        )
    image_key = _image_key(project["label_config"], model) if ranked else None
    pool: list[PoolTask] = []
    # The pool's embeddings from the forward passes themselves (ONNX Runtime gives them), so
    # ranking it costs no second pass over its images.
    features: dict[int, np.ndarray] = {}
    with _Pusher(client, project_id) as pusher:
        for start, end in _steps(len(tasks), batch_size, first=predictor.batch_size * 2):
            if cancel is not None and cancel.is_set():
                summary.cancelled = True
                break
            chunk = [Task(id=t["id"], data=t.get("data") or {}) for t in tasks[start:end]]
            results, stats = predictor.predict(
                chunk, project["label_config"], fetcher, model=model, features=image_key is not None
            )
            features.update(stats.features)
            summary.failed.update(stats.failed)
            summary.forward_seconds += stats.forward_seconds
            payload = [
                _import_item(task.id, result)
                for task, result in zip(chunk, results, strict=True)
                if isinstance(result, TaskPrediction)
            ]
            stale = [pid for item in payload for pid in work.replaced.get(item["task"], [])]
            pusher.add(payload, stale)
            if image_key is not None:
                data = {task.id: task.data for task in chunk}
                pool.extend(
                    PoolTask(
                        item["task"], str(data[item["task"]].get(image_key, "")), item["score"]
                    )
                    for item in payload
                )
            summary.predicted += len(payload)
            if progress is not None:
                progress(end, len(tasks))
        # Also after a cancel: what was predicted is stored. A failed push fails the run; what
        # was pushed before it stays.
        pusher.finish()
        summary.pushes = pusher.pushes
        summary.first_stored_at = pusher.first_stored_at
    if pool and image_key is not None and not summary.cancelled:
        assert order is not None
        _plan(
            order,
            pool,
            features,
            work,
            image_key,
            model,
            fetcher,
            client,
            project_id,
            cancel,
            summary,
        )
    if restore_live_version and summary.predicted:
        client.update_project(project_id, model_version=model.version)
    summary.seconds = time.perf_counter() - started
    logger.info(
        "Pre-annotated project %d with %s: %d predicted, %d skipped, %d failed in %.1f s%s",
        project_id,
        model.version,
        summary.predicted,
        summary.skipped,
        sum(summary.failed.values()),
        summary.seconds,
        " (cancelled)" if summary.cancelled else "",
    )
    return summary


def _image_key(label_config: str, model: LoadedModel) -> str | None:
    """The task data key of the image the model reads, or None when it cannot be told (the
    order is then left out: margins are pushed, as by any run over part of the pool)."""
    try:
        _, mapping = resolve_config(label_config, model.classes)
        return mapping.bindings[0].control.image_key
    except Exception:  # noqa: BLE001 - an order is a bonus; the predictions must still land
        logger.exception("Cannot tell the image of the label config; pushing margins")
        return None


def _plan(
    order: LabellingOrder,
    pool: list[PoolTask],
    features: dict[int, np.ndarray],
    work: Work,
    image_key: str,
    model: LoadedModel,
    fetcher: ImageFetcher,
    client: LabelStudioClient,
    project_id: int,
    cancel: threading.Event | None,
    summary: PreannotateSummary,
) -> None:
    """Give the `horizon` tasks the labelling order plans their places, once the pool's
    predictions are stored with their margins: only those scores change (loop.ordering
    `planned`: -1 + j / k, before every margin). A failure leaves the margins, which are a
    sound order of their own."""
    started = time.perf_counter()
    labelled = [
        PoolTask(int(t["id"]), str(t["data"][image_key]))
        for t in work.labelled
        if isinstance(t["data"].get(image_key), str)
    ]
    try:
        planned = order.planned(model, fetcher, pool, labelled, cancel=cancel, features=features)
        if cancel is not None and cancel.is_set():
            # Cancelled while ranking: images skipped since then would sit in the tail as if
            # unreadable. The margins stay.
            summary.cancelled = True
            return
        stored = [
            (int(p["id"]), planned[int(p["task"])])
            for p in client.predictions(project_id=project_id)
            if p.get("model_version") == model.version and int(p["task"]) in planned
        ]
        # One PATCH per planned place (Label Studio has no bulk score change), ≈ 60 ms of its
        # time each on a 2-core machine; a few at once overlap its request handling (100 in
        # ≈ 2 s instead of 6).
        with ThreadPoolExecutor(_PLAN_WORKERS, thread_name_prefix="plan") as patch:
            list(patch.map(lambda change: client.set_prediction_score(*change), stored))
    except Exception:  # noqa: BLE001 - an order is a bonus; the predictions have landed
        logger.exception("Labelling order of %d tasks failed; their margins stay", len(pool))
        return
    summary.scores = order.strategy
    summary.order_seconds = time.perf_counter() - started
    logger.info(
        "Project %d: %d planned places of the labelling order (%s) set in %.1f s",
        project_id,
        len(stored),
        order.strategy,
        summary.order_seconds,
    )


def _steps(n: int, size: int, *, first: int) -> list[tuple[int, int]]:
    """(start, end) of each step: a short first one, so the first predictions reach Label
    Studio within a second or two whatever the step size, then steps of `size`."""
    bounds = [0, min(n, first, size)] if n else [0]
    while bounds[-1] < n:
        bounds.append(min(n, bounds[-1] + size))
    return list(zip(bounds, bounds[1:], strict=False))


class _Pusher:
    """Stores predictions in Label Studio in the background while the next ones are predicted.

    One request at a time, in order, and spaced: Label Studio 1.23 recounts the predictions of
    *every* task of the project on each bulk import (≈ 1.2 ms per task on a 2-core machine, so
    2.5 s per call in a 2,000-task project, however few predictions it carries), on the cores
    our forward passes need. After a push that took d seconds, the next waits until
    `_PUSH_SPACING` × d has passed, predictions gathering meanwhile: Label Studio spends at most
    about a fifth of the run storing them, and an interrupted run loses at most what was
    predicted since the last push.
    """

    def __init__(self, client: LabelStudioClient, project_id: int) -> None:
        self._client = client
        self._project_id = project_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push")
        self._in_flight: Future[None] | None = None
        self._payload: list[dict[str, Any]] = []
        self._stale: list[int] = []
        self._next_push_at = 0.0
        self.pushes = 0
        self.first_stored_at: float | None = None  # wall clock, when the first push ended

    def __enter__(self) -> _Pusher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def add(self, payload: list[dict[str, Any]], stale: list[int]) -> None:
        """Queue new predictions and the ones of the same version they replace."""
        self._payload.extend(payload)
        self._stale.extend(stale)
        if self._in_flight is not None and not self._in_flight.done():
            return
        self._wait()
        if self._payload and time.monotonic() >= self._next_push_at:
            self._submit()

    def finish(self) -> None:
        """Push what is queued and wait for every push."""
        self._wait()
        if self._payload:
            self._submit()
            self._wait()

    def _wait(self) -> None:
        """Wait for the push in flight, if any; raises what a failed push raised."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def _submit(self) -> None:
        payload, stale = self._payload, self._stale
        self._payload, self._stale = [], []
        self.pushes += 1
        self._in_flight = self._executor.submit(self._push, payload, stale)

    def _push(self, payload: list[dict[str, Any]], stale: list[int]) -> None:
        started = time.monotonic()
        # New first, then the old ones of the same version: a task never goes without one.
        self._client.import_predictions(self._project_id, payload)
        for prediction_id in stale:
            self._client.delete_prediction(prediction_id)
        ended = time.monotonic()
        if self.first_stored_at is None:
            self.first_stored_at = time.time()
        self._next_push_at = ended + _PUSH_SPACING * (ended - started)


def _import_item(task_id: int, prediction: TaskPrediction) -> dict[str, Any]:
    body = prediction.model_dump(mode="json", exclude_none=True)
    return {"task": task_id, **body}


def rename_backend(
    client: LabelStudioClient, project_id: int, backend_url: str, version: str
) -> bool:
    """Title our ML backend entry after the live version.

    Label Studio sets `project.model_version` from the backend's title, and its *Prediction
    score* column and uncertainty sampling only count predictions of that version.
    """
    ours = [
        b
        for b in client.ml_backends(project_id)
        if str(b.get("url", "")).rstrip("/") == backend_url
    ]
    for backend in ours:
        if backend.get("title") != version:
            client.update_ml_backend(int(backend["id"]), title=version)
            logger.info(
                "Renamed ML backend %s of project %d to %s", backend["id"], project_id, version
            )
    return bool(ours)


class Refresher:
    """Keep each project's stored predictions and ML-backend entry on its live version.

    After a promotion or a rollback in a project, its unlabelled tasks are re-predicted in the
    background and its entry renamed. Only the newest version of a project is pushed: a new
    change while that project's refresh runs cancels it. Refreshes run one at a time (they
    share the cores with /predict); other projects are never touched.
    """

    def __init__(
        self,
        predictor: Predictor,
        client: Callable[[], LabelStudioClient | None],
        fetcher: Callable[[], ImageFetcher],
        model_for: Callable[[int], LoadedModel | None],
        *,
        refresh: bool = True,
        rename_backend: str | None = None,
        order: LabellingOrder | None = None,
    ) -> None:
        """`model_for`: the model a project is served now. `rename_backend`: our URL as Label
        Studio knows it; the project's entry is renamed to each new version. None leaves the
        entry alone. `order`: the labelling order the refreshed scores carry (margins when
        None)."""
        self.order = order
        self.predictor = predictor
        self.client = client
        self.fetcher = fetcher
        self.model_for = model_for
        self.refresh = refresh
        self.rename_backend = rename_backend
        self._lock = threading.Lock()
        self._one_at_a_time = threading.Lock()
        self._cancel: dict[int, threading.Event] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._stopped = threading.Event()
        self._named: dict[int, str] = {}  # project -> the version its entry was renamed to
        self.last: dict[int, PreannotateSummary] = {}

    def on_promote(self, project_id: int, version: str) -> None:
        """The project now serves `version`: rename its entry and re-predict its tasks."""
        self._start(project_id, version, refresh=self.refresh, attempts=1)

    def on_connect(self, project_id: int, version: str) -> None:
        """A /setup of the project: name its entry after the live version. Label Studio saves a
        new entry only after /setup answers, so the rename is retried a few times."""
        # Label Studio sends /setup before every batch of predictions: rename once a version.
        if self.rename_backend is not None and self._named.get(project_id) != version:
            self._start(project_id, version, refresh=False, attempts=_CONNECT_ATTEMPTS)

    def wait(self, timeout_s: float) -> None:
        with self._lock:
            threads = list(self._threads.values())
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            for cancel in self._cancel.values():
                cancel.set()
        self.wait(10)

    def _start(self, project_id: int, version: str, *, refresh: bool, attempts: int) -> None:
        if self._stopped.is_set() or (not refresh and self.rename_backend is None):
            return
        with self._lock:
            previous = self._threads.get(project_id)
            if not refresh and previous is not None and previous.is_alive():
                # A rename must never cancel a refresh: the running one renames the entry
                # itself (Label Studio sends /setup before every batch of predictions).
                return
            old = self._cancel.get(project_id)
            if old is not None:
                old.set()
            cancel = threading.Event()
            self._cancel[project_id] = cancel
            thread = threading.Thread(
                target=self._run,
                args=(project_id, version, refresh, attempts, cancel, previous),
                name=f"refresh-{project_id}",
                daemon=True,
            )
            self._threads[project_id] = thread
            thread.start()

    def _run(
        self,
        project_id: int,
        version: str,
        refresh: bool,
        attempts: int,
        cancel: threading.Event,
        previous: threading.Thread | None,
    ) -> None:
        if previous is not None:
            previous.join()
        client = self.client()
        if client is None:
            logger.info("No Label Studio URL and token yet: refresh of %d skipped", project_id)
            return
        try:
            with client:
                if self.rename_backend is not None:
                    # Bounded: at most `attempts` tries over a few seconds, then it waits for
                    # the next promotion.
                    for attempt in range(attempts):
                        if rename_backend(client, project_id, self.rename_backend, version):
                            self._named[project_id] = version
                            break
                        if cancel.wait(_CONNECT_RETRY_S * (attempt + 1)):
                            return
                if not refresh or cancel.is_set():
                    return
                model = self.model_for(project_id)
                if model is None or model.version != version:
                    return  # superseded; the newer change has its own refresh
                with self._one_at_a_time:
                    if cancel.is_set():
                        return
                    self.last[project_id] = preannotate(
                        client,
                        project_id,
                        self.predictor,
                        self.fetcher(),
                        model=model,
                        missing_only=True,
                        unlabelled_only=True,
                        cancel=cancel,
                        order=self.order,
                    )
        except Exception:  # noqa: BLE001 - a failed refresh must not take the server down
            logger.exception("Refreshing predictions of project %d failed", project_id)


_CONNECT_ATTEMPTS = 4
_CONNECT_RETRY_S = 1.0


@dataclass
class Run:
    """A pre-annotation the backend runs for `labelloop preannotate` (POST /preannotate)."""

    id: int
    project_id: int
    state: str = "running"  # running, succeeded, failed
    done: int = 0
    total: int = 0
    error: str | None = None
    summary: dict[str, Any] | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project_id": self.project_id,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "error": self.error,
            "summary": self.summary,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class PreannotateRuns:
    """Pre-annotation inside the running backend: its loaded models, image cache and
    connection pool, instead of a new process loading everything again. One run per project
    at a time; asking again while one runs returns that run."""

    def __init__(
        self,
        predictor: Predictor,
        client: Callable[[], LabelStudioClient | None],
        fetcher: Callable[[], ImageFetcher],
        model_for: Callable[[int], LoadedModel | None],
        *,
        keep: int = 50,
        order: LabellingOrder | None = None,
    ) -> None:
        self.order = order
        self.predictor = predictor
        self.client = client
        self.fetcher = fetcher
        self.model_for = model_for
        self.keep = keep
        self._lock = threading.Lock()
        self._runs: dict[int, Run] = {}
        self._cancel = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(
        self, project_id: int, *, missing_only: bool, limit: int | None, batch_size: int
    ) -> Run:
        """Start (or join) the project's run. Raises LookupError when nothing can serve it."""
        client = self.client()
        if client is None:
            raise LookupError(
                "the backend has no Label Studio URL and token: set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY where it runs"
            )
        model = self.model_for(project_id)
        if model is None:
            client.close()
            raise LookupError(f"no model serves project {project_id} yet")
        with self._lock:
            for run in self._runs.values():
                if run.project_id == project_id and run.state == "running":
                    client.close()
                    return run
            run = Run(id=max(self._runs, default=0) + 1, project_id=project_id)
            self._runs[run.id] = run
            for old in sorted(self._runs)[: max(0, len(self._runs) - self.keep)]:
                if self._runs[old].state != "running":
                    del self._runs[old]
            thread = threading.Thread(
                target=self._run,
                args=(run, client, model, missing_only, limit, batch_size),
                name=f"preannotate-{project_id}",
                daemon=True,
            )
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return run

    def get(self, run_id: int) -> Run | None:
        with self._lock:
            return self._runs.get(run_id)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._cancel.set()
        deadline = time.monotonic() + timeout_s
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(
        self,
        run: Run,
        client: LabelStudioClient,
        model: LoadedModel,
        missing_only: bool,
        limit: int | None,
        batch_size: int,
    ) -> None:
        def progress(done: int, total: int) -> None:
            run.done, run.total = done, total

        try:
            with client:
                summary = preannotate(
                    client,
                    run.project_id,
                    self.predictor,
                    self.fetcher(),
                    model=model,
                    missing_only=missing_only,
                    batch_size=batch_size,
                    limit=limit,
                    cancel=self._cancel,
                    progress=progress,
                    order=self.order,
                )
            run.summary = summary.to_dict()
            run.total = run.total or summary.tasks
            run.state = "succeeded"
        except Exception as exc:  # noqa: BLE001 - reported to the caller, the server stays up
            logger.exception("Pre-annotating project %d failed", run.project_id)
            run.error = f"{type(exc).__name__}: {exc}"
            run.state = "failed"
        finally:
            run.finished_at = time.time()
