"""Label Studio annotations (from webhooks or the API) -> flat records for the ledger.

One record per annotation: which task and image it labels, and the labels per ``Choices``
control. With the project's label config known, every control of the config is present, and a
control the annotator left empty (Label Studio then sends no result item) is ``()``: for a
multi-label head that means "none of these", a real negative, not a missing answer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar

from labelloop.labelstudio.label_config import LabelConfig, LabelConfigError, parse_label_config
from labelloop.labelstudio.protocol import WebhookEvent, fits_int64

logger = logging.getLogger(__name__)

__all__ = [
    "ANNOTATION_ACTIONS",
    "AnnotationPayloadError",
    "AnnotationRank",
    "AnnotationRecord",
    "annotation_rank",
    "deleted_ids_from_event",
    "parse_timestamp",
    "record_from_task_annotation",
    "records_from_event",
    "winning_annotation",
]

ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})
_DELETED_ACTION = "ANNOTATIONS_DELETED"
# Without a label config, the data key Label Studio's image templates use by default.
_DEFAULT_IMAGE_KEY = "image"


class AnnotationPayloadError(ValueError):
    """An annotation payload lacks what a record needs; the message says what and where."""


@dataclass(frozen=True)
class AnnotationRecord:
    project_id: int
    annotation_id: int
    task_id: int
    image_ref: str | None  # the task's image URL (task.data[image key]); None if unknown
    labels: dict[str, tuple[str, ...]]  # Choices control name -> labels; () = "none of these"
    updated_at: str  # annotation.updated_at, UTC ISO ("...Z"); receipt time when absent
    was_cancelled: bool  # a skipped task
    ground_truth: bool
    completed_by: int | None


def parse_timestamp(value: str) -> datetime:
    """An ISO 8601 timestamp as an aware UTC datetime; a naive one is taken as UTC.

    Raises ValueError when ``value`` is not ISO 8601.
    """
    parsed = datetime.fromisoformat(value.strip())
    if parsed.tzinfo is None:
        # Label Studio stores UTC; a naive time from an export or a test means UTC too.
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59-12:00 is past datetime.max in UTC
        raise ValueError(f"{value!r} is out of range in UTC") from None


def _format_timestamp(moment: datetime) -> str:
    # One fixed width and zone: stored strings then also sort in time order.
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- which one wins


class AnnotationRank(NamedTuple):
    """What decides which of a task's annotations labels it (see :func:`winning_annotation`)."""

    was_cancelled: bool  # a skipped task: never the winner
    ground_truth: bool
    updated_ts: float  # updated_at as Unix seconds (parse_timestamp); -inf when unknown
    annotation_id: int


_T = TypeVar("_T")


def winning_annotation(items: Iterable[_T], rank: Callable[[_T], AnnotationRank]) -> _T | None:
    """The annotation that labels a task, None when every one was skipped (or there is none).

    The one rule, for exports and the ledger alike: cancelled (skipped) annotations never count;
    a ground truth beats any other, however old; among equals the most recently updated wins,
    by time rather than by the text of the timestamp, then the higher annotation id.
    """
    best: tuple[AnnotationRank, _T] | None = None
    for item in items:
        key = rank(item)
        if key.was_cancelled:
            continue
        if best is None or (key.ground_truth, key.updated_ts, key.annotation_id) > (
            best[0].ground_truth,
            best[0].updated_ts,
            best[0].annotation_id,
        ):
            best = (key, item)
    return None if best is None else best[1]


def annotation_rank(annotation: Mapping[str, Any]) -> AnnotationRank:
    """The rank of an annotation object as Label Studio exports and sends it. An updated_at
    that is missing or not ISO 8601 ranks oldest, a missing id lowest."""
    value = annotation.get("updated_at")
    try:
        updated_ts = parse_timestamp(value).timestamp() if isinstance(value, str) else -math.inf
    except ValueError:
        updated_ts = -math.inf
    return AnnotationRank(
        was_cancelled=bool(annotation.get("was_cancelled", False)),
        ground_truth=bool(annotation.get("ground_truth", False)),
        updated_ts=updated_ts,
        annotation_id=_as_id(annotation.get("id")) or 0,
    )


# --------------------------------------------------------------------------- webhooks


def records_from_event(event: WebhookEvent) -> list[AnnotationRecord]:
    """The annotations of an ANNOTATION_CREATED, ANNOTATION_UPDATED or ANNOTATIONS_CREATED event.

    ``annotation`` and ``task`` are single objects, or lists in the bulk event. Each annotation is
    paired with its task by the annotation's ``task`` id, else by position. Raises
    AnnotationPayloadError when the event is another action or a record cannot be built.
    """
    if event.action not in ANNOTATION_ACTIONS:
        raise AnnotationPayloadError(
            f"{event.action} events carry no annotations to record; expected one of "
            f"{sorted(ANNOTATION_ACTIONS)}"
        )
    project_id = _event_project_id(event)
    extra = event.model_extra or {}
    annotations = _object_list(extra.get("annotation"), "annotation", event.action)
    tasks = _object_list(extra.get("task"), "task", event.action)
    label_config = _label_config_xml(event)
    return [
        record_from_task_annotation(
            project_id, _task_for(annotation, index, annotations, tasks), annotation, label_config
        )
        for index, annotation in enumerate(annotations)
    ]


