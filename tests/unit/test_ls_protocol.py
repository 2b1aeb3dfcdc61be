"""The protocol models against request bodies recorded from a real Label Studio 1.23.2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from labelloop.labelstudio.protocol import (
    ChoicesValue,
    PredictRequest,
    PredictResponse,
    ResultItem,
    SetupRequest,
    SetupResponse,
    TaskPrediction,
    WebhookEvent,
    project_id_from,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "label-studio-1.23.2"

MODEL_OF_FIXTURE: dict[str, type[BaseModel]] = {
    "setup.json": SetupRequest,
    "predict_two_tasks.json": PredictRequest,
    "webhook_annotation_created.json": WebhookEvent,
    "webhook_annotation_updated.json": WebhookEvent,
    "webhook_annotations_deleted.json": WebhookEvent,
    "webhook_project_updated.json": WebhookEvent,
    "webhook_start_training.json": WebhookEvent,
}


def _load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def _prediction(meta: dict[str, Any] | None = None) -> TaskPrediction:
    item = ResultItem(
        from_name="component",
        to_name="image",
        type="choices",
        value=ChoicesValue(choices=["bolt", "nut"]),
        meta=meta,
    )
    return TaskPrediction(result=[item], score=0.25, model_version="v3")


def test_every_fixture_has_a_model() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.json")) == sorted(MODEL_OF_FIXTURE)


@pytest.mark.parametrize("name", sorted(MODEL_OF_FIXTURE))
def test_fixture_parses(name: str) -> None:
    model = MODEL_OF_FIXTURE[name].model_validate(_load(name))
    # Unknown keys are kept, not dropped: whole task/project objects travel through.
    assert set(model.model_dump(by_alias=True)) >= set(_load(name))


def test_setup_fixture() -> None:
    setup = SetupRequest.model_validate(_load("setup.json"))
    assert setup.project == "1.1795567726"
    assert project_id_from(setup.project) == 1
    assert setup.label_config is not None and setup.label_config.startswith("<View>")
    assert setup.hostname == "http://127.0.0.1:8080"
    assert setup.access_token == "0123456789abcdef0123456789abcdef01234567"
    assert setup.extra_params == {}


def test_setup_accepts_field_name_and_numeric_project() -> None:
    setup = SetupRequest(label_config="<View/>", project=7)  # type: ignore[arg-type]
    assert setup.label_config == "<View/>"
    assert setup.project == "7"


@pytest.mark.parametrize(
    ("extra_params", "expected"),
    [
        ('{"device": "cpu", "batch": 8}', {"device": "cpu", "batch": 8}),
        ({"device": "cpu"}, {"device": "cpu"}),
        (None, {}),
        ("", {}),
        ("not json at all", {}),
        ("[1, 2]", {}),
    ],
)
def test_setup_extra_params(extra_params: object, expected: dict[str, Any]) -> None:
    body = {**_load("setup.json"), "extra_params": extra_params}
    assert SetupRequest.model_validate(body).extra_params == expected


def test_setup_response() -> None:
    assert SetupResponse(model_version="v3").model_dump() == {"model_version": "v3", "warnings": []}


def test_predict_fixture() -> None:
    request = PredictRequest.model_validate(_load("predict_two_tasks.json"))
    assert [task.id for task in request.tasks] == [1, 2]
    assert request.tasks[0].data == {"image": "/data/upload/1/a37db019-upl_0.png"}
    assert request.tasks[0].model_extra is not None
    assert request.tasks[0].model_extra["annotations"] == []
    assert project_id_from(request.project) == 1
    assert request.label_config is not None and "<Choices" in request.label_config
    assert request.params == {"login": None, "password": None, "context": None}


def test_predict_without_tasks_is_refused() -> None:
    body = _load("predict_two_tasks.json")
    del body["tasks"]
    with pytest.raises(ValidationError, match="tasks"):
        PredictRequest.model_validate(body)


def test_predict_with_no_tasks_is_accepted() -> None:
    assert PredictRequest.model_validate({"tasks": []}).tasks == []


def test_task_needs_id_and_data() -> None:
    with pytest.raises(ValidationError, match="data"):
        PredictRequest.model_validate({"tasks": [{"id": 1}]})


def test_predict_response_json_has_exactly_the_expected_keys() -> None:
    response = PredictResponse(
        results=[_prediction(meta={"probabilities": {"bolt": 0.9, "nut": 0.7}}), [], _prediction()]
    )
    body = json.loads(response.model_dump_json())
    assert set(body) == {"results"}
    with_meta, empty, without_meta = body["results"]
    assert empty == []
    assert set(with_meta) == {"result", "score", "model_version"}
    assert with_meta["score"] == 0.25 and with_meta["model_version"] == "v3"
    (item,) = with_meta["result"]
    assert item == {
        "from_name": "component",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": ["bolt", "nut"]},
        "meta": {"probabilities": {"bolt": 0.9, "nut": 0.7}},
    }
    # No "meta": null: Label Studio would store it in every prediction.
    assert set(without_meta["result"][0]) == {"from_name", "to_name", "type", "value"}
    assert PredictResponse.model_validate(body) == response


def test_predict_response_served_by_fastapi_drops_missing_meta() -> None:
    app = FastAPI()

    @app.get("/predict")
    def predict() -> PredictResponse:
        return PredictResponse(results=[_prediction(), []])

    body = TestClient(app).get("/predict").json()
    assert body["results"][1] == []
    assert "meta" not in body["results"][0]["result"][0]
    # The OpenAPI schema still describes the result item's fields.
    schema = app.openapi()["components"]["schemas"]["ResultItem"]
    assert {"from_name", "to_name", "type", "value"} <= set(schema["properties"])


def test_predict_response_refuses_a_non_empty_list() -> None:
    with pytest.raises(ValidationError):
        PredictResponse.model_validate({"results": [["bolt"]]})


def test_score_must_be_finite() -> None:
    with pytest.raises(ValidationError, match="score"):
        TaskPrediction(result=[], score=float("nan"), model_version="v1")


def test_result_item_type_is_choices() -> None:
    with pytest.raises(ValidationError, match="choices"):
        ResultItem.model_validate(
            {"from_name": "a", "to_name": "b", "type": "labels", "value": {"choices": ["x"]}}
        )


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
def test_webhook_fixtures(name: str) -> None:
    event = WebhookEvent.model_validate(_load(name))
    assert event.action == _load(name)["action"]
    assert event.project_id() == 1


def test_webhook_annotation_payload_kept() -> None:
    event = WebhookEvent.model_validate(_load("webhook_annotation_created.json"))
    assert event.model_extra is not None
    assert event.model_extra["annotation"]["task"] == 1
    assert event.model_extra["task"]["data"]["image"]


@pytest.mark.parametrize(
    ("project", "expected"), [({"id": 5, "title": "x"}, 5), (5, 5), (None, None), ({}, None)]
)
def test_webhook_project_id(project: object, expected: int | None) -> None:
    assert WebhookEvent.model_validate({"action": "X", "project": project}).project_id() == expected


def test_webhook_needs_action() -> None:
    with pytest.raises(ValidationError, match="action"):
        WebhookEvent.model_validate({"project": {"id": 1}})


@pytest.mark.parametrize(
    ("project", "expected"),
    [
        ("1.1795567726", 1),
        ("42", 42),
        (" 3.5 ", 3),
        (None, None),
        ("", None),
        ("abc", None),
        ("0.1795567726", None),  # no Label Studio project has id 0
    ],
)
def test_project_id_from(project: str | None, expected: int | None) -> None:
    assert project_id_from(project) == expected
