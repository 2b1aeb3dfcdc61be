"""Webhook payloads (real ones recorded from Label Studio 1.23.2) -> annotation records."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from labelloop.labelstudio.annotations import (
    AnnotationPayloadError,
    AnnotationRecord,
    deleted_ids_from_event,
    record_from_task_annotation,
    records_from_event,
)
from labelloop.labelstudio.protocol import WebhookEvent

FIXTURES = Path(__file__).parents[1] / "fixtures" / "label-studio-1.23.2"
IMAGE = "/data/upload/1/a37db019-upl_0.png"


def payload(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"webhook_{name}.json").read_text())


def event(body: dict[str, Any]) -> WebhookEvent:
    return WebhookEvent.model_validate(body)


def test_annotation_created() -> None:
    (record,) = records_from_event(event(payload("annotation_created")))
    assert record == AnnotationRecord(
        project_id=1,
        annotation_id=1,
        task_id=1,
        image_ref=IMAGE,
        labels={"component": ("nut", "gear"), "defect": ("rust",)},
        updated_at="2026-11-25T00:48:58.292197Z",
        was_cancelled=False,
        ground_truth=False,
        completed_by=1,
    )


def test_annotation_updated() -> None:
    (record,) = records_from_event(event(payload("annotation_updated")))
    assert (record.annotation_id, record.task_id, record.image_ref) == (1, 1, IMAGE)
    assert record.labels == {"component": ("bolt",), "defect": ("scratch",)}
    assert record.updated_at == "2026-11-25T00:49:00.056155Z"


def test_annotations_deleted() -> None:
    assert deleted_ids_from_event(event(payload("annotations_deleted"))) == [3]


@pytest.mark.parametrize("name", ["start_training", "project_updated", "annotations_deleted"])
def test_events_without_annotations_are_refused(name: str) -> None:
    with pytest.raises(AnnotationPayloadError, match="no annotations"):
        records_from_event(event(payload(name)))


@pytest.mark.parametrize("name", ["start_training", "project_updated", "annotation_created"])
def test_events_without_deletions_are_refused(name: str) -> None:
    with pytest.raises(AnnotationPayloadError, match="delete no annotations"):
        deleted_ids_from_event(event(payload(name)))


def bulk_payload() -> dict[str, Any]:
    """ANNOTATIONS_CREATED as Label Studio sends it: lists of annotations and of tasks."""
    body = payload("annotation_created")
    body["action"] = "ANNOTATIONS_CREATED"
    annotations, tasks = [], []
    for n, labels in ((1, ["bolt"]), (2, ["nut"]), (3, [])):
        annotation = copy.deepcopy(body["annotation"])
        task = copy.deepcopy(body["task"])
        annotation.update(id=100 + n, task=n)
        annotation["result"] = [
            {"from_name": "component", "to_name": "image", "type": "choices",
             "value": {"choices": labels}}
        ]  # fmt: skip
        task.update(id=n, data={"image": f"/data/upload/1/{n}.png"})
        annotations.append(annotation)
        tasks.append(task)
    body["annotation"], body["task"] = annotations, tasks
    return body


def test_bulk_pairs_annotations_with_their_tasks_by_id() -> None:
    body = bulk_payload()
    body["task"].reverse()  # pairing must follow the annotation's task id, not the order
    records = records_from_event(event(body))
    assert [(r.annotation_id, r.task_id, r.image_ref) for r in records] == [
        (101, 1, "/data/upload/1/1.png"),
        (102, 2, "/data/upload/1/2.png"),
        (103, 3, "/data/upload/1/3.png"),
    ]
    assert [r.labels["component"] for r in records] == [("bolt",), ("nut",), ()]


def test_bulk_pairs_by_position_when_annotations_name_no_task() -> None:
    body = bulk_payload()
    for annotation in body["annotation"]:
        del annotation["task"]
    records = records_from_event(event(body))
    assert [(r.annotation_id, r.task_id) for r in records] == [(101, 1), (102, 2), (103, 3)]


def test_annotation_without_task_and_no_pairing_is_refused() -> None:
    body = bulk_payload()
    for annotation in body["annotation"]:
        del annotation["task"]
    body["task"] = body["task"][:2]
    with pytest.raises(AnnotationPayloadError, match="names no task"):
        records_from_event(event(body))


def test_empty_control_is_none_of_these_when_config_known() -> None:
    body = payload("annotation_created")
    body["annotation"]["result"] = body["annotation"]["result"][:1]  # "defect" left empty
    (record,) = records_from_event(event(body))
    assert record.labels == {"component": ("nut", "gear"), "defect": ()}


def test_without_config_only_answered_controls_and_image_key_fallbacks() -> None:
    body = payload("annotation_created")
    del body["project"]["label_config"]
    body["annotation"]["result"] = body["annotation"]["result"][:1]
    body["task"]["data"] = {"caption": 3, "photo": "/data/upload/1/p.png"}
    (record,) = records_from_event(event(body))
    assert record.labels == {"component": ("nut", "gear")}
    assert record.image_ref == "/data/upload/1/p.png"


def test_config_names_the_image_key() -> None:
    config = (
        '<View><Image name="img" value="$photo"/><Choices name="c" toName="img">'
        '<Choice value="a"/></Choices></View>'
    )
    task = {"id": 5, "data": {"image": "/wrong.png", "photo": "/right.png"}}
    record = record_from_task_annotation(2, task, {"id": 9, "result": []}, config)
    assert (record.image_ref, record.labels) == ("/right.png", {"c": ()})
    missing = record_from_task_annotation(
        2, {"id": 5, "data": {"image": "/x.png"}}, {"id": 9}, config
    )
    assert missing.image_ref is None


def test_api_task_shape_with_nested_ids_and_flags() -> None:
    """Tasks from the API: annotation.task and completed_by may be objects with an id."""
    task = {"id": 7, "data": {"image": "s3://bucket/a.png"}}
    annotation = {
        "id": 70,
        "task": {"id": 7},
        "completed_by": {"id": 4, "email": "a@example.com"},
        "was_cancelled": True,
        "ground_truth": True,
        "result": [],
        "updated_at": "2026-11-25T01:00:00+01:00",
    }
    record = record_from_task_annotation(3, task, annotation, None)
    assert (record.task_id, record.completed_by) == (7, 4)
    assert (record.was_cancelled, record.ground_truth) == (True, True)
    assert record.updated_at == "2026-11-25T00:00:00.000000Z"
    assert record.labels == {}


def test_missing_updated_at_is_now() -> None:
    before = datetime.now(UTC)
    record = record_from_task_annotation(1, {"id": 1, "data": {}}, {"id": 1}, None)
    assert before <= datetime.fromisoformat(record.updated_at) <= datetime.now(UTC)
    assert record.image_ref is None


def test_task_only_known_by_id_still_makes_a_record() -> None:
    body = payload("annotation_created")
    del body["task"]
    (record,) = records_from_event(event(body))
    assert (record.task_id, record.image_ref) == (1, None)


def mutate(path: tuple[str, ...], value: object) -> dict[str, Any]:
    body = payload("annotation_created")
    target = body
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return body


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("annotation", "id"), KeyError, "no integer id"),
        (("annotation", "id"), "1", "no integer id"),
        (("annotation", "id"), True, "no integer id"),
        (("project", "id"), KeyError, "without a project id"),
        (("project",), KeyError, "without a project id"),
        (("annotation", "updated_at"), "yesterday", "ISO 8601"),
        (("annotation", "result"), {"choices": ["bolt"]}, "expected a list"),
        (("annotation", "task"), 2, "belongs to task 2"),
        (("annotation",), ["not an object"], "expected an object"),
    ],
)
def test_malformed_annotation_payloads(path: tuple[str, ...], value: object, message: str) -> None:
    with pytest.raises(AnnotationPayloadError, match=message):
        records_from_event(event(mutate(path, value)))


def test_missing_task_id_everywhere() -> None:
    body = mutate(("annotation", "task"), KeyError)
    del body["task"]["id"]
    with pytest.raises(AnnotationPayloadError, match="no task id"):
        records_from_event(event(body))


@pytest.mark.parametrize(
    ("annotations", "message"),
    [(None, 'without an "annotations" list'), ([{"id": "3"}], r"annotations\[0\] has no")],
)
def test_malformed_deletions(annotations: object, message: str) -> None:
    body = payload("annotations_deleted")
    body["annotations"] = annotations
    with pytest.raises(AnnotationPayloadError, match=message):
        deleted_ids_from_event(event(body))
