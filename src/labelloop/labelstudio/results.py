"""Model probabilities -> Label Studio predictions, and a check of predictions against the config.

Label Studio stores a prediction whose names or labels do not match the config without a word
and never shows it, so ``validate_prediction`` is the only place such a mistake can surface.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from labelloop.labelstudio.label_config import ControlBinding, ControlMapping, LabelConfig
from labelloop.labelstudio.protocol import ChoicesValue, ResultItem, TaskPrediction
from labelloop.ml.thresholds import prediction_confidence

__all__ = [
    "ResultValidationError",
    "build_predictions",
    "validate_prediction",
]

_DECIMALS = 4


class ResultValidationError(ValueError):
    """A prediction Label Studio would store but never show: names or labels off the config."""


def build_predictions(
    probs: np.ndarray,
    thresholds: Sequence[float] | np.ndarray,
    mapping: ControlMapping,
    model_version: str,
) -> list[TaskPrediction]:
    """One prediction per row of (n_tasks, n_classes) probabilities, same order.

    A control gets a result item when at least one of its labels reaches its threshold
    (``p >= t``): all such labels for a multi-choice control, in the control's order; the most
    probable one for a single-choice control. ``meta.probabilities`` holds every label of the
    control. A task with nothing above threshold gets ``result: []``, a real "none of these".
    ``score`` is the confidence over the classes some control offers (unused classes cannot be
    shown, so they must not make a task look uncertain): low means a class sits near its
    threshold, which is what uncertainty sampling serves first.
    """
    n_classes = mapping.n_classes
    probs = _as_matrix(probs, n_classes)
    t = np.asarray(thresholds, dtype=float).reshape(-1)
    if t.shape[0] != n_classes or not np.all((t >= 0.0) & (t <= 1.0)):
        raise ValueError(
            f"expected {n_classes} thresholds in [0, 1] (one per model class), got {t.tolist()}"
        )
    bound = sorted({i for binding in mapping.bindings for i in binding.class_indices})
    scores = prediction_confidence(probs[:, bound], t[bound])
    return [
        TaskPrediction(
            result=[
                item
                for binding in mapping.bindings
                if (item := _result_item(binding, row, t)) is not None
            ],
            score=round(float(score), _DECIMALS),
            model_version=model_version,
        )
        for row, score in zip(probs, scores, strict=True)
    ]


def _as_matrix(probs: np.ndarray, n_classes: int) -> np.ndarray:
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise ValueError(
            f"probs must have shape (n_tasks, {n_classes}) to match the model classes, "
            f"got {probs.shape}"
        )
    # NaN would slip through every comparison and end as an invalid JSON score; values out of
    # [0, 1] mean logits were passed where sigmoid outputs were expected.
    bad_rows = np.flatnonzero(~np.all((probs >= 0.0) & (probs <= 1.0), axis=1))
    if bad_rows.size:
        raise ValueError(
            f"probabilities must be in [0, 1]; rows {bad_rows[:10].tolist()} are not "
            f"(first: {probs[bad_rows[0]].tolist()})"
        )
    return probs


def _result_item(binding: ControlBinding, row: np.ndarray, t: np.ndarray) -> ResultItem | None:
    indices = list(binding.class_indices)
    p = row[indices]
    above = p >= t[indices]
    if not above.any():
        return None
    if binding.control.multiple:
        labels = [label for label, on in zip(binding.labels, above, strict=True) if on]
    else:
        labels = [binding.labels[int(np.argmax(np.where(above, p, -np.inf)))]]
    return ResultItem(
        from_name=binding.control.name,
        to_name=binding.control.to_name,
        type="choices",
        value=ChoicesValue(choices=labels),
        meta={
            "probabilities": {
                label: round(float(pi), _DECIMALS)
                for label, pi in zip(binding.labels, p, strict=True)
            }
        },
    )


def validate_prediction(prediction: TaskPrediction, config: LabelConfig) -> None:
    """Raise ResultValidationError unless every result item fits a control of ``config``."""
    controls = {control.name: control for control in config.controls}
    seen: set[str] = set()
    for item in prediction.result:
        control = controls.get(item.from_name)
        if control is None:
            raise ResultValidationError(
                f"from_name {item.from_name!r} is not a Choices bound to an Image in the label "
                f"config; expected one of {sorted(controls)}"
            )
        if item.from_name in seen:
            raise ResultValidationError(f"two result items for Choices {item.from_name!r}")
        seen.add(item.from_name)
        if item.to_name != control.to_name:
            raise ResultValidationError(
                f"to_name {item.to_name!r} for Choices {control.name!r}: expected "
                f"{control.to_name!r}"
            )
        labels = item.value.choices
        unknown = [label for label in labels if label not in control.choices]
        if unknown:
            raise ResultValidationError(
                f"labels {unknown} are not choices of {control.name!r}; expected some of "
                f"{list(control.choices)}"
            )
        if len(set(labels)) != len(labels):
            raise ResultValidationError(f"Choices {control.name!r} lists a label twice: {labels}")
        if not control.multiple and len(labels) != 1:
            raise ResultValidationError(
                f"single-choice {control.name!r} takes exactly one label, got {labels}"
            )
        if not labels:
            raise ResultValidationError(
                f"the result item for {control.name!r} has no label; leave the item out instead"
            )
