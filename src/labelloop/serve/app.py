"""The ML-backend HTTP server: Label Studio's protocol on FastAPI.

Everything slow (model loading) happens in `create_app`'s caller, once; `/setup` and `/health`
answer from memory. Handlers are plain functions, so FastAPI runs them in its thread pool and a
long `/predict` never stalls `/setup`, `/health` or `/webhook`.
"""

from __future__ import annotations

import logging
import pathlib
import secrets
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict, Field

from labelloop import __version__
from labelloop.labelstudio.annotations import AnnotationPayloadError
from labelloop.labelstudio.auth import LabelStudioAuth
from labelloop.labelstudio.client import LabelStudioClient
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.label_config import LabelConfigError, parse_label_config
from labelloop.labelstudio.protocol import (
    PredictRequest,
    PredictResponse,
    SetupRequest,
    SetupResponse,
    WebhookEvent,
    project_id_from,
)
from labelloop.labelstudio.urls import BaseURLError, FetchSettings, http_base_url
from labelloop.lineages import Lineages, migrate_layout
from labelloop.loop.ledger import AnnotationLedger, Ledger, LedgerError
from labelloop.loop.ordering import LabellingOrder
from labelloop.loop.preannotate import PreannotateRuns, Refresher
from labelloop.loop.trainer import Trainer, TrainerSettings
from labelloop.ml.embeddings import EmbeddingCache
from labelloop.runtime.predictor import LoadedModel, Predictor, resolve_config
from labelloop.runtime.projects import ProjectModels
from labelloop.serve.events import record_event
from labelloop.serve.metrics import PrometheusMetrics
from labelloop.serve.page import install_page
from labelloop.serve.settings import ServeSettings
from labelloop.serve.status import overview, project_detail
from labelloop.store import StoreError

logger = logging.getLogger(__name__)

NO_MODEL_VERSION = "untrained"


class ServerMetrics:
    """Counters for /metrics; a lock because handlers run on many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[str] = Counter()
        self.tasks = 0
        self.predicted = 0
        self.failed: Counter[str] = Counter()
        self.predict_seconds = 0.0
        self.webhooks: Counter[str] = Counter()

    def count_request(self, route: str) -> None:
        with self._lock:
            self.requests[route] += 1

    def record_predict(
        self, tasks: int, predicted: int, failed: Counter[str], seconds: float
    ) -> None:
        with self._lock:
            self.tasks += tasks
            self.predicted += predicted
            self.failed.update(failed)
            self.predict_seconds += seconds

    def record_webhook(self, action: str) -> None:
        with self._lock:
            self.webhooks[action] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": dict(self.requests),
                "predict": {
                    "tasks": self.tasks,
                    "predicted": self.predicted,
                    "failed": dict(self.failed),
                    "seconds": round(self.predict_seconds, 3),
                    "tasks_per_s": round(self.tasks / self.predict_seconds, 2)
                    if self.predict_seconds
                    else None,
                },
                "webhooks": dict(self.webhooks),
            }


class FetcherRegistry:
    """One image fetcher per (Label Studio URL, token): env settings win over what /setup sent."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._fetchers: dict[tuple[str | None, str | None], ImageFetcher] = {}
        self._setup_hostname: str | None = None
        self._setup_token: str | None = None

    def remember_setup(self, hostname: str | None, token: str | None) -> list[str]:
        """Keep what /setup sent for later image fetches; returns warnings about what was not.

        Anyone who can reach /setup chooses these values, and a bad one kept here would break
        every later /predict, so only a usable http(s) URL and a header-safe token are kept.
        """
        warnings: list[str] = []
        hostname = (hostname or "").strip().rstrip("/")
        token = (token or "").strip()
        if hostname:
            try:
                http_base_url(hostname, "the hostname /setup sent")
            except BaseURLError as exc:
                warnings.append(f"ignored {exc} (set LABEL_STUDIO_URL)")
                hostname = ""
        if token and not _header_safe(token):
            warnings.append("ignored the access token /setup sent: not a printable ASCII token")
            token = ""
        with self._lock:
            if hostname:
                self._setup_hostname = hostname
            if token:
                self._setup_token = token
        for line in warnings:
            logger.warning("Setup: %s", line)
        return warnings

    def credentials(self) -> tuple[str | None, str | None]:
        """Label Studio's URL and token: the env settings, else what /setup last sent."""
        s = self.settings
        url = s.label_studio_url or self._setup_hostname
        key = s.label_studio_api_key
        return url, key.get_secret_value() if key else self._setup_token

    def client(self) -> LabelStudioClient | None:
        url, token = self.credentials()
        return LabelStudioClient(url, token) if url and token else None

    def current(self) -> ImageFetcher:
        s = self.settings
        url, token = self.credentials()
        key = (url, token)
        with self._lock:
            fetcher = self._fetchers.get(key)
            if fetcher is None:
                auth = LabelStudioAuth(url, token) if url and token else None
                fetcher = ImageFetcher(
                    FetchSettings(
                        label_studio_url=url,
                        document_root=s.document_root,
                        label_studio_data_dir=s.label_studio_data_dir,
                        cache_dir=s.cache_dir,
                        cache_max_bytes=s.cache_max_mb * 1024 * 1024,
                        timeout_s=s.fetch_timeout_s,
                        allowed_hosts=s.allowed_image_hosts,
                    ),
                    auth,
                )
                self._fetchers[key] = fetcher
            return fetcher

    def close(self) -> None:
        with self._lock:
            for fetcher in self._fetchers.values():
                fetcher.close()
            self._fetchers.clear()


class PreannotateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: int = Field(ge=1, le=2**63 - 1)
    all: bool = False  # every task, not only those without a prediction of the version
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1, le=4096)


def _ledger_sizes(ledger: AnnotationLedger) -> dict[str, int]:
    return {str(p): ledger.stats(p)["live"] for p in ledger.projects()}


def _parses(xml: str) -> bool:
    try:
        parse_label_config(xml)
    except LabelConfigError:
        return False
    return True


def _header_safe(token: str) -> bool:
    return token.isascii() and token.isprintable()


_BASIC = HTTPBasic(auto_error=False)


def _basic_auth_dependency(settings: ServeSettings):
    user = (settings.basic_auth_user or "").encode()
    password = (
        settings.basic_auth_pass.get_secret_value().encode() if settings.basic_auth_pass else b""
    )

    def check(credentials: Annotated[HTTPBasicCredentials | None, Depends(_BASIC)]) -> None:
        if not settings.basic_auth_enabled:
            return
        # Both comparisons always run (& not and), so timing does not reveal which one failed.
        ok = credentials is not None and (
            secrets.compare_digest(credentials.username.encode(), user)
            & secrets.compare_digest(credentials.password.encode(), password)
        )
        if not ok:
            raise HTTPException(
                status_code=status.HTTP_401_UNAUTHORIZED,
                detail="basic auth required: set the ML backend's user and password in "
                "Label Studio",
                headers={"WWW-Authenticate": "Basic"},
            )

    return check


