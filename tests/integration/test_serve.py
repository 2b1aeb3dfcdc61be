"""The ML-backend server against recorded Label Studio payloads, a real trained model, and a
real HTTP image host that behaves like Label Studio's upload endpoint (token required)."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import FileResponse
from servers import serve_in_thread

from labelloop.runtime.projects import ProjectModels
from labelloop.serve.app import create_app
from labelloop.serve.settings import settings_from

FIXTURES = Path(__file__).parents[1] / "fixtures" / "label-studio-1.23.2"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <View><Choices name="component" toName="image" choice="multiple">
    <Choice value="bolt"/><Choice value="nut"/><Choice value="gear"/><Choice value="sprocket"/>
  </Choices></View>
  <Choices name="defect" toName="image" choice="multiple">
    <Choice value="scratch"/><Choice value="crack"/><Choice value="rust"/>
  </Choices>
</View>"""


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def image_host(demo_dataset):
    """Serves demo images at /data/upload/1/<name>, only with the right token."""
    host = FastAPI()

    @host.get("/data/upload/{project}/{name}")
    def upload(project: int, name: str, authorization: str | None = Header(None)):
        if authorization != f"Token {TOKEN}":
            raise HTTPException(401, "Authentication credentials were not provided.")
        path = demo_dataset.images_dir / name
        if not path.is_file():
            raise HTTPException(404)
        return FileResponse(path)

    with serve_in_thread(host) as url:
        yield url


@pytest.fixture(scope="module")
def models(trained_model) -> ProjectModels:
    model_dir, _ = trained_model
    return ProjectModels(model_dir)


def make_client(trained_model, models, image_host, **env: str) -> httpx.Client:
    model_dir, _ = trained_model
    settings = settings_from(
        {"model_dir": model_dir},
        {"LABEL_STUDIO_URL": image_host, "LABEL_STUDIO_API_KEY": TOKEN, **env},
    )
    from fastapi.testclient import TestClient

    return TestClient(create_app(settings, models), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(trained_model, models, image_host):
    with make_client(trained_model, models, image_host) as c:
        yield c


def tasks_for(names: list[str]) -> list[dict]:
    return [{"id": i + 1, "data": {"image": f"/data/upload/1/{n}"}} for i, n in enumerate(names)]


def test_health_and_setup_from_fixture(client, trained_model) -> None:
    _, outcome = trained_model
    health = client.get("/health").json()
    assert health["status"] == "UP" and health["model_version"] == outcome.version
    assert client.get("/").status_code == 200
    response = client.post("/setup", json=fixture("setup.json"))
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == outcome.version
    # The fixture's config lacks washer, bracket and dent: reported, never emitted.
    assert any("washer" in w for w in body["warnings"])


def test_setup_with_an_unusable_config_is_a_clear_422(client, caplog) -> None:
    payload = dict(
        fixture("setup.json"),
        schema='<View><Image name="i" value="$i"/><Text name="t" value="$t"/></View>',
    )
    with caplog.at_level(logging.WARNING, logger="labelloop.serve.app"):
        response = client.post("/setup", json=payload)
    assert response.status_code == 422
    assert "Choices" in response.json()["detail"]
    # Said where the operator looks too, not only in Label Studio's dialog.
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_a_project_sharing_no_class_with_the_base_model_starts_cold(client) -> None:
    config = (
        '<View><Image name="i" value="$i"/>'
        '<Choices name="animal" toName="i"><Choice value="cat"/></Choices></View>'
    )
    reply = client.post("/setup", json=dict(fixture("setup.json"), project="7.1", schema=config))
    assert reply.status_code == 200, reply.text
    assert reply.json()["model_version"] == "untrained"
    assert any("starts cold" in w for w in reply.json()["warnings"])
    # No prediction until its own first version, rather than an error at every task.
    tasks = [{"id": 1, "data": {"i": "/data/upload/1/x.png"}}]
    predicted = client.post(
        "/predict", json={"tasks": tasks, "label_config": config, "project": "7.1"}
    )
    assert predicted.status_code == 200
    assert predicted.json()["results"] == [[]]


def test_predict_returns_one_valid_prediction_per_task(client, demo_dataset, trained_model) -> None:
    _, outcome = trained_model
    names = sorted(p.name for p in demo_dataset.images_dir.glob("*.png"))[:20]
    payload = dict(fixture("predict_two_tasks.json"), tasks=tasks_for(names), label_config=CONFIG)
    response = client.post("/predict", json=payload)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(names)
    choices = {
        "component": {"bolt", "nut", "gear", "sprocket"},
        "defect": {"scratch", "crack", "rust"},
    }
    emitted = set()
    for item in results:
        assert item["model_version"] == outcome.version
        assert 0.0 <= item["score"] <= 1.0
        for result in item["result"]:
            assert result["type"] == "choices" and result["to_name"] == "image"
            assert set(result["value"]["choices"]) <= choices[result["from_name"]]
            assert set(result["meta"]["probabilities"]) <= choices[result["from_name"]]
            emitted |= set(result["value"]["choices"])
    assert "sprocket" not in emitted  # the model has no such class
    assert emitted, "a trained model predicts something on 20 images"


def test_a_broken_image_fails_alone(client, demo_dataset, caplog: pytest.LogCaptureFixture) -> None:
    names = sorted(p.name for p in demo_dataset.images_dir.glob("*.png"))[:3]
    tasks = tasks_for(names)
    tasks.insert(1, {"id": 99, "data": {"image": "/data/upload/1/does-not-exist.png"}})
    tasks.append({"id": 100, "data": {"text": "no image key"}})
    with caplog.at_level(logging.WARNING):
        response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [bool(r) for r in results] == [True, False, True, True, False]
    assert "Task 99 gets no prediction" in caplog.text
    metrics = client.get("/status").json()
    assert sum(metrics["predict"]["failed"].values()) >= 2


def test_wrong_token_gives_empty_predictions_not_errors(
    trained_model, models, image_host, demo_dataset
) -> None:
    with make_client(trained_model, models, image_host, LABEL_STUDIO_API_KEY="f" * 40) as c:
        name = next(demo_dataset.images_dir.glob("*.png")).name
        response = c.post("/predict", json={"tasks": tasks_for([name]), "label_config": CONFIG})
    assert response.status_code == 200
    assert response.json()["results"] == [[]]


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"label_config": "<View/>"}', 422, "tasks"),
        (b'{"tasks": "nope", "label_config": "<View/>"}', 422, "tasks"),
    ],
)
def test_bad_requests_get_clear_4xx(client, body: bytes, status: int, detail: str) -> None:
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert detail in json.dumps(response.json())
    assert "Traceback" not in response.text