def deleted_ids_from_event(event: WebhookEvent) -> list[int]:
    """The annotation ids of an ANNOTATIONS_DELETED event (``{"annotations": [{"id": N}]}``)."""
    if event.action != _DELETED_ACTION:
        raise AnnotationPayloadError(
            f"{event.action} events delete no annotations; expected {_DELETED_ACTION}"
        )
    items = (event.model_extra or {}).get("annotations")
    if not isinstance(items, list):
        raise AnnotationPayloadError(
            f'{_DELETED_ACTION} without an "annotations" list (got {type(items).__name__}); '
            'Label Studio sends {"annotations": [{"id": N}, ...]}'
        )
    ids = []
    for position, item in enumerate(items):
        annotation_id = _as_id(item.get("id") if isinstance(item, Mapping) else item)
        if annotation_id is None:
            raise AnnotationPayloadError(
                f"{_DELETED_ACTION}: annotations[{position}] has no integer id "
                f'(got {item!r}); expected {{"id": N}}'
            )
        ids.append(annotation_id)
    return ids


def _event_project_id(event: WebhookEvent) -> int:
    project_id = event.project_id()
    if project_id is None:
        raise AnnotationPayloadError(
            f'{event.action} without a project id: expected "project": {{"id": N, ...}} '
            f"(got {type(event.project).__name__}); is the webhook sent with its payload?"
        )
    return project_id


def _label_config_xml(event: WebhookEvent) -> str | None:
    config = event.project.get("label_config") if isinstance(event.project, dict) else None
    return config if isinstance(config, str) and config.strip() else None


def _object_list(value: object, key: str, action: str) -> list[dict[str, Any]]:
    """A payload key that holds one object, or a list of them in bulk events."""
    if value is None:
        return []
    raw: list[object] = value if isinstance(value, list) else [value]
    items: list[dict[str, Any]] = []
    for position, item in enumerate(raw):
        if not isinstance(item, dict):
            raise AnnotationPayloadError(
                f"{action}: {key}[{position}] is {type(item).__name__}, expected an object"
            )
        items.append(item)
    return items