def create_app(
    settings: ServeSettings,
    models: ProjectModels,
    *,
    predictor: Predictor | None = None,
    fetchers: FetcherRegistry | None = None,
    ledger: AnnotationLedger | None = None,
    trainer: Trainer | None = None,
    refresher: Refresher | None = None,
    order: LabellingOrder | None = None,
) -> FastAPI:
    """The app. Without a ledger, webhooks are only acknowledged; with a trainer, annotations
    train new versions in the background. `order`: the labelling order pre-annotation runs
    through this backend push as scores (margins when None)."""
    predictor = predictor or Predictor(
        batch_size=settings.batch_size, workers=settings.fetch_workers
    )
    fetchers = fetchers or FetcherRegistry(settings)
    metrics = ServerMetrics()

    runs = PreannotateRuns(
        predictor, fetchers.client, fetchers.current, models.serving, order=order
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if trainer is not None:
            trainer.start()
        yield
        runs.stop()
        if trainer is not None:
            trainer.stop()
        if refresher is not None:
            refresher.stop()
        predictor.close()
        fetchers.close()

    app = FastAPI(
        title="labelloop ML backend",
        version=__version__,
        lifespan=lifespan,
        dependencies=[Depends(_basic_auth_dependency(settings))],
        max_body_size=settings.max_request_mb * 2**20,
    )
    prometheus = PrometheusMetrics(
        model_versions=models.versions,
        ledger_sizes=(lambda: _ledger_sizes(ledger)) if ledger is not None else None,
        queue_length=(lambda: len(ledger.pending_jobs())) if ledger is not None else None,
    )
    # Routes added after this inherit the app's dependencies: /metrics is behind basic auth too.
    prometheus.install(app)
    models.on_load = prometheus.observe_model_load
    if trainer is not None:
        trainer.on_job_done = lambda job: prometheus.observe_job(
            str(job.kind),
            str(job.state),
            job.finished_at - job.started_at if job.finished_at and job.started_at else None,
        )
    app.state.settings = settings
    app.state.prometheus = prometheus
    app.state.models = models
    app.state.predictor = predictor
    app.state.metrics = metrics
    app.state.fetchers = fetchers

    def version_of(model: LoadedModel | None) -> str:
        return model.version if model is not None else NO_MODEL_VERSION

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "request body is not valid JSON"}, status_code=400)
        # Name the fields but never echo the input back: it may hold tokens.
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errors[:10]
        ]
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(LedgerError)
    async def _ledger_down(request: Request, exc: LedgerError) -> JSONResponse:
        # The database is down or unreachable: nothing was recorded, so say so (Label Studio
        # logs the failed webhook; the periodic reconcile recovers its annotation later).
        logger.error("Ledger unavailable on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": f"the annotation ledger is unavailable: {exc}"}, status_code=503
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("Unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error; see the backend's log"}, status_code=500)

    @app.get("/")
    @app.get("/health")
    def health() -> dict[str, Any]:
        metrics.count_request("health")
        base = models.base()
        return {
            "status": "UP",
            "model_class": "labelloop",
            "model_version": version_of(base),
            "model_loaded": base is not None,
        }

    @app.post("/setup", response_model=SetupResponse, response_model_exclude_none=True)
    def setup(request: SetupRequest) -> SetupResponse:
        metrics.count_request("setup")
        setup_warnings = fetchers.remember_setup(request.hostname, request.access_token)
        project_id = project_id_from(request.project)
        model = models.serving(project_id)
        warnings: list[str] = []
        if project_id is None:
            warnings.append(
                "the request names no project: the base model answers, and nothing is trained"
            )
        if request.label_config:
            try:
                config = parse_label_config(request.label_config)
            except LabelConfigError as exc:
                logger.warning("Setup of project %s refused: %s", project_id, exc)
                raise HTTPException(status_code=422, detail=str(exc)) from None
            warnings.extend(config.warnings)
            if model is not None:
                try:
                    _, mapping = resolve_config(request.label_config, model.classes)
                    warnings.extend(mapping.warnings())
                except LabelConfigError as exc:
                    if project_id is not None and models.has_lineage(project_id):
                        warnings.append(
                            f"no choice maps onto the project's model {model.version} any "
                            f"more ({exc}); predictions stay empty until a version is trained "
                            "on annotations with the new choices"
                        )
                    else:
                        warnings.append(
                            "no choice is a class of the base model: this project starts "
                            "cold, its first model is trained on its own annotations"
                        )
                    model = None
            if ledger is not None and project_id is not None:
                # Only a config that parsed is remembered: a project whose setup failed is
                # never trained nor pre-annotated.
                ledger.set_label_config(project_id, request.label_config)
        elif model is None:
            warnings.append("no model is trained yet: predictions stay empty until one is")
        for line in warnings:
            logger.warning("Setup of project %s: %s", project_id, line)
        if refresher is not None and project_id is not None and model is not None:
            refresher.on_connect(project_id, model.version)
        return SetupResponse(model_version=version_of(model), warnings=[*setup_warnings, *warnings])

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=True)
    def predict(request: PredictRequest) -> PredictResponse:
        metrics.count_request("predict")
        project_id = project_id_from(request.project)
        model = models.serving(project_id)
        if model is None:
            return PredictResponse(results=[[] for _ in request.tasks])
        if not request.label_config:
            raise HTTPException(status_code=422, detail="label_config is missing from the request")
        if not request.tasks:
            return PredictResponse(results=[])
        try:
            resolve_config(request.label_config, model.classes)
        except LabelConfigError as exc:
            if (
                project_id is not None
                and not models.has_lineage(project_id)
                and _parses(request.label_config)
            ):
                # A project that shares nothing with the base model starts cold: no
                # prediction until its own first version, as with no model at all. Without a
                # project nothing can ever learn this config: that is the 422 below.
                return PredictResponse(results=[[] for _ in request.tasks])
            raise HTTPException(status_code=422, detail=str(exc)) from None
        results, stats = predictor.predict(
            request.tasks, request.label_config, fetchers.current(), model=model
        )
        metrics.record_predict(stats.tasks, stats.predicted, stats.failed, stats.seconds)
        prometheus.observe_predict(project_id, stats.tasks, stats.predicted, stats.failed)
        return PredictResponse(results=results)

    @app.post("/webhook")
    def webhook(event: WebhookEvent) -> dict[str, Any]:
        metrics.count_request("webhook")
        metrics.record_webhook(event.action)
        logger.info("Webhook %s (project %s)", event.action, event.project_id())
        reply: dict[str, Any] = {"status": "ok", "action": event.action}
        if ledger is None:
            return reply
        try:
            reply.update(record_event(event, ledger, trainer))
        except AnnotationPayloadError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return reply

    @app.get("/versions")
    def versions(project: Annotated[int | None, Query(ge=1)] = None) -> dict[str, Any]:
        """The project's lineage (`?project=ID`), or the base model's versions."""
        metrics.count_request("versions")
        store = models.base_store if project is None else models.store(project)
        try:
            names = store.versions()
            current = store.current_version()
            listed = []
            for name in names:
                manifest = store.manifest(name)
                listed.append(
                    {
                        "version": name,
                        "created_at": manifest.created_at,
                        "parent_version": manifest.parent_version,
                        "metrics": manifest.metrics,
                        "current": name == current,
                    }
                )
        except StoreError as exc:
            raise HTTPException(status_code=500, detail=str(exc)) from None
        body: dict[str, Any] = {"versions": names, "current": current, "details": listed}
        if project is not None:
            # What the project is served: its lineage's current, else the base model's.
            body["served"] = version_of(models.serving(project))
        return body

    @app.get("/status")
    def server_status() -> dict[str, Any]:
        """What the backend is doing, as JSON (Prometheus' text format is at /metrics)."""
        metrics.count_request("status")
        base = models.base()
        body: dict[str, Any] = {
            "model_version": version_of(base),
            "runtime": base.runner.name if base is not None else None,
            "loaded_models": len(models.loaded()),
            **metrics.snapshot(),
        }
        if ledger is not None:
            body["projects"] = overview(ledger, models)["projects"]
            body["training"] = {
                "running": trainer.current_job.to_dict()
                if trainer and trainer.current_job
                else None,
                "jobs": [job.to_dict() for job in ledger.jobs(limit=10)],
                "ledger": ledger.stats(),
            }
        if refresher is not None:
            # The last refresh of each project: how many tasks, and what their scores mean.
            body["refreshes"] = {
                str(project): summary.to_dict() for project, summary in refresher.last.items()
            }
        return body

    @app.post("/preannotate", status_code=202)
    def start_preannotate(request: PreannotateRequest) -> dict[str, Any]:
        """Pre-annotate a project with the model this backend serves it (what `labelloop
        preannotate` asks a running backend to do); poll GET /preannotate/{id}."""
        metrics.count_request("preannotate")
        if ledger is not None and ledger.label_config(request.project) is None:
            raise HTTPException(
                status_code=409,
                detail=f"project {request.project} was never set up with this backend: connect "
                "it in Label Studio (Settings > Model) first",
            )
        try:
            run = runs.start(
                request.project,
                missing_only=not request.all,
                limit=request.limit,
                batch_size=request.batch_size,
            )
        except LookupError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        return run.to_dict()

    @app.get("/preannotate/{run_id}")
    def preannotate_progress(run_id: Annotated[int, Path(ge=1)]) -> dict[str, Any]:
        metrics.count_request("preannotate")
        run = runs.get(run_id)
        if run is None:
            raise HTTPException(status_code=404, detail=f"no pre-annotation run {run_id} here")
        return run.to_dict()

    @app.get("/status/projects/{project_id}")
    def project_status(project_id: Annotated[int, Path(ge=1)]) -> dict[str, Any]:
        """One project: versions over time, the served version's evaluation, jobs, rollbacks."""
        metrics.count_request("status")
        if ledger is None or (
            project_id not in ledger.projects() and project_id not in models.projects()
        ):
            raise HTTPException(
                status_code=404,
                detail=f"project {project_id} is unknown here: connect it to this backend in "
                "Label Studio (Settings > Model) first",
            )
        return project_detail(ledger, models, project_id)

    install_page(
        app, ledger=ledger, models=models, label_studio_url=lambda: fetchers.credentials()[0]
    )
    return app