def test_predict_with_a_config_that_is_not_xml(client) -> None:
    response = client.post(
        "/predict", json={"tasks": tasks_for(["x.png"]), "label_config": "<View"}
    )
    assert response.status_code == 422
    assert "XML" in response.json()["detail"]


@pytest.mark.parametrize(
    "name",
    [
        "webhook_annotation_created.json",
        "webhook_annotation_updated.json",
        "webhook_annotations_deleted.json",
        "webhook_project_updated.json",
        "webhook_start_training.json",
    ],
)
def test_webhooks_are_acknowledged(client, name: str) -> None:
    payload = fixture(name)
    response = client.post("/webhook", json=payload)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "action": payload["action"]}


def test_versions_and_status(client, trained_model) -> None:
    _, outcome = trained_model
    versions = client.get("/versions").json()
    assert versions["versions"] == [outcome.version] and versions["current"] == outcome.version
    status = client.get("/status").json()
    assert status["model_version"] == outcome.version
    assert status["requests"]["versions"] >= 1


def test_prometheus_metrics_after_predictions(client, trained_model, demo_dataset) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _, outcome = trained_model
    names = sorted(p.name for p in demo_dataset.images_dir.glob("*.png"))[:3]
    tasks = [*tasks_for(names), {"id": 77, "data": {"image": "/data/upload/1/missing.png"}}]
    body = {"tasks": tasks, "label_config": CONFIG, "project": "12.1"}
    assert client.post("/predict", json=body).status_code == 200
    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("labelloop_predictions_total", project="12") >= 3
    assert value("labelloop_predict_tasks_total", project="12") >= 4
    assert value("labelloop_image_fetch_failures_total", reason="http_4xx") >= 1
    assert value("labelloop_http_requests_total", route="/predict", method="POST", status="200")
    assert value("labelloop_model_version_info", project="base", version=outcome.version) == 1


