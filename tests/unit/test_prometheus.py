"""labelloop.serve.metrics: the Prometheus metrics, scraped from a small app through /metrics and
read back with prometheus_client's own parser."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.urls import FetchSettings, ImageFetchError
from labelloop.serve.metrics import REASON_LABELS, PrometheusMetrics, reason_label

LS = "http://ls.example:8080"


class Handled(Exception):
    """Answered 500 by the app's exception handler."""


def _app(metrics: PrometheusMetrics, **fastapi_kwargs: Any) -> FastAPI:
    app = FastAPI(**fastapi_kwargs)
    metrics.install(app)

    @app.get("/projects/{project_id}")
    def project(project_id: int) -> dict[str, int]:
        return {"id": project_id}

    @app.get("/handled")
    def handled() -> None:
        raise Handled

    @app.get("/unhandled")
    def unhandled() -> None:
        raise RuntimeError("a bug")

    @app.exception_handler(Handled)
    async def _handled(_: Request, exc: Handled) -> JSONResponse:
        return JSONResponse({"detail": "handled"}, status_code=500)

    return app


def _client(app: FastAPI) -> TestClient:
    # An unhandled exception answers 500 as it does under uvicorn, instead of raising here.
    return TestClient(app, raise_server_exceptions=False)


def _scrape(client: TestClient, **kwargs: Any) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, from /metrics parsed by prometheus_client."""
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _series(samples: dict[tuple[str, frozenset], float], name: str) -> dict[frozenset, float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


# --------------------------------------------------------------------------- HTTP requests


def test_requests_are_counted_by_route_template_method_and_status() -> None:
    client = _client(_app(PrometheusMetrics()))
    assert client.get("/projects/7").status_code == 200
    assert client.get("/projects/8").status_code == 200
    assert client.get("/projects/not-a-number").status_code == 422
    assert client.get("/no/such/path/123").status_code == 404
    assert client.post("/projects/7").status_code == 405
    assert client.get("/handled").status_code == 500
    assert client.get("/unhandled").status_code == 500
    assert client.request("BREW", "/projects/7").status_code == 405

    samples = _scrape(client)
    requests = _series(samples, "labelloop_http_requests_total")
    assert requests == {
        frozenset({"route": "/projects/{project_id}", "method": "GET", "status": "200"}.items()): 2,
        frozenset({"route": "/projects/{project_id}", "method": "GET", "status": "422"}.items()): 1,
        frozenset({"route": "unmatched", "method": "GET", "status": "404"}.items()): 1,
        frozenset(
            {"route": "/projects/{project_id}", "method": "POST", "status": "405"}.items()
        ): 1,
        frozenset({"route": "/handled", "method": "GET", "status": "500"}.items()): 1,
        frozenset({"route": "/unhandled", "method": "GET", "status": "500"}.items()): 1,
        # A method outside the standard ones must not open a series of its own.
        frozenset(
            {"route": "/projects/{project_id}", "method": "other", "status": "405"}.items()
        ): 1,
    }
    duration = "labelloop_http_request_duration_seconds_count"
    assert _value(samples, duration, route="/projects/{project_id}", method="GET") == 3
    assert _value(samples, duration, route="unmatched", method="GET") == 1
    assert _value(samples, duration, route="/unhandled", method="GET") == 1
    # No raw path ever becomes a label.
    assert not any(
        "/projects/7" in value or "/no/such" in value
        for _, labels in samples
        for _, value in labels
    )


def test_request_durations_fall_into_buckets() -> None:
    client = _client(_app(PrometheusMetrics()))
    client.get("/projects/1")
    samples = _scrape(client)
    buckets = {
        dict(labels)["le"]: value
        for labels, value in _series(
            samples, "labelloop_http_request_duration_seconds_bucket"
        ).items()
        if dict(labels)["route"] == "/projects/{project_id}"
    }
    assert buckets["+Inf"] == 1
    assert sorted(buckets.values()) == list(buckets.values())  # cumulative
    total = _value(
        samples,
        "labelloop_http_request_duration_seconds_sum",
        route="/projects/{project_id}",
        method="GET",
    )
    assert total is not None and total > 0


def test_a_scrape_is_counted_under_the_metrics_route() -> None:
    client = _client(_app(PrometheusMetrics()))
    labels = {"route": "/metrics", "method": "GET", "status": "200"}
    # The first scrape's own request ends after its body was rendered.
    assert _value(_scrape(client), "labelloop_http_requests_total", **labels) is None
    assert _value(_scrape(client), "labelloop_http_requests_total", **labels) == 1


def test_routes_of_included_routers_keep_their_prefixes() -> None:
    metrics = PrometheusMetrics()
    app = FastAPI()
    metrics.install(app)
    router, nested = APIRouter(), APIRouter()

    @router.get("/items/{item_id}")
    def item(item_id: int) -> int:
        return item_id

    @nested.get("/files/{name:path}")
    def file(name: str) -> str:
        return name

    router.include_router(nested, prefix="/nested")
    app.include_router(router, prefix="/api")
    app.include_router(router, prefix="/v2")  # the same routes under a second prefix
    client = _client(app)
    assert client.get("/api/items/3").status_code == 200
    assert client.get("/v2/items/4").status_code == 200
    assert client.get("/v2/items/5").status_code == 200
    assert client.get("/api/nested/files/a/b.png").status_code == 200
    assert client.get("/api/nope").status_code == 404

    requests = _series(_scrape(client), "labelloop_http_requests_total")
    assert {tuple(sorted(labels)): value for labels, value in requests.items()} == {
        (("method", "GET"), ("route", "/api/items/{item_id}"), ("status", "200")): 1,
        (("method", "GET"), ("route", "/v2/items/{item_id}"), ("status", "200")): 2,
        # As OpenAPI names it, without the convertor.
        (("method", "GET"), ("route", "/api/nested/files/{name}"), ("status", "200")): 1,
        (("method", "GET"), ("route", "unmatched"), ("status", "404")): 1,
    }


# --------------------------------------------------------------------------- observe_*


def test_observe_predict_counts_tasks_predictions_and_failure_reasons() -> None:
    metrics = PrometheusMetrics()
    client = _client(_app(metrics))
    metrics.observe_predict(
        3,
        tasks=10,
        predicted=6,
        failed={
            "HTTP 404 Not Found from http://host/a.png": 2,
            "HTTP 410 Gone from http://host/b.png": 1,
            "timed out after 15 s fetching http://host/c.png": 1,
        },
    )
    metrics.observe_predict(3, tasks=2, predicted=2, failed={})
    metrics.observe_predict(None, tasks=1, predicted=0, failed={"invalid result": 1, "x": 0})

    samples = _scrape(client)
    assert _series(samples, "labelloop_predict_tasks_total") == {
        frozenset({("project", "3")}): 12,
        frozenset({("project", "unknown")}): 1,
    }
    # A project with nothing predicted gets no series rather than a 0 it never counted.
    assert _series(samples, "labelloop_predictions_total") == {frozenset({("project", "3")}): 8}
    assert _series(samples, "labelloop_image_fetch_failures_total") == {
        frozenset({("reason", "http_4xx")}): 3,
        frozenset({("reason", "timeout")}): 1,
        frozenset({("reason", "invalid_result")}): 1,
    }


def test_observe_job_counts_states_and_times_jobs_that_ran() -> None:
    metrics = PrometheusMetrics()
    client = _client(_app(metrics))
    metrics.observe_job("fast", "succeeded", 4.0)
    metrics.observe_job("fast", "rejected", 2.0)
    metrics.observe_job("full", "failed", 1800.0)
    metrics.observe_job("full", "skipped", None)

    samples = _scrape(client)
    assert _series(samples, "labelloop_training_jobs_total") == {
        frozenset({"kind": "fast", "state": "succeeded"}.items()): 1,
        frozenset({"kind": "fast", "state": "rejected"}.items()): 1,
        frozenset({"kind": "full", "state": "failed"}.items()): 1,
        frozenset({"kind": "full", "state": "skipped"}.items()): 1,
    }
    seconds = "labelloop_training_job_duration_seconds"
    assert _value(samples, f"{seconds}_count", kind="fast") == 2
    assert _value(samples, f"{seconds}_sum", kind="fast") == 6.0
    # The skipped job never ran: counted, but not timed.
    assert _value(samples, f"{seconds}_count", kind="full") == 1
    assert _value(samples, f"{seconds}_sum", kind="full") == 1800.0
    # Buckets reach hours, so a 30-minute job is not lumped in with everything above a minute.
    assert _value(samples, f"{seconds}_bucket", kind="full", le="1200.0") == 0
    assert _value(samples, f"{seconds}_bucket", kind="full", le="1800.0") == 1


def test_observe_model_load() -> None:
    metrics = PrometheusMetrics()
    client = _client(_app(metrics))
    metrics.observe_model_load(0.75)
    metrics.observe_model_load(2.0)
    samples = _scrape(client)
    assert _value(samples, "labelloop_model_load_seconds_count") == 2
    assert _value(samples, "labelloop_model_load_seconds_sum") == 2.75
    assert _value(samples, "labelloop_model_load_seconds_bucket", le="1.0") == 1


# --------------------------------------------------------------------------- scrape-time values


def test_scrape_time_callbacks_are_read_at_each_scrape() -> None:
    ledger = {"1": 5, "2": 0}
    queue = [3]
    versions = {"base": "base-v1", "1": "p1-v4"}
    metrics = PrometheusMetrics(ledger_sizes=lambda: ledger)
    metrics.set_queue_length(lambda: queue[0])
    metrics.set_model_versions(lambda: versions)
    client = _client(_app(metrics))

    samples = _scrape(client)
    assert _series(samples, "labelloop_ledger_annotations") == {
        frozenset({("project", "1")}): 5,
        frozenset({("project", "2")}): 0,
    }
    assert _value(samples, "labelloop_training_queue_jobs") == 3
    assert _series(samples, "labelloop_model_version_info") == {
        frozenset({"project": "base", "version": "base-v1"}.items()): 1,
        frozenset({"project": "1", "version": "p1-v4"}.items()): 1,
    }

    ledger["1"] = 9
    queue[0] = 0
    versions["1"] = "p1-v5"
    samples = _scrape(client)
    assert _value(samples, "labelloop_ledger_annotations", project="1") == 9
    assert _value(samples, "labelloop_training_queue_jobs") == 0
    assert _series(samples, "labelloop_model_version_info") == {
        frozenset({"project": "base", "version": "base-v1"}.items()): 1,
        frozenset({"project": "1", "version": "p1-v5"}.items()): 1,
    }

    metrics.set_queue_length(None)
    assert _value(_scrape(client), "labelloop_training_queue_jobs") is None


def _broken() -> Any:
    raise RuntimeError("ledger is locked")


@pytest.mark.parametrize(
    ("broken", "missing"),
    [
        ("ledger_sizes", "labelloop_ledger_annotations"),
        ("queue_length", "labelloop_training_queue_jobs"),
        ("model_versions", "labelloop_model_version_info"),
    ],
)
def test_a_raising_callback_is_logged_and_left_out_of_the_scrape(
    broken: str, missing: str, caplog: pytest.LogCaptureFixture
) -> None:
    callbacks: dict[str, Callable[[], Any]] = {
        "ledger_sizes": lambda: {"1": 2},
        "queue_length": lambda: 1,
        "model_versions": lambda: {"base": "v1"},
    }
    callbacks[broken] = _broken
    metrics = PrometheusMetrics(**callbacks)
    client = _client(_app(metrics))
    metrics.observe_model_load(1.0)

    with caplog.at_level(logging.ERROR, logger="labelloop.serve.metrics"):
        samples = _scrape(client)

    names = {name for name, _ in samples}
    assert missing not in names
    # Everything else is still there.
    expected = {
        "labelloop_ledger_annotations",
        "labelloop_training_queue_jobs",
        "labelloop_model_version_info",
        "labelloop_model_load_seconds_count",
    }
    assert expected - {missing} <= names
    assert [r.getMessage() for r in caplog.records] == [
        f"Metrics callback for {missing} failed; left out of this scrape"
    ]
    assert caplog.records[0].exc_info is not None


def test_a_callback_with_a_bad_value_drops_its_family_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sizes: Mapping[str, Any] = {"1": 3, "2": "lots"}
    metrics = PrometheusMetrics(ledger_sizes=lambda: sizes)
    client = _client(_app(metrics))
    with caplog.at_level(logging.ERROR, logger="labelloop.serve.metrics"):
        samples = _scrape(client)
    assert _series(samples, "labelloop_ledger_annotations") == {}
    assert len(caplog.records) == 1


# --------------------------------------------------------------------------- isolation


def test_two_instances_share_no_state() -> None:
    first, second = PrometheusMetrics(), PrometheusMetrics()
    first_client, second_client = _client(_app(first)), _client(_app(second))
    first_client.get("/projects/1")
    first.observe_predict(1, tasks=4, predicted=4, failed={})
    first.observe_job("fast", "succeeded", 1.0)
    first.set_queue_length(lambda: 7)

    samples = _scrape(second_client)
    assert _series(samples, "labelloop_http_requests_total") == {}
    assert _series(samples, "labelloop_predict_tasks_total") == {}
    assert _series(samples, "labelloop_training_jobs_total") == {}
    assert _value(samples, "labelloop_training_queue_jobs") is None
    assert _value(_scrape(first_client), "labelloop_training_queue_jobs") == 7
    assert first.registry is not second.registry


def test_nothing_goes_to_the_global_registry() -> None:
    metrics = PrometheusMetrics()
    metrics.observe_model_load(1.0)
    assert REGISTRY.get_sample_value("labelloop_model_load_seconds_count") is None
    assert metrics.registry.get_sample_value("labelloop_model_load_seconds_count") == 1


# --------------------------------------------------------------------------- the /metrics route

_BASIC = HTTPBasic(auto_error=False)


def _require_basic(
    credentials: Annotated[HTTPBasicCredentials | None, Depends(_BASIC)],
) -> None:
    if credentials is None or (credentials.username, credentials.password) != ("ml", "secret"):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED, headers={"WWW-Authenticate": "Basic"}
        )


def test_metrics_inherit_the_apps_dependencies() -> None:
    client = _client(_app(PrometheusMetrics(), dependencies=[Depends(_require_basic)]))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", auth=("ml", "wrong")).status_code == 401
    samples = _scrape(client, auth=("ml", "secret"))
    # The refused scrapes were counted like any other request.
    labels = {"route": "/metrics", "method": "GET", "status": "401"}
    assert _value(samples, "labelloop_http_requests_total", **labels) == 2


def test_metrics_route_takes_dependencies_of_its_own() -> None:
    metrics = PrometheusMetrics()
    app = FastAPI()
    metrics.install(app, path=None)
    metrics.metrics_route(app, path="/internal/metrics", dependencies=[Depends(_require_basic)])

    @app.get("/open")
    def open_route() -> str:
        return "ok"

    client = _client(app)
    assert client.get("/open").status_code == 200  # the app itself stays open
    assert client.get("/metrics").status_code == 404  # path=None added no route
    assert client.get("/internal/metrics").status_code == 401
    response = client.get("/internal/metrics", auth=("ml", "secret"))
    assert response.status_code == 200
    assert "labelloop_http_requests_total" in response.text
    assert "/metrics" not in app.openapi()["paths"]
    assert "/internal/metrics" not in app.openapi()["paths"]


# --------------------------------------------------------------------------- reason_label


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("HTTP 404 Not Found from http://host/a.png", "http_4xx"),
        ("HTTP 429 Too Many Requests from http://host/a.png", "http_4xx"),
        ("HTTP 500 Internal Server Error from http://host/a.png", "http_5xx"),
        ("HTTP 503 error from http://host/a.png", "http_5xx"),
        ("HTTP 401 from http://ls/x.png: no API token was sent; set LABEL_STUDIO_API_KEY", "auth"),
        ("HTTP 403 from http://ls/x.png: Label Studio refused the API token; set ...", "auth"),
        ("Label Studio refused the personal access token (HTTP 401 from POST ...)", "auth"),
        ("Label Studio's answer to POST http://ls/api/token/refresh has no 'access' token", "auth"),
        ("Label Studio could not be reached at http://ls to exchange the personal", "connection"),
        ("HTTP 302 redirect without a Location from http://host/a.png", "redirect"),
        ("redirect loop at http://host/a.png", "redirect"),
        ("too many redirects (more than 5) fetching http://host/a.png", "redirect"),
        ("http://host/a.png redirected to an unsupported URL ftp://x/a.png", "redirect"),
        ("timed out after 15 s fetching http://host/a.png", "timeout"),
        ("image at http://host/a.png is larger than 50 MiB (max_image_bytes)", "too_large"),
        ("image /data/a.png is larger than 50 MiB (max_image_bytes)", "too_large"),
        ("image too large to decode safely: Image size (1) exceeds limit", "too_large"),
        ("image of 90000x90000 pixels exceeds the limit of 1 pixels (possible ...)", "too_large"),
        ("could not download http://host/a.png (ConnectError: [Errno 111] refused)", "connection"),
        ("refusing to fetch http://nohost/a.png: cannot resolve host 'nohost' (...)", "connection"),
        (
            "refusing to fetch http://h/a.png: host 'h' is not among the allowed hosts",
            "blocked_url",
        ),
        ("refusing to fetch http://h/a.png: the connection went to 169.254.169.254", "blocked_url"),
        ("refusing local file '../etc/passwd': paths must be relative to ...", "blocked_url"),
        ("malformed image URL http://[::1/a.png: Invalid IPv6 URL", "bad_url"),
        ("unsupported URL scheme 'ftp' in ftp://host/a.png", "bad_url"),
        ("unsupported image URL a.png: expected an http(s) URL, a cloud storage URI", "bad_url"),
        ("cannot fetch s3://b/a.png: cloud storage URIs are resolved by Label Studio", "bad_url"),
        ("local file /data/a.png not found: check that LABEL_STUDIO_LOCAL_FILES_...", "local_file"),
        ("local file /data/fifo is not a regular file", "local_file"),
        ("cannot read local file /data/a.png: Permission denied", "local_file"),
        ("not an image (format not recognised)", "not_an_image"),
        ("empty image file (0 bytes)", "not_an_image"),
        ("corrupt or truncated image (OSError: image file is truncated)", "corrupt_image"),
        ("task data has no 'image' image URL", "no_url"),
        ("invalid result", "invalid_result"),
        ("unknown", "other"),
        ("KeyError", "other"),
        ("", "other"),
        # A URL from task data never decides the label: these are what their start says.
        ("HTTP 404 Not Found from http://host/timed out after/corrupt.png", "http_4xx"),
        ("timed out after 5 s fetching http://host/HTTP 500/not an image", "timeout"),
        ("could not download http://h/image of 1x1 pixels exceeds (ConnectError)", "connection"),
        ("redirect loop at http://host/a is larger than 1 MiB (max_image_bytes)", "redirect"),
        ("http://h/HTTP 404 redirected to an unsupported URL ftp://h/timed out", "redirect"),
    ],
)
def test_reason_label(text: str, label: str) -> None:
    assert reason_label(text) == label
    assert label in REASON_LABELS


def test_reason_labels_are_few_and_short() -> None:
    assert len(REASON_LABELS) <= 20
    assert all(label.isidentifier() and label.islower() for label in REASON_LABELS)
    assert reason_label("x" * 10_000) in REASON_LABELS


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((16, 16), 64).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


_TRUNCATED_PNG = _truncated_png()


def _fetch_failure(
    settings: FetchSettings, url: str, respond: Callable[..., httpx.Response]
) -> str:
    client = httpx.Client(transport=httpx.MockTransport(respond))
    fetcher = ImageFetcher(settings, None, client=client)
    try:
        with pytest.raises(ImageFetchError) as info:
            fetcher.fetch_image(url, task_id=1)
    finally:
        client.close()
    return info.value.reason


def _raise(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        raise exc

    return respond


@pytest.mark.parametrize(
    ("url", "respond", "label"),
    [
        ("/data/upload/1/a.png", lambda r: httpx.Response(404), "http_4xx"),
        ("/data/upload/1/a.png", lambda r: httpx.Response(502), "http_5xx"),
        ("/data/upload/1/a.png", lambda r: httpx.Response(401), "auth"),
        ("/data/upload/1/a.png", lambda r: httpx.Response(200, content=b"text"), "not_an_image"),
        ("/data/upload/1/a.png", lambda r: httpx.Response(200, content=b""), "not_an_image"),
        (
            "/data/upload/1/a.png",
            lambda r: httpx.Response(200, content=_TRUNCATED_PNG),
            "corrupt_image",
        ),
        ("/data/upload/1/a.png", lambda r: httpx.Response(200, content=b"x" * 2048), "too_large"),
        (
            "/data/upload/1/a.png",
            lambda r: httpx.Response(302, headers={"location": str(r.url)}),
            "redirect",
        ),
        ("/data/upload/1/a.png", _raise(httpx.ConnectError("refused")), "connection"),
        ("/data/upload/1/a.png", _raise(httpx.ReadTimeout("slow")), "timeout"),
        ("/data/local-files/?d=missing.png", lambda r: httpx.Response(500), "local_file"),
        ("/data/local-files/?d=../outside.png", lambda r: httpx.Response(500), "blocked_url"),
        ("ftp://host/a.png", lambda r: httpx.Response(500), "bad_url"),
        ("a.png", lambda r: httpx.Response(500), "bad_url"),
    ],
)
def test_reason_label_of_the_fetchers_own_messages(
    tmp_path: Path, url: str, respond: Callable[..., httpx.Response], label: str
) -> None:
    """The fetcher's real wording, so a change of wording there shows up here."""
    settings = FetchSettings(label_studio_url=LS, document_root=tmp_path, max_image_bytes=1024)
    reason = _fetch_failure(settings, url, respond)
    assert reason_label(reason) == label, reason
