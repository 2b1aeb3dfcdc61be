"""Probabilities -> Label Studio predictions, and validation of predictions against the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from labelloop.labelstudio.label_config import (
    ControlMapping,
    LabelConfig,
    map_controls,
    parse_label_config,
)
from labelloop.labelstudio.protocol import (
    ChoicesValue,
    PredictRequest,
    PredictResponse,
    ResultItem,
    TaskPrediction,
)
from labelloop.labelstudio.results import (
    ResultValidationError,
    build_predictions,
    validate_prediction,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "label-studio-1.23.2"
PREDICT = PredictRequest.model_validate_json(
    (FIXTURES / "predict_two_tasks.json").read_text(encoding="utf-8")
)
assert PREDICT.label_config is not None
CONFIG = parse_label_config(PREDICT.label_config)
# Model order differs from the config's on purpose; "washer" is a class no control offers.
CLASSES = ["scratch", "bolt", "rust", "nut", "gear", "crack", "washer"]
T = np.full(len(CLASSES), 0.5)

QUALITY = parse_label_config(
    '<View><Image name="image" value="$image"/>'
    '<Choices name="quality" toName="image"><Choice value="good"/><Choice value="bad"/></Choices>'
    "</View>"
)


def _probs(**by_class: float) -> np.ndarray:
    """A probability row: the given classes, 0.1 for the others."""
    row = np.full(len(CLASSES), 0.1)
    for name, p in by_class.items():
        row[CLASSES.index(name)] = p
    return row


def _one(probs: np.ndarray, t: np.ndarray, mapping: ControlMapping, version: str) -> TaskPrediction:
    """The prediction for one (n_classes,) row, through build_predictions as the server calls it."""
    (prediction,) = build_predictions(probs[np.newaxis, :], t, mapping, version)
    return prediction


@pytest.fixture
def mapping() -> ControlMapping:
    return map_controls(CONFIG, CLASSES)


def test_exact_prediction(mapping: ControlMapping) -> None:
    t = T.copy()
    t[CLASSES.index("gear")] = 0.6
    probs = _probs(bolt=0.9, nut=0.2, gear=0.6, crack=0.3, rust=0.05)
    prediction = _one(probs, t, mapping, "v7")
    body = json.loads(prediction.model_dump_json())
    assert body == {
        "result": [
            {
                "from_name": "component",
                "to_name": "image",
                "type": "choices",
                # p >= t: gear sits exactly on its threshold and is in; config order kept.
                "value": {"choices": ["bolt", "gear"]},
                "meta": {"probabilities": {"bolt": 0.9, "nut": 0.2, "gear": 0.6}},
            }
        ],
        # "defect" has nothing above threshold: no item. Gear at its threshold: confidence 0.
        "score": 0.0,
        "model_version": "v7",
    }


def test_both_controls_and_rounding(mapping: ControlMapping) -> None:
    probs = _probs(nut=0.712345, scratch=0.95, rust=0.51)
    (prediction,) = build_predictions(probs[np.newaxis, :], T, mapping, "v1")
    component, defect = prediction.result
    assert component.value.choices == ["nut"]
    assert component.meta == {"probabilities": {"bolt": 0.1, "nut": 0.7123, "gear": 0.1}}
    assert defect.from_name == "defect"
    assert defect.value.choices == ["scratch", "rust"]
    # Least certain class: rust, (0.51 - 0.5) / 0.5 = 0.02.
    assert prediction.score == 0.02


def test_nothing_above_threshold_is_an_empty_result_with_a_score(mapping: ControlMapping) -> None:
    prediction = _one(_probs(), T, mapping, "v1")
    assert prediction.result == []
    # Every bound class at 0.1 against 0.5: (0.5 - 0.1) / 0.5.
    assert prediction.score == 0.8


def test_unused_class_is_never_emitted_and_does_not_lower_the_score(
    mapping: ControlMapping,
) -> None:
    far = _probs(bolt=1.0, washer=1.0)
    prediction = _one(far, T, mapping, "v1")
    emitted = [label for item in prediction.result for label in item.value.choices]
    assert emitted == ["bolt"]
    assert all("washer" not in (item.meta or {})["probabilities"] for item in prediction.result)
    # washer exactly at its threshold would make the task look maximally uncertain if counted.
    assert _one(_probs(washer=0.5), T, mapping, "v1").score == 0.8


def test_score_low_near_threshold_high_when_far(mapping: ControlMapping) -> None:
    probs = np.stack(
        [
            _probs(bolt=0.99, nut=0.01, gear=0.01, scratch=0.01, crack=0.99, rust=0.01),
            _probs(bolt=0.99, nut=0.01, gear=0.01, scratch=0.01, crack=0.52, rust=0.01),
            _probs(bolt=0.99, nut=0.01, gear=0.01, scratch=0.01, crack=0.50, rust=0.01),
        ]
    )
    scores = [p.score for p in build_predictions(probs, T, mapping, "v1")]
    assert scores[0] == pytest.approx(0.98)
    assert scores[1] == pytest.approx(0.04)
    assert scores[2] == 0.0
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_single_choice_picks_the_most_probable_label_above_threshold() -> None:
    mapping = map_controls(QUALITY, ["good", "bad"])
    t = np.array([0.3, 0.8])
    # good has the larger margin over its threshold, bad the higher probability.
    prediction = _one(np.array([0.8, 0.9]), t, mapping, "v1")
    (item,) = prediction.result
    assert item.value.choices == ["bad"]
    assert item.meta == {"probabilities": {"good": 0.8, "bad": 0.9}}
    # bad is below its threshold here: good is the only candidate despite a lower probability.
    (item,) = _one(np.array([0.35, 0.7]), t, mapping, "v1").result
    assert item.value.choices == ["good"]
    assert _one(np.array([0.1, 0.1]), t, mapping, "v1").result == []


def test_fixture_config_with_a_six_class_model_gives_valid_predictions() -> None:
    classes = ["crack", "gear", "bolt", "rust", "scratch", "nut"]
    mapping = map_controls(CONFIG, classes)
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(len(PREDICT.tasks), len(classes)))
    thresholds = rng.uniform(0.2, 0.8, size=len(classes))
    predictions = build_predictions(probs, thresholds, mapping, "v2")
    assert len(predictions) == len(PREDICT.tasks)
    for prediction in predictions:
        validate_prediction(prediction, CONFIG)
    # And at scale, with every pattern of labels.
    many = build_predictions(rng.uniform(size=(500, 6)), thresholds, mapping, "v2")
    for prediction in many:
        validate_prediction(prediction, CONFIG)
        assert 0.0 <= prediction.score <= 1.0
    response = json.loads(PredictResponse(results=[*predictions, []]).model_dump_json())
    assert len(response["results"]) == len(PREDICT.tasks) + 1


def test_build_predictions_with_no_tasks(mapping: ControlMapping) -> None:
    assert build_predictions(np.zeros((0, len(CLASSES))), T, mapping, "v1") == []


@pytest.mark.parametrize(
    ("probs", "message"),
    [
        (np.full((2, 3), 0.5), r"shape \(n_tasks, 7\).*\(2, 3\)"),
        (np.full(7, 0.5), r"shape \(n_tasks, 7\)"),
        (np.array([[0.5] * 6 + [np.nan]]), r"\[0, 1\]; rows \[0\]"),
        (np.array([[0.5] * 7, [0.5] * 6 + [3.2]]), r"\[0, 1\]; rows \[1\]"),
    ],
)
def test_bad_probabilities(mapping: ControlMapping, probs: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_predictions(probs, T, mapping, "v1")


@pytest.mark.parametrize("thresholds", [np.full(6, 0.5), np.full(7, np.nan), np.full(7, 1.5)])
def test_bad_thresholds(mapping: ControlMapping, thresholds: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected 7 thresholds in"):
        build_predictions(np.full((1, 7), 0.5), thresholds, mapping, "v1")


# --------------------------------------------------------------------------- validation


def _with(*items: ResultItem) -> TaskPrediction:
    return TaskPrediction(result=list(items), score=0.5, model_version="v1")


def _item(from_name: str, labels: list[str], to_name: str = "image") -> ResultItem:
    return ResultItem(
        from_name=from_name, to_name=to_name, type="choices", value=ChoicesValue(choices=labels)
    )


def test_valid_prediction_passes() -> None:
    validate_prediction(
        _with(_item("component", ["nut", "bolt"]), _item("defect", ["rust"])), CONFIG
    )
    validate_prediction(_with(), CONFIG)
    validate_prediction(_with(_item("quality", ["good"])), QUALITY)


@pytest.mark.parametrize(
    ("prediction", "config", "message"),
    [
        (_with(_item("components", ["bolt"])), CONFIG, "from_name 'components'"),
        (_with(_item("component", ["bolt"], to_name="img")), CONFIG, "to_name 'img'.*'image'"),
        (_with(_item("component", ["washer"])), CONFIG, r"\['washer'\] are not choices"),
        # A label of another control is as wrong as an unknown one.
        (_with(_item("component", ["rust"])), CONFIG, r"\['rust'\] are not choices"),
        (_with(_item("quality", ["good", "bad"])), QUALITY, "single-choice 'quality'"),
        (_with(_item("quality", [])), QUALITY, "single-choice 'quality'"),
        (_with(_item("component", [])), CONFIG, "no label"),
        (_with(_item("component", ["bolt", "bolt"])), CONFIG, "twice"),
        (
            _with(_item("component", ["bolt"]), _item("component", ["nut"])),
            CONFIG,
            "two result items",
        ),
    ],
)
def test_validation_catches(prediction: TaskPrediction, config: LabelConfig, message: str) -> None:
    with pytest.raises(ResultValidationError, match=message):
        validate_prediction(prediction, config)
