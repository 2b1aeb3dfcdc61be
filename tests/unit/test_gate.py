"""The promotion gate (loop/gate.py) and the fast update's out-of-fold thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from labelloop.loop.gate import decide, macro_f1, predictions_for
from labelloop.ml.head import Head, fit_head, out_of_fold, predict_features


def _labels(n: int, n_classes: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, n_classes)) < 0.4).astype(np.float32)


def _noisy(y: np.ndarray, flip: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(y.shape) < flip, 1 - y, y).astype(bool)


def test_macro_f1_counts_only_classes_present_and_matches_sklearn_on_them() -> None:
    y = _labels(60)
    y[:, 2] = 0  # a class with no positive here says nothing about either model
    pred = _noisy(y, 0.2, seed=1)
    expected = f1_score(y[:, :2], pred[:, :2], average="macro", zero_division=0)
    assert macro_f1(y, pred) == pytest.approx(expected)
    assert macro_f1(np.zeros((5, 3)), np.ones((5, 3), bool)) == 0.0


def test_a_clearly_better_candidate_is_promoted_with_its_numbers() -> None:
    y = _labels(200)
    decision = decide(y, _noisy(y, 0.05, 1), _noisy(y, 0.3, 2), tolerance=0.01, min_items=30)
    assert decision["promote"] is True
    assert decision["candidate_f1"] > decision["current_f1"]
    low, high = decision["ci90"]
    assert 0 < low <= decision["diff"] <= high
    assert "200 held-out items" in decision["reason"]


def test_a_clearly_worse_candidate_is_rejected_and_says_why() -> None:
    y = _labels(200)
    decision = decide(y, _noisy(y, 0.3, 1), _noisy(y, 0.05, 2), tolerance=0.01, min_items=30)
    assert decision["promote"] is False
    assert decision["reason"].startswith("worse on 200 held-out items")
    assert decision["ci90"][1] < 0


def test_on_a_handful_of_items_a_drop_within_noise_is_accepted_but_a_sure_one_is_not() -> None:
    y = _labels(8, seed=3)
    candidate = y.astype(bool).copy()
    candidate[0] = ~candidate[0]  # one task wrong
    noise = decide(y, candidate, y.astype(bool), tolerance=0.01, min_items=30)
    assert noise["diff"] < -0.01
    assert noise["promote"] is True and "within noise" in noise["reason"]
    # Everything wrong is worse beyond doubt, however few the items.
    sure = decide(y, ~y.astype(bool), y.astype(bool), tolerance=0.01, min_items=30)
    assert sure["promote"] is False


@pytest.mark.parametrize(
    ("y", "current", "expected"),
    [
        (np.zeros((0, 3)), np.zeros((0, 3), bool), "no held-out items"),
        (_labels(20), np.zeros((20, 3), bool), "both models score 0"),
    ],
    ids=["empty", "zero-scores"],
)
def test_no_promotion_without_evidence(y: np.ndarray, current: np.ndarray, expected: str) -> None:
    decision = decide(y, np.zeros(y.shape, bool), current, tolerance=0.01, min_items=30)
    assert decision["promote"] is False
    assert expected in decision["reason"]


def test_a_first_model_needs_a_positive_out_of_fold_score() -> None:
    y = _labels(10)
    empty = np.zeros((0, 3))
    assert decide(empty, empty, None, tolerance=0.01, min_items=30, candidate_oof_f1=0.4)["promote"]
    refused = decide(empty, empty, None, tolerance=0.01, min_items=30, candidate_oof_f1=0.0)
    assert refused["promote"] is False and "nothing right" in refused["reason"]
    assert decide(y, y.astype(bool), None, tolerance=0.01, min_items=30)["promote"]


def test_the_bootstrap_is_deterministic() -> None:
    y = _labels(100)
    a, b = _noisy(y, 0.1, 1), _noisy(y, 0.12, 2)
    assert decide(y, a, b, tolerance=0.01, min_items=30) == decide(
        y, a, b, tolerance=0.01, min_items=30
    )


def test_predictions_for_lays_out_a_model_in_the_project_classes() -> None:
    probs = np.array([[0.9, 0.2], [0.1, 0.8]])
    pred = predictions_for(["b", "new", "a"], ["a", "b"], probs, [0.5, 0.5])
    assert pred.tolist() == [[False, False, True], [True, False, False]]


def _separable(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.5).astype(np.float32)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    x[:, :2] += 3 * (y - 0.5)
    return x, y


def test_out_of_fold_predicts_each_row_without_having_seen_it() -> None:
    x, y = _separable(60)
    w = np.ones(len(x), np.float32)
    init = Head(np.zeros((2, 6), np.float32), np.zeros(2, np.float32))
    oof = out_of_fold(x, y, w, init=init, pos_weight=np.ones(2, np.float32), folds=5)
    assert oof is not None and oof.shape == y.shape
    # Separable data: held-out rows are still mostly right.
    assert macro_f1(y, oof >= 0.5) > 0.8
    assert out_of_fold(x[:9], y[:9], w[:9], init=init, pos_weight=np.ones(2), folds=5) is None


def test_sample_weights_pull_the_head_toward_the_weighted_rows() -> None:
    x, y = _separable(80)
    conflict_x = np.repeat(x[:1], 20, axis=0)
    conflict_y = np.repeat(1 - y[:1], 20, axis=0)
    xs, ys = np.concatenate([x, conflict_x]), np.concatenate([y, conflict_y])
    light = np.concatenate([np.ones(80), np.full(20, 0.01)]).astype(np.float32)
    heavy = np.concatenate([np.ones(80), np.full(20, 10.0)]).astype(np.float32)
    p_light = predict_features(x[:1], fit_head(xs, ys, sample_weight=light))
    p_heavy = predict_features(x[:1], fit_head(xs, ys, sample_weight=heavy))
    target = conflict_y[0].astype(bool)
    # The heavily weighted rows win the point both sets claim.
    assert np.all(np.abs(p_heavy[0] - target) < np.abs(p_light[0] - target))
    with pytest.raises(ValueError, match="sample_weight must be"):
        fit_head(x, y, sample_weight=np.ones(3))