@dataclass
class Components:
    """What a `labelloop serve` or `labelloop worker` process runs, built once from settings."""

    settings: ServeSettings
    ledger: AnnotationLedger
    models: ProjectModels
    predictor: Predictor
    fetchers: FetcherRegistry
    refresher: Refresher | None
    trainer: Trainer
    order: LabellingOrder


def embedding_cache(model_dir: pathlib.Path) -> EmbeddingCache:
    """The backbone embeddings of a backend's images, shared by its fits, reviews and orders."""
    return EmbeddingCache(model_dir / "cache" / "embeddings.sqlite3")


def labelling_order(settings: ServeSettings, embeddings: EmbeddingCache) -> LabellingOrder:
    """The order unlabelled tasks' prediction scores carry, as the settings choose it."""
    return LabellingOrder(
        strategy=settings.priority,
        horizon=settings.priority_horizon,
        embeddings=embeddings,
        fetch_workers=settings.fetch_workers,
    )


def build_components(
    settings: ServeSettings,
    trainer_settings: TrainerSettings | None = None,
    *,
    worker: bool = False,
) -> Components:
    """The base model and the projects' lineages, the annotation ledger, the embedding cache
    and the trainer. Embedded: all under MODEL_DIR, the trainer a thread of this process.
    Distributed (settings.distributed): the ledger on PostgreSQL, versions in the object store
    (MODEL_DIR a cache), and jobs on the Redis queue: a server only queues them, a `worker`
    runs them (and refreshes predictions after its promotions)."""
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    if settings.cache_dir is None:
        settings = settings.model_copy(
            update={"cache_dir": settings.model_dir / "cache" / "images"}
        )
    ledger = Ledger(settings.ledger_location())
    lineages = Lineages(
        settings.model_dir,
        store_url=settings.store_url,
        poll_seconds=settings.store_poll_seconds,
        allocate=(
            (lambda lineage, at_least: ledger.next_version_number(lineage, at_least=at_least))
            if settings.database_url
            else None
        ),
    )
    if not lineages.remote:
        # A publish killed half-way leaves a staging folder (possibly a whole model.pth).
        lineages.base().remove_stale_staging()
        known = ledger.projects()
        migrate_layout(settings.model_dir, sole_project=known[0] if len(known) == 1 else None)
        for project_id in lineages.projects():
            lineages.project(project_id).remove_stale_staging()
    models = ProjectModels(
        settings.model_dir,
        runtime=settings.runtime,
        max_loaded=settings.max_loaded_models,
        lineages=lineages,
    )
    if models.base() is None and not models.projects():
        logger.warning(
            "Starting without a model: projects start cold, predictions stay empty until "
            "their first version is trained"
        )
    fetchers = FetcherRegistry(settings)
    predictor = Predictor(batch_size=settings.batch_size, workers=settings.fetch_workers)
    (settings.model_dir / "cache").mkdir(exist_ok=True)
    # One cache for the trainer's fits and the labelling order: a fast update keeps the
    # backbone, so the pool's vectors computed for one refresh serve the next.
    embeddings = embedding_cache(settings.model_dir)
    order = labelling_order(settings, embeddings)
    # Only who trains refreshes after a promotion: the worker, in the distributed mode.
    refresher = None
    trains = worker or not settings.distributed
    if trains and (settings.refresh or settings.rename_backend):
        refresher = Refresher(
            predictor,
            fetchers.client,
            fetchers.current,
            models.serving,
            refresh=settings.refresh,
            rename_backend=settings.backend_url if settings.rename_backend else None,
            order=order,
        )
    runner = None
    if settings.queue_url is not None:
        from labelloop.loop.queue import QueueRunner, connect

        runner = QueueRunner(connect(settings.queue_url.get_secret_value()))
    trainer = Trainer(
        models=models,
        ledger=ledger,
        fetcher=fetchers.current,
        label_studio=fetchers.client,
        embeddings=embeddings,
        settings=trainer_settings or TrainerSettings(),
        on_promote=refresher.on_promote if refresher is not None else None,
        runner=runner,
    )
    return Components(settings, ledger, models, predictor, fetchers, refresher, trainer, order)


def build_app(settings: ServeSettings, trainer_settings: TrainerSettings | None = None) -> FastAPI:
    """Everything `labelloop serve` runs (`build_components`) behind the HTTP routes."""
    c = build_components(settings, trainer_settings)
    return create_app(
        c.settings,
        c.models,
        predictor=c.predictor,
        fetchers=c.fetchers,
        ledger=c.ledger,
        trainer=c.trainer,
        refresher=c.refresher,
        order=c.order,
    )
