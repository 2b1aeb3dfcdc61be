"""What Label Studio 1.23 sends to an ML backend and what it expects back, as pydantic models.

Request models accept unknown keys (``extra="allow"``): Label Studio sends whole task and project
objects whose fields change between versions, and a backend that refused them would break on
every upgrade. Response models hold exactly the keys Label Studio reads.
See ``docs/serving.md`` (*Routes*) for what each route does with them.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ChoicesValue",
    "NoPrediction",
    "PredictRequest",
    "PredictResponse",
    "ResultItem",
    "SetupRequest",
    "SetupResponse",
    "Task",
    "TaskPrediction",
    "WebhookEvent",
    "fits_int64",
    "project_id_from",
]

# Ids are stored in SQLite, whose integers are signed 64-bit: a larger one in a payload is
# malformed, and must be refused where it is read rather than fail deep inside a write.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def fits_int64(value: object) -> bool:
    """An int (not a bool: True is a malformed id, not id 1) that SQLite can store."""
    return (
        isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX
    )


# "<project id>.<project created-at epoch>", as /setup and /predict send it.
_PROJECT_RE = re.compile(r"^\s*(\d+)(?:\.\d+)?\s*$")

# Label Studio has sent the project as a plain number in other versions: take it as a string.
_REQUEST_CONFIG = ConfigDict(extra="allow", coerce_numbers_to_str=True)


def project_id_from(project: str | None) -> int | None:
    """The project id in a ``"<id>.<epoch>"`` (or plain ``"<id>"``) string; None when absent.

    An unrecognised format gives None rather than an error: the id only helps to reach the
    project through the API, and a prediction request must not fail for lack of it.
    """
    if project is None or not project.strip():
        return None
    match = _PROJECT_RE.match(project)
    if match is None:
        logger.warning("Unrecognised project %r: expected '<id>.<epoch>'", project)
        return None
    project_id = int(match.group(1))
    if project_id < 1:
        # Label Studio's ids start at 1; 0 would name no lineage (and no folder).
        logger.warning("Project id %d is not a Label Studio project id: ignored", project_id)
        return None
    if not fits_int64(project_id):
        logger.warning("Project id of %d digits is out of range: ignored", len(match.group(1)))
        return None
    return project_id


_MAX_DEPTH = 64


def _lone_surrogate_at(value: object, depth: int = 0) -> bool:
    """Whether a JSON value holds a string that is not valid Unicode anywhere inside it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if depth > _MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return any(
            _lone_surrogate_at(k, depth + 1) or _lone_surrogate_at(v, depth + 1)
            for k, v in value.items()
        )
    if isinstance(value, list):
        return any(_lone_surrogate_at(v, depth + 1) for v in value)
    return False


class _Request(BaseModel):
    """A request body. JSON may escape half of a surrogate pair ("\\ud800"), which Python
    decodes into a string that cannot be encoded again: logging, hashing or storing it would
    fail deep inside a handler, so such a body is refused here with a 422."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, value: object) -> object:
        if _lone_surrogate_at(value):
            raise ValueError(
                "the body holds text that is not valid Unicode (an unpaired surrogate escape "
                "such as \\ud800)"
            )
        return value


# --------------------------------------------------------------------------- /setup


class SetupRequest(_Request):
    """``POST /setup``: sent on connect and before every prediction batch (3 s timeout)."""

    model_config = ConfigDict(**_REQUEST_CONFIG, populate_by_name=True)

    project: str | None = None
    label_config: str | None = Field(default=None, alias="schema")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra_params", mode="before")
    @classmethod
    def _parse_extra_params(cls, value: object) -> object:
        # Label Studio passes what the user typed in the connect dialog: null, an object, or a
        # string that may or may not be JSON. Free text must not make /setup (and so the
        # connection) fail, so anything but a JSON object becomes {}.
        if value is None:
            return {}
        if not isinstance(value, str):
            return value
        if not value.strip():
            return {}
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            logger.warning("extra_params is not JSON (%d characters): ignored", len(value))
            return {}
        if not isinstance(parsed, dict):
            logger.warning(
                "extra_params is JSON %s, expected an object: ignored", type(parsed).__name__
            )
            return {}
        return parsed


class SetupResponse(BaseModel):
    """Label Studio reads only ``model_version``; ``warnings`` tell a person what will not work."""

    model_version: str
    warnings: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------- /predict


class Task(BaseModel):
    """A task as Label Studio sends it: only ``id`` and ``data`` are needed to predict."""

    model_config = ConfigDict(extra="allow")

    id: int
    data: dict[str, Any]


class PredictRequest(_Request):
    """``POST /predict``: tasks to predict, in the order the reply must keep."""

    model_config = _REQUEST_CONFIG

    tasks: list[Task]
    project: str | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = None


class ChoicesValue(BaseModel):
    choices: list[str]


class ResultItem(BaseModel):
    """One control's answer for one task: the labels chosen in one ``Choices``."""

    from_name: str
    to_name: str
    type: Literal["choices"] = "choices"
    value: ChoicesValue
    meta: dict[str, Any] | None = None

    # No return annotation on purpose: with one, pydantic would describe the serialized item
    # by that type (a bare object) instead of by the fields above in the OpenAPI schema.
    @model_serializer(mode="wrap")
    def _drop_missing_meta(self, handler: SerializerFunctionWrapHandler):
        # Label Studio stores every key it gets: a "meta": null would end up in every export.
        data: dict[str, Any] = handler(self)
        if data.get("meta") is None:
            data.pop("meta", None)
        return data


class TaskPrediction(BaseModel):
    """The prediction for one task. ``score`` is a confidence: low means "ask a person first"."""

    result: list[ResultItem]
    # NaN or infinity would make the reply invalid JSON: refuse it where it is made.
    score: float = Field(allow_inf_nan=False)
    model_version: str


# An empty list in place of a task's prediction: "no prediction for this task", keeping the
# results aligned with the tasks.
NoPrediction = Annotated[list[Any], Field(max_length=0)]


class PredictResponse(BaseModel):
    """One item per task of the request, same order; Label Studio falls back to one request
    per task when the count differs."""

    results: list[TaskPrediction | NoPrediction]


# --------------------------------------------------------------------------- /webhook


class WebhookEvent(_Request):
    """``POST /webhook``: ``action`` names the event, the rest depends on it; the events used
    are listed in docs/incremental-training.md (*The ledger*)."""

    model_config = ConfigDict(extra="allow")

    action: str
    project: dict[str, Any] | int | None = None

    def project_id(self) -> int | None:
        """The project's id: ``project`` is a full project object or just its id."""
        project_id = self.project.get("id") if isinstance(self.project, dict) else self.project
        return project_id if fits_int64(project_id) else None