def test_basic_auth_on_every_route(trained_model, models, image_host) -> None:
    with make_client(
        trained_model, models, image_host, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret"
    ) as c:
        for method, path in [
            ("get", "/health"),
            ("post", "/setup"),
            ("post", "/predict"),
            ("post", "/webhook"),
            ("get", "/versions"),
            ("get", "/status"),
            ("get", "/metrics"),
        ]:
            assert getattr(c, method)(path).status_code == 401, path
        good = "Basic " + base64.b64encode(b"ls:s3cret").decode()
        bad = "Basic " + base64.b64encode(b"ls:wrong").decode()
        assert c.get("/health", headers={"Authorization": good}).status_code == 200
        assert c.get("/health", headers={"Authorization": bad}).status_code == 401


def test_settings_need_both_basic_auth_values(trained_model) -> None:
    from labelloop.config import ConfigError

    with pytest.raises(ConfigError, match="BASIC_AUTH"):
        settings_from({"model_dir": trained_model[0]}, {"BASIC_AUTH_USER": "only-user"})


def test_allowed_image_hosts_from_the_environment(trained_model) -> None:
    settings = settings_from(
        {"model_dir": trained_model[0]},
        {"LABELLOOP_ALLOWED_IMAGE_HOSTS": " images.example.org, cdn.example.com ,"},
    )
    assert settings.allowed_image_hosts == ("images.example.org", "cdn.example.com")
    assert settings_from({"model_dir": trained_model[0]}, {}).allowed_image_hosts is None


def test_runtime_from_the_environment_and_its_errors(trained_model, tmp_path) -> None:
    import shutil

    from fastapi.testclient import TestClient

    from labelloop.config import ConfigError
    from labelloop.serve.app import build_app

    settings = settings_from({"model_dir": trained_model[0]}, {"LABELLOOP_RUNTIME": "torch"})
    assert settings.runtime == "torch"
    with pytest.raises(ConfigError, match="LABELLOOP_RUNTIME"):
        settings_from({"model_dir": trained_model[0]}, {"LABELLOOP_RUNTIME": "tensorrt"})
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model[0], model_dir)
    app = build_app(settings.model_copy(update={"model_dir": model_dir}))
    with TestClient(app) as client:
        assert client.get("/health").json()["model_loaded"]
        assert app.state.models.base().runner.name == "torch"


def test_oversized_request_body_is_refused_before_it_is_buffered(trained_model, models) -> None:
    from fastapi.testclient import TestClient

    settings = settings_from({"model_dir": trained_model[0]}, {"LABELLOOP_MAX_REQUEST_MB": "1"})
    with TestClient(create_app(settings, models), raise_server_exceptions=False) as client:
        huge = {"tasks": [{"id": i, "data": {"image": "x" * 1000}} for i in range(2000)]}
        reply = client.post("/predict", json=huge)
        assert reply.status_code == 413
        assert client.get("/health").status_code == 200
        small = client.post("/predict", json={"tasks": huge["tasks"][:10]})
        assert small.status_code != 413


def test_status_of_a_project(trained_model, models, image_host, tmp_path) -> None:
    from labelloop.loop.ledger import Ledger

    _, outcome = trained_model
    settings = settings_from({"model_dir": trained_model[0]}, {"LABEL_STUDIO_URL": image_host})
    from fastapi.testclient import TestClient

    ledger = Ledger(tmp_path / "ledger.sqlite3")
    try:
        with TestClient(create_app(settings, models, ledger=ledger)) as c:
            unknown = c.get("/status/projects/31")
            assert unknown.status_code == 404 and "connect it" in unknown.json()["detail"]
            assert c.post("/setup", json={"project": "31.1", "schema": CONFIG}).status_code == 200
            detail = c.get("/status/projects/31").json()
            assert detail["version"] == outcome.version and not detail["own_lineage"]
            assert detail["trainer"] == {"state": "idle", "queued": 0}
            assert detail["evaluation"]["source"] == "offline test split"
            assert set(detail["evaluation"]["per_class"]) >= {"bolt", "scratch"}
            [listed] = c.get("/status").json()["projects"]
            assert listed["id"] == 31 and listed["version"] == outcome.version
            assert c.get("/status/projects/0").status_code == 422
    finally:
        ledger.close()
