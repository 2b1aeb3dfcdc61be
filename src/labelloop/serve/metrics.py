"""Prometheus metrics for the ML backend, in the text format ``GET /metrics`` serves.

Exported:

- :class:`PrometheusMetrics`: the metrics of one app. ``install(app)`` adds an ASGI middleware
  that counts and times every HTTP request by its route *template* and, unless told not to,
  registers ``GET /metrics`` (``metrics_route`` registers it alone, e.g. behind other
  dependencies or at another path). ``observe_predict``, ``observe_job`` and
  ``observe_model_load`` record what the handlers and the trainer did; three callbacks, read at
  scrape time, report the ledger's size per project, the training queue's length and the model
  version each project is served.
- :func:`reason_label`: an image-fetch failure message reduced to one of :data:`REASON_LABELS`.
- :data:`REASON_LABELS`: every label :func:`reason_label` can return.

Each :class:`PrometheusMetrics` owns its own ``CollectorRegistry``, never prometheus_client's
global one: the tests build many apps in one process, and metrics registered twice in the global
registry raise ``Duplicated timeseries``, while counts would leak from one app into the next.

Every label has a bounded set of values, so the number of time series cannot grow with traffic:
routes are templates (``/projects/{project_id}``, never ``/projects/7``) and ``unmatched`` for
paths no route matched; methods outside the standard ones are ``other``; failure reasons go
through :func:`reason_label`. ``kind`` and ``state`` come from the trainer's enums, projects
from Label Studio's project ids.

prometheus_client is thread-safe; handlers run on FastAPI's thread pool and the trainer on its
own thread, and all of them may record at once.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from fastapi import FastAPI, Response
from fastapi.params import Depends
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, InfoMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "REASON_LABELS",
    "LedgerSizes",
    "ModelVersions",
    "PrometheusMetrics",
    "QueueLength",
    "reason_label",
]

logger = logging.getLogger(__name__)

LedgerSizes = Callable[[], Mapping[str, int]]
"""Project id -> annotations in the ledger."""
QueueLength = Callable[[], int]
"""Training jobs queued."""
ModelVersions = Callable[[], Mapping[str, str]]
"""Project id, or ``"base"`` (the model projects without their own get) -> version."""

_T = TypeVar("_T")

UNMATCHED_ROUTE = "unmatched"
UNKNOWN_PROJECT = "unknown"

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# /predict of a large batch downloads every image first, so the top buckets reach minutes.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A fast update refits a head in seconds; a full update fine-tunes the network for up to hours.
_JOB_BUCKETS = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0
)  # fmt: skip
# Loading a checkpoint (and an ONNX session) takes from a fraction of a second to a minute.
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# --------------------------------------------------------------------------- failure reasons

# The fetcher's messages (labelstudio.fetcher, labelstudio.urls, ml.images, labelstudio.auth)
# and runtime.predictor's own, matched on their fixed wording. The patterns are anchored at the
# start of the message, because the rest of a message holds a URL or path from task data: an
# image at ".../timed out.png" must not make a 404 a timeout. The one message that starts with a
# URL (a redirect to an unsupported URL) is matched by its middle: no URL starts like the others.
# Checked in order; the first match wins.
_HTTP_STATUS = re.compile(r"^HTTP ([1-5]\d\d)\b")
_HTTP_CLASSES = {"3": "redirect", "4": "http_4xx", "5": "http_5xx"}
_REASON_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, re.compile(pattern, re.IGNORECASE))
    for label, pattern in (
        ("invalid_result", r"^invalid result\b"),
        ("no_url", r"^task data has no .* image URL$"),
        ("timeout", r"^timed out\b"),
        ("too_large", r"^image (too large to decode|of \d+x\d+ pixels exceeds|.* is larger than )"),
        ("auth", r"^Label Studio( refused| answered HTTP|'s answer)"),
        ("connection", r"^could not download |^Label Studio could not be reached"),
        ("connection", r"^refusing to fetch .*: cannot resolve host "),
        ("blocked_url", r"^refusing "),
        ("redirect", r"^redirect loop at |^too many redirects| redirected to an unsupported URL "),
        (
            "bad_url",
            r"^(malformed image URL|unsupported URL scheme|unsupported image URL|cannot fetch )",
        ),
        ("local_file", r"^(local file |cannot read )"),
        ("not_an_image", r"^(not an image\b|empty image file)"),
        ("corrupt_image", r"^corrupt or truncated image"),
    )
)

REASON_LABELS: frozenset[str] = frozenset(
    {"http_4xx", "http_5xx", "other"} | {label for label, _ in _REASON_PATTERNS}
)


def reason_label(text: str) -> str:
    """The short label of an image-fetch failure message; always one of REASON_LABELS.

    ==================  =======================================================================
    label               messages
    ==================  =======================================================================
    ``auth``            ``HTTP 401``/``HTTP 403 ...`` (the token was refused or not sent), and a
                        personal access token Label Studio would not exchange
    ``http_4xx``        any other ``HTTP 4xx ... from <url>``
    ``http_5xx``        ``HTTP 5xx ... from <url>``
    ``redirect``        ``HTTP 3xx redirect without a Location``, a redirect loop, too many
                        redirects, a redirect to an unsupported URL
    ``timeout``         ``timed out after N s fetching <url>``
    ``too_large``       larger than ``max_image_bytes``, too large to decode safely, more pixels
                        than the limit (decompression bomb)
    ``connection``      ``could not download <url> (ConnectError: ...)``, a host that does not
                        resolve, Label Studio unreachable while exchanging the token
    ``blocked_url``     ``refusing ...``: a host not in the allowed list, a link-local or
                        metadata address, a local path outside the document root
    ``bad_url``         malformed URLs, unsupported schemes, URLs that need LABEL_STUDIO_URL or a
                        task id (``cannot fetch ...``)
    ``local_file``      a local file that is missing, not a regular file or unreadable
    ``not_an_image``    ``not an image (format not recognised)``, an empty file
    ``corrupt_image``   ``corrupt or truncated image``
    ``no_url``          ``task data has no 'image' image URL`` (runtime.predictor)
    ``invalid_result``  ``invalid result``: a prediction Label Studio's config rejects
    ``other``           anything else (an unexpected exception's type name, ``unknown``)
    ==================  =======================================================================
    """
    text = text.strip()
    status = _HTTP_STATUS.match(text)
    if status is not None:
        code = status.group(1)
        return "auth" if code in ("401", "403") else _HTTP_CLASSES.get(code[0], "other")
    for label, pattern in _REASON_PATTERNS:
        if pattern.search(text):
            return label
    return "other"


# --------------------------------------------------------------------------- scrape-time values


class _ScrapeCollector:
    """The values other components own (ledger, queue, model versions), read at each scrape.

    A custom collector rather than ``Gauge.set_function``, which cannot carry labels. A callback
    that raises is logged and its family left out, so one broken source never fails the scrape.
    """

    def __init__(self) -> None:
        self.ledger_sizes: LedgerSizes | None = None
        self.queue_length: QueueLength | None = None
        self.model_versions: ModelVersions | None = None

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering this collector does not call the callbacks.
        return [_ledger_family(), _queue_family(), _versions_family()]

    def collect(self) -> Iterable[Metric]:
        # Each callback read once into a local: a setter on another thread may swap it meanwhile.
        ledger_sizes, queue_length = self.ledger_sizes, self.queue_length
        model_versions = self.model_versions
        if ledger_sizes is not None:
            sizes = _read(
                "labelloop_ledger_annotations",
                lambda: [(str(project), float(n)) for project, n in ledger_sizes().items()],
            )
            if sizes is not None:
                ledger = _ledger_family()
                for project, n in sizes:
                    ledger.add_metric([project], n)
                yield ledger
        if queue_length is not None:
            length = _read("labelloop_training_queue_jobs", lambda: float(queue_length()))
            if length is not None:
                queue = _queue_family()
                queue.add_metric([], length)
                yield queue
        if model_versions is not None:
            versions = _read(
                "labelloop_model_version_info",
                lambda: [(str(project), str(v)) for project, v in model_versions().items()],
            )
            if versions is not None:
                info = _versions_family()
                for project, version in versions:
                    info.add_metric([project], {"version": version})
                yield info


def _read(name: str, read: Callable[[], _T]) -> _T | None:
    """``read()``, or None (logged) when it raised. ``read`` converts every value, so a bad one
    drops its family whole rather than half of it."""
    try:
        return read()
    except Exception:  # noqa: BLE001 - a broken source must not fail the whole scrape
        logger.exception("Metrics callback for %s failed; left out of this scrape", name)
        return None


def _ledger_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "labelloop_ledger_annotations",
        "Annotations in the ledger (the training set), per project.",
        labels=["project"],
    )


def _queue_family() -> GaugeMetricFamily:
    return GaugeMetricFamily("labelloop_training_queue_jobs", "Training jobs queued.")


def _versions_family() -> InfoMetricFamily:
    return InfoMetricFamily(
        "labelloop_model_version",
        'The model version served per project ("base": projects without a model of their own).',
        labels=["project"],
    )


# --------------------------------------------------------------------------- HTTP middleware


class _HTTPMetricsMiddleware:
    """Pure ASGI, not ``@app.middleware("http")``: BaseHTTPMiddleware passes each response
    through an extra task and memory stream, which measured tens of times the cost of this."""

    def __init__(self, app: ASGIApp, metrics: PrometheusMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # If the app raises before it answers, ServerErrorMiddleware (outside this one) sends 500.
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics._observe_http(scope, status, time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    # The router leaves what it matched in the scope (the same dict, so it is visible here after
    # the call); a 405 leaves the route its path matched, a 404 nothing. FastAPI matches the
    # routes of an included router in place: scope["route"] is the route as declared, without
    # the include's prefix, and the full template is on the route context FastAPI keeps under
    # scope["fastapi"]. That is private, so it is read defensively: without it a template lacks
    # its prefix but stays bounded (and the tests notice).
    fastapi_scope = scope.get("fastapi")
    if isinstance(fastapi_scope, dict):
        context = fastapi_scope.get("effective_route_context")
        template = getattr(context, "path_format", None)
        if isinstance(template, str) and template:
            return template
    # path_format drops convertors: "/files/{name:path}" is reported as "/files/{name}".
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) and template else UNMATCHED_ROUTE


# --------------------------------------------------------------------------- the metrics


class PrometheusMetrics:
    """The Prometheus metrics of one app, in a registry of its own (see the module docstring)."""

    def __init__(
        self,
        *,
        ledger_sizes: LedgerSizes | None = None,
        queue_length: QueueLength | None = None,
        model_versions: ModelVersions | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry
        self._requests = Counter(
            "labelloop_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self._request_seconds = Histogram(
            "labelloop_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route template.",
            ["route", "method"],
            buckets=_HTTP_BUCKETS,
            registry=registry,
        )
        self._predictions = Counter(
            "labelloop_predictions",
            "Predictions returned to Label Studio, per project.",
            ["project"],
            registry=registry,
        )
        self._predict_tasks = Counter(
            "labelloop_predict_tasks",
            "Tasks asked for in /predict, per project (predicted or not).",
            ["project"],
            registry=registry,
        )
        self._fetch_failures = Counter(
            "labelloop_image_fetch_failures",
            "Tasks that got no prediction, by reason (see labelloop.serve.metrics.reason_label).",
            ["reason"],
            registry=registry,
        )
        self._jobs = Counter(
            "labelloop_training_jobs",
            "Training jobs finished (or otherwise changed state), by kind and state.",
            ["kind", "state"],
            registry=registry,
        )
        self._job_seconds = Histogram(
            "labelloop_training_job_duration_seconds",
            "How long training jobs ran, by kind.",
            ["kind"],
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self._model_load_seconds = Histogram(
            "labelloop_model_load_seconds",
            "Time to load a model version for serving.",
            buckets=_LOAD_BUCKETS,
            registry=registry,
        )
        self._scrape = _ScrapeCollector()
        registry.register(self._scrape)
        self.set_ledger_sizes(ledger_sizes)
        self.set_queue_length(queue_length)
        self.set_model_versions(model_versions)
        # .labels() validates and locks on every call; the middleware runs on every request, so
        # it keeps the children it has looked up. A race only looks the same child up twice.
        self._http_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    # ----------------------------------------------------------------------- wiring

    def install(
        self,
        app: FastAPI,
        *,
        path: str | None = "/metrics",
        dependencies: Sequence[Depends] | None = None,
    ) -> None:
        """Count and time every request to ``app``, and serve the metrics at ``path``
        (None: do not add the route; call :meth:`metrics_route` yourself).

        Call before the app starts: Starlette refuses middleware added later.
        """
        app.add_middleware(_HTTPMetricsMiddleware, metrics=self)
        if path is not None:
            self.metrics_route(app, path=path, dependencies=dependencies)

    def metrics_route(
        self,
        app: FastAPI,
        *,
        path: str = "/metrics",
        dependencies: Sequence[Depends] | None = None,
    ) -> None:
        """Add ``GET path`` with the metrics in Prometheus' text format.

        The route inherits the app's own dependencies (``FastAPI(dependencies=[...])``, e.g.
        basic auth); ``dependencies`` adds more.
        """

        # Sync, so FastAPI runs it on its thread pool: the callbacks may query the ledger.
        def metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        app.add_api_route(
            path,
            metrics,
            methods=["GET"],
            dependencies=dependencies,
            include_in_schema=False,
            response_class=Response,
            name="prometheus_metrics",
        )

    def set_ledger_sizes(self, callback: LedgerSizes | None) -> None:
        """``labelloop_ledger_annotations{project}`` comes from ``callback`` at each scrape."""
        self._scrape.ledger_sizes = callback

    def set_queue_length(self, callback: QueueLength | None) -> None:
        """``labelloop_training_queue_jobs`` comes from ``callback`` at each scrape."""
        self._scrape.queue_length = callback

    def set_model_versions(self, callback: ModelVersions | None) -> None:
        """``labelloop_model_version_info{project,version}`` comes from ``callback`` at each
        scrape."""
        self._scrape.model_versions = callback

    # ----------------------------------------------------------------------- recording

    def observe_predict(
        self, project: int | None, tasks: int, predicted: int, failed: Mapping[str, int]
    ) -> None:
        """One /predict call: ``tasks`` asked for, ``predicted`` answered, and ``failed``
        (reason message -> tasks, as PredictStats.failed) reduced by :func:`reason_label`."""
        label = UNKNOWN_PROJECT if project is None else str(project)
        if tasks:
            self._predict_tasks.labels(project=label).inc(tasks)
        if predicted:
            self._predictions.labels(project=label).inc(predicted)
        for reason, count in failed.items():
            if count:
                self._fetch_failures.labels(reason=reason_label(reason)).inc(count)

    def observe_job(self, kind: str, state: str, seconds: float | None) -> None:
        """A training job reached ``state``; ``seconds`` it ran (None: it never ran)."""
        self._jobs.labels(kind=kind, state=state).inc()
        if seconds is not None:
            self._job_seconds.labels(kind=kind).observe(seconds)

    def observe_model_load(self, seconds: float) -> None:
        self._model_load_seconds.observe(seconds)

    def _observe_http(self, scope: Scope, status: int, seconds: float) -> None:
        route = _route_template(scope)
        method = scope.get("method", "")
        if method not in _METHODS:
            method = "other"
        key = (route, method, status)
        children = self._http_children.get(key)
        if children is None:
            children = (
                self._requests.labels(route=route, method=method, status=str(status)),
                self._request_seconds.labels(route=route, method=method),
            )
            self._http_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