def _task_for(
    annotation: Mapping[str, Any],
    index: int,
    annotations: Sequence[Mapping[str, Any]],
    tasks: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The task an annotation labels: by its ``task`` id, else the task at the same position
    (``_task_id`` then refuses a task that is not the annotation's own)."""
    ref = annotation.get("task")
    ref_id = _id_of(ref)
    if ref_id is not None:
        for task in tasks:
            if _as_id(task.get("id")) == ref_id:
                return task
    if len(tasks) == len(annotations):
        return tasks[index]
    if ref_id is not None:
        # The task is not in the payload: its id alone still makes a record, without an image.
        return ref if isinstance(ref, dict) else {"id": ref_id}
    raise AnnotationPayloadError(
        f"annotation {annotation.get('id')!r} names no task and cannot be paired by position "
        f"({len(annotations)} annotations, {len(tasks)} tasks); expected an integer "
        '"task" in each annotation'
    )


# --------------------------------------------------------------------------- one annotation


def record_from_task_annotation(
    project_id: int,
    task: Mapping[str, Any],
    annotation: Mapping[str, Any],
    label_config: str | None,
) -> AnnotationRecord:
    """One annotation of one task, as webhooks send them and as the API lists them (a task with
    its ``annotations``). Raises AnnotationPayloadError when an id is missing or inconsistent."""
    annotation_id = _as_id(annotation.get("id"))
    if annotation_id is None:
        raise AnnotationPayloadError(
            f"an annotation of project {project_id} has no integer id (got "
            f"{annotation.get('id')!r}); expected the annotation object Label Studio sends"
        )
    config = _parsed_config(label_config)
    return AnnotationRecord(
        project_id=project_id,
        annotation_id=annotation_id,
        task_id=_task_id(task, annotation, annotation_id),
        image_ref=_image_ref(task, config),
        labels=_labels(annotation, annotation_id, config),
        updated_at=_updated_at(annotation, annotation_id),
        was_cancelled=bool(annotation.get("was_cancelled", False)),
        ground_truth=bool(annotation.get("ground_truth", False)),
        completed_by=_id_of(annotation.get("completed_by")),
    )


def _as_id(value: object) -> int | None:
    return value if fits_int64(value) else None  # type: ignore[return-value]


def _id_of(value: object) -> int | None:
    """``annotation.task`` and ``annotation.completed_by`` are an id or an object with one."""
    return _as_id(value.get("id")) if isinstance(value, Mapping) else _as_id(value)


def _task_id(task: Mapping[str, Any], annotation: Mapping[str, Any], annotation_id: int) -> int:
    task_id = _as_id(task.get("id"))
    ref_id = _id_of(annotation.get("task"))
    if task_id is not None and ref_id is not None and task_id != ref_id:
        raise AnnotationPayloadError(
            f"annotation {annotation_id} belongs to task {ref_id} but was paired with task "
            f"{task_id}; send each annotation with its own task"
        )
    resolved = task_id if task_id is not None else ref_id
    if resolved is None:
        raise AnnotationPayloadError(
            f'annotation {annotation_id} has no task id: expected an integer "task" in the '
            'annotation or "id" in its task'
        )
    return resolved


@lru_cache(maxsize=8)
def _parsed_config(label_config: str | None) -> LabelConfig | None:
    # Cached: a bulk event or a reconcile sends the same config with every annotation, and a
    # parse logs its warnings each time.
    if label_config is None:
        return None
    try:
        return parse_label_config(label_config)
    except LabelConfigError as exc:
        logger.warning("Label config unusable, recording annotations without it: %s", exc)
        return None


def _image_ref(task: Mapping[str, Any], config: LabelConfig | None) -> str | None:
    data = task.get("data")
    if not isinstance(data, Mapping):
        return None
    if config is not None:
        # The config names the key; another string of the task would be a wrong image.
        value = data.get(config.controls[0].image_key)
        return value if isinstance(value, str) and value else None
    value = data.get(_DEFAULT_IMAGE_KEY)
    if isinstance(value, str) and value:
        return value
    return next((v for v in data.values() if isinstance(v, str) and v), None)


def _labels(
    annotation: Mapping[str, Any], annotation_id: int, config: LabelConfig | None
) -> dict[str, tuple[str, ...]]:
    result = annotation.get("result") or []
    if not isinstance(result, list):
        raise AnnotationPayloadError(
            f"annotation {annotation_id} has a result of type {type(result).__name__}, "
            "expected a list of result items"
        )
    for position, item in enumerate(result):
        problem = _choices_item_problem(item)
        if problem:
            raise AnnotationPayloadError(
                f"annotation {annotation_id}: result[{position}] {problem}; expected "
                '{"from_name": ..., "type": "choices", "value": {"choices": ["label", ...]}}'
            )
    found = labels_from_result(result)
    if config is None:
        return {name: tuple(labels) for name, labels in found.items()}
    controls = {control.name: control for control in config.controls}
    ignored = sorted(set(found) - set(controls))
    if ignored:
        # Choices about text or regions, or a control removed from the config: not ours.
        logger.info(
            "annotation %d: ignoring controls not in the label config: %s", annotation_id, ignored
        )
    for name, labels in found.items():
        unknown = [x for x in labels if name in controls and x not in controls[name].choices]
        if unknown:
            # Kept: the next training adds them as classes (a choice removed from the config
            # after annotating, or one the config will gain).
            logger.info(
                "annotation %d: labels %s are not among the choices of %r",
                annotation_id,
                unknown[:10],
                name,
            )
    return {name: tuple(found.get(name, ())) for name in controls}


def _choices_item_problem(item: object) -> str | None:
    """Why a result item cannot be read, or None; only ``choices`` items are looked into."""
    if not isinstance(item, Mapping):
        return f"is {type(item).__name__}, not an object"
    if item.get("type") != "choices":
        return None
    value = item.get("value")
    choices = value.get("choices") if isinstance(value, Mapping) else None
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        return "is a choices item without a list of label strings in value.choices"
    return None


def _updated_at(annotation: Mapping[str, Any], annotation_id: int) -> str:
    value = annotation.get("updated_at")
    if value is None:
        return _format_timestamp(datetime.now(UTC))
    try:
        return _format_timestamp(parse_timestamp(str(value)))
    except ValueError:
        raise AnnotationPayloadError(
            f"annotation {annotation_id} has updated_at {value!r}, expected an ISO 8601 time "
            'such as "2026-11-25T00:48:58.292197Z"'
        ) from None


def labels_from_result(result: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Label Studio `result` items -> {Choices control name: labels}."""
    labels: dict[str, list[str]] = {}
    for item in result:
        if not isinstance(item, dict) or item.get("type") != "choices":
            continue
        choices = (item.get("value") or {}).get("choices") or []
        group = labels.setdefault(str(item.get("from_name")), [])
        group.extend(str(c) for c in choices if str(c) not in group)
    return labels
