from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from labelloop.ml.thresholds import ThresholdResult, apply_thresholds, tune_thresholds


def _column(pos: list[float], neg: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_prob) for one class as (n, 1) arrays."""
    y_true = np.array([1] * len(pos) + [0] * len(neg)).reshape(-1, 1)
    y_prob = np.array(pos + neg, dtype=float).reshape(-1, 1)
    return y_true, y_prob


# Candidate thresholds and F1 (>= rule):
#   0.9 -> P=1 R=1/3 F1=0.5;  0.8 -> P=1 R=2/3 F1=0.8;  0.75 -> P=2/3 R=2/3 F1=2/3
#   0.7 -> P=3/4 R=1 F1=6/7;  0.2 -> P=3/5 R=1 F1=0.75; 0.1 -> P=1/2 R=1 F1=2/3
KNOWN_POS = [0.7, 0.8, 0.9]
KNOWN_NEG = [0.1, 0.2, 0.75]


def test_known_optimum_exact_threshold_and_f1() -> None:
    y_true, y_prob = _column(KNOWN_POS, KNOWN_NEG)
    result = tune_thresholds(y_true, y_prob)
    assert result.methods == ("pr_curve",)
    assert result.thresholds[0] == pytest.approx(0.7)
    assert result.scores[0] == pytest.approx(6 / 7)


def test_beta_favouring_recall_lowers_threshold() -> None:
    # F1: 0.8 at t=0.8 beats 0.75 at t=0.3; F2: 0.714 at t=0.8 loses to 0.882 at t=0.3.
    y_true, y_prob = _column([0.9, 0.8, 0.3], [0.6, 0.5, 0.1])
    f1 = tune_thresholds(y_true, y_prob, beta=1.0)
    f2 = tune_thresholds(y_true, y_prob, beta=2.0)
    assert f1.thresholds[0] == pytest.approx(0.8)
    assert f1.scores[0] == pytest.approx(0.8)
    assert f2.thresholds[0] == pytest.approx(0.3)
    assert f2.scores[0] == pytest.approx(5 * 0.6 / (4 * 0.6 + 1))


def test_ties_pick_the_largest_threshold() -> None:
    # t=0.9 -> P=1 R=1/2 F1=2/3; t=0.3 -> P=1/2 R=1 F1=2/3: a tie.
    y_true, y_prob = _column([0.9, 0.3], [0.6, 0.5, 0.1])
    result = tune_thresholds(y_true, y_prob)
    assert result.thresholds[0] == pytest.approx(0.9)
    assert result.scores[0] == pytest.approx(2 / 3)


def test_class_without_positives_gets_default(caplog: pytest.LogCaptureFixture) -> None:
    y_pos, p_pos = _column(KNOWN_POS, KNOWN_NEG)
    y_true = np.hstack([y_pos, np.zeros_like(y_pos)])
    y_prob = np.hstack([p_pos, p_pos])
    with caplog.at_level(logging.WARNING, logger="labelloop.ml.thresholds"):
        result = tune_thresholds(y_true, y_prob, default=0.42)
    assert result.methods == ("pr_curve", "default")
    assert result.thresholds[1] == 0.42
    assert np.isnan(result.scores[1])
    assert any("index 1" in r.getMessage() for r in caplog.records)


def test_min_positives_applies_default_below_count() -> None:
    y_true, y_prob = _column(KNOWN_POS, KNOWN_NEG)  # 3 positives
    assert tune_thresholds(y_true, y_prob, min_positives=4).methods == ("default",)
    assert tune_thresholds(y_true, y_prob, min_positives=3).methods == ("pr_curve",)


def test_all_equal_probabilities_use_grid() -> None:
    y_true = np.array([[1], [0], [1], [0]])
    y_prob = np.full((4, 1), 0.5)
    result = tune_thresholds(y_true, y_prob)
    assert result.methods == ("grid",)
    # Every grid point <= 0.5 predicts all positive (F1 = 2/3), above predicts none
    # (F1 = 0): the largest maximiser is 0.5.
    assert result.thresholds[0] == pytest.approx(0.5)
    assert result.scores[0] == pytest.approx(2 / 3)
    assert apply_thresholds(y_prob, result.thresholds).all()


def test_all_positive_class_uses_grid() -> None:
    y_true = np.ones((3, 1), dtype=int)
    y_prob = np.array([[0.3], [0.6], [0.9]])
    result = tune_thresholds(y_true, y_prob)
    assert result.methods == ("grid",)
    # Recall 1 needs t <= 0.3; largest grid point satisfying that is 0.3.
    assert result.thresholds[0] == pytest.approx(0.3)
    assert result.scores[0] == pytest.approx(1.0)


def test_clipping_recomputes_score() -> None:
    # Perfect separation at 0.99 (F1=1); at 0.95 the negative at 0.97 becomes an FP.
    y_true, y_prob = _column([0.99, 1.0], [0.97, 0.2])
    unclipped = tune_thresholds(y_true, y_prob, max_threshold=1.0)
    assert unclipped.thresholds[0] == pytest.approx(0.99)
    assert unclipped.scores[0] == pytest.approx(1.0)

    clipped = tune_thresholds(y_true, y_prob, max_threshold=0.95)
    assert clipped.thresholds[0] == pytest.approx(0.95)
    assert clipped.scores[0] == pytest.approx(0.8)  # P=2/3, R=1


def test_clipping_to_min_threshold() -> None:
    y_true, y_prob = _column([0.02, 0.03], [0.01, 0.0])
    result = tune_thresholds(y_true, y_prob, min_threshold=0.05)
    assert result.thresholds[0] == pytest.approx(0.05)
    assert result.scores[0] == 0.0  # nothing predicted any more


def test_thresholds_follow_column_order() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, size=(40, 4))
    y_true[0] = 1  # every class has a positive and a negative
    y_true[1] = 0
    y_prob = np.clip(0.6 * y_true + 0.5 * rng.random((40, 4)), 0.0, 1.0)
    base = tune_thresholds(y_true, y_prob)
    perm = np.array([2, 0, 3, 1])
    permuted = tune_thresholds(y_true[:, perm], y_prob[:, perm])
    np.testing.assert_array_equal(permuted.thresholds, base.thresholds[perm])
    np.testing.assert_array_equal(permuted.scores, base.scores[perm])
    assert len(set(base.thresholds.tolist())) > 1  # otherwise the check proves nothing


def test_empty_inputs_give_defaults() -> None:
    no_samples = tune_thresholds(np.zeros((0, 3), dtype=int), np.zeros((0, 3)), default=0.3)
    np.testing.assert_array_equal(no_samples.thresholds, [0.3, 0.3, 0.3])
    assert no_samples.methods == ("default",) * 3

    no_classes = tune_thresholds(np.zeros((5, 0), dtype=int), np.zeros((5, 0)))
    assert no_classes.thresholds.shape == (0,)
    assert no_classes.methods == ()


@pytest.mark.parametrize(
    ("y_true", "y_prob", "kwargs", "match"),
    [
        (np.zeros((3, 2)), np.zeros((3, 3)), {}, "same shape"),
        (np.zeros(3), np.zeros(3), {}, "2-D"),
        (np.zeros((3, 2)), np.zeros((3, 2)), {"beta": 0.0}, "beta"),
        (np.zeros((3, 2)), np.zeros((3, 2)), {"beta": -1.0}, "beta"),
        (
            np.zeros((3, 2)),
            np.zeros((3, 2)),
            {"min_threshold": 0.8, "max_threshold": 0.2},
            "min_threshold",
        ),
        (np.zeros((3, 2)), np.zeros((3, 2)), {"max_threshold": 1.5}, "max_threshold"),
        (np.zeros((3, 2)), np.zeros((3, 2)), {"min_threshold": -0.1}, "min_threshold"),
        (np.zeros((3, 2)), np.zeros((3, 2)), {"default": 1.2}, "default"),
        (np.zeros((3, 2)), np.zeros((3, 2)), {"min_positives": -1}, "min_positives"),
        (np.zeros((3, 2)), np.zeros((3, 2)), {"grid_size": 1}, "grid_size"),
        (np.full((3, 2), 2), np.zeros((3, 2)), {}, "0/1"),
        (np.zeros((3, 2)), np.full((3, 2), 3.0), {}, r"\[0, 1\]"),
        (np.zeros((3, 2)), np.full((3, 2), np.nan), {}, "finite"),
    ],
)
def test_invalid_inputs_raise(
    y_true: np.ndarray, y_prob: np.ndarray, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        tune_thresholds(y_true, y_prob, **kwargs)


def test_shape_error_message_shows_what_came() -> None:
    with pytest.raises(ValueError, match=r"\(3, 2\) and \(3, 3\)"):
        tune_thresholds(np.zeros((3, 2)), np.zeros((3, 3)))


def test_apply_thresholds_uses_greater_or_equal() -> None:
    y_prob = np.array([[0.5, 0.3], [0.49, 0.31]])
    pred = apply_thresholds(y_prob, [0.5, 0.31])
    np.testing.assert_array_equal(pred, [[True, False], [False, True]])
    assert pred.dtype == bool


def test_apply_thresholds_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="expected 2 thresholds"):
        apply_thresholds(np.zeros((1, 2)), [0.5])


def test_to_dict_is_json_safe() -> None:
    result = ThresholdResult(
        thresholds=np.array([0.3, 0.5]),
        methods=("pr_curve", "default"),
        scores=np.array([0.75, np.nan]),
    )
    d = result.to_dict(["bolt", "nut"])
    assert d == {
        "bolt": {"threshold": 0.3, "method": "pr_curve", "fbeta": 0.75},
        "nut": {"threshold": 0.5, "method": "default", "fbeta": None},
    }
    json.dumps(d, allow_nan=False)
    assert type(d["bolt"]["threshold"]) is float
    with pytest.raises(ValueError, match="expected 2 class names"):
        result.to_dict(["bolt"])


def test_result_arrays_are_read_only() -> None:
    y_true, y_prob = _column(KNOWN_POS, KNOWN_NEG)
    result = tune_thresholds(y_true, y_prob)
    with pytest.raises(ValueError):
        result.thresholds[0] = 0.1


def test_classes_too_rare_to_tune_keep_their_own_fallback() -> None:
    y_true = np.array([[1, 1], [1, 0], [0, 0], [1, 0]])
    y_prob = np.array([[0.9, 0.8], [0.7, 0.1], [0.2, 0.3], [0.8, 0.2]])
    result = tune_thresholds(y_true, y_prob, min_positives=2, fallback=[0.11, 0.42])
    assert result.methods == ("pr_curve", "default")
    assert result.thresholds[1] == pytest.approx(0.42)  # not the global default 0.5
    empty = tune_thresholds(np.zeros((0, 2)), np.zeros((0, 2)), fallback=[0.3, 0.6])
    assert empty.thresholds.tolist() == [0.3, 0.6]
    with pytest.raises(ValueError, match="expected 2 fallback thresholds, got 3"):
        tune_thresholds(y_true, y_prob, fallback=[0.1, 0.2, 0.3])
