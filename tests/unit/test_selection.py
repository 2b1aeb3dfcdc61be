from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from labelloop.ml.selection import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    diversity_priority,
    margin_scores,
    priority_scores,
    typicality,
)
from labelloop.ml.thresholds import prediction_confidence

N_CLUSTER = 30
N_VARIED = 200
DIM = 64
BATCH = 20


def _cluster_pool(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """30 near-copies of one image the model is very unsure of (p = 0.505 at threshold 0.5),
    then 200 varied images it is less unsure of; plus 5 labelled images and the threshold."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=DIM)
    cluster = centre + 1e-3 * rng.normal(size=(N_CLUSTER, DIM))
    varied = rng.normal(size=(N_VARIED, DIM))
    embeddings = np.vstack([cluster, varied])
    probs = np.concatenate(
        [np.full(N_CLUSTER, 0.505), rng.uniform(0.55, 0.85, size=N_VARIED)]
    ).reshape(-1, 1)
    labelled = rng.normal(size=(5, DIM))
    return embeddings, probs, labelled, np.array([0.5])


def _first(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(scores, kind="stable")[:k]


def test_margin_alone_gives_the_whole_batch_to_the_near_duplicates() -> None:
    embeddings, probs, labelled, t = _cluster_pool()
    scores = priority_scores(probs, t, strategy="margin", unlabelled=embeddings, labelled=labelled)
    # The cluster holds the 30 lowest margins: margin order labels 20 copies of one image.
    assert (_first(scores, BATCH) < N_CLUSTER).sum() == BATCH


@pytest.mark.parametrize("strategy", ["margin-diversity", "margin-density-diversity"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_strategies_take_few_of_the_near_duplicates(seed: int, strategy: str) -> None:
    embeddings, probs, labelled, t = _cluster_pool(seed)
    scores = priority_scores(
        probs,
        t,
        strategy=strategy,  # type: ignore[arg-type]
        unlabelled=embeddings,
        labelled=labelled,
    )
    in_cluster = (_first(scores, BATCH) < N_CLUSTER).sum()
    # One copy of the most uncertain image is worth labelling; 20 of them are not.
    assert 1 <= in_cluster <= 2


def test_with_nothing_labelled_the_batch_opens_with_one_near_duplicate_only() -> None:
    embeddings, probs, _, t = _cluster_pool()
    scores = priority_scores(probs, t, strategy="margin-diversity", unlabelled=embeddings)
    batch = _first(scores, BATCH)
    assert batch[0] < N_CLUSTER  # the most uncertain image first...
    assert (batch[1:] >= N_CLUSTER).all()  # ...then none of its copies


def test_scores_lie_in_the_unit_interval_for_every_strategy() -> None:
    rng = np.random.default_rng(3)
    probs = rng.uniform(size=(300, 4))
    thresholds = rng.uniform(0.1, 0.9, size=4)
    embeddings = rng.normal(size=(300, 16))
    labelled = rng.normal(size=(40, 16))
    for strategy in STRATEGIES:
        for horizon in (0, 1, 50, 300, 1000):
            scores = priority_scores(
                probs,
                thresholds,
                strategy=strategy,
                unlabelled=embeddings,
                labelled=labelled,
                horizon=horizon,
            )
            assert scores.shape == (300,)
            assert np.isfinite(scores).all()
            assert scores.min() >= 0.0 and scores.max() <= 1.0


def test_margin_scores_are_the_served_prediction_confidence() -> None:
    rng = np.random.default_rng(4)
    probs = rng.uniform(size=(50, 3))
    thresholds = [0.3, 0.5, 0.8]
    np.testing.assert_array_equal(
        margin_scores(probs, thresholds), prediction_confidence(probs, thresholds)
    )
    # Low = uncertain: a probability on its threshold is margin 0.
    assert margin_scores(np.array([[0.3, 0.0, 1.0]]), thresholds)[0] == 0.0


def test_picks_come_first_in_pick_order_and_the_rest_follow_in_margin_order() -> None:
    rng = np.random.default_rng(5)
    n, horizon = 50, 10
    embeddings = rng.normal(size=(n, 8))
    uncertainty = rng.uniform(size=n)
    scores = diversity_priority(embeddings, None, uncertainty, horizon=horizon)
    order = np.argsort(scores, kind="stable")
    picks, rest = order[:horizon], order[horizon:]
    np.testing.assert_allclose(scores[picks], np.arange(horizon) / n)
    assert scores[rest].min() >= horizon / n
    # The tail is in margin (= 1 - uncertainty) order, its scores h + (1 - h) * margin.
    h = horizon / n
    np.testing.assert_allclose(scores[rest], h + (1 - h) * (1 - uncertainty[rest]))
    assert np.all(np.diff(uncertainty[rest]) <= 0)


def test_horizon_zero_is_plain_margin_order() -> None:
    rng = np.random.default_rng(6)
    probs = rng.uniform(size=(40, 2))
    t = [0.4, 0.6]
    embeddings = rng.normal(size=(40, 8))
    diverse = priority_scores(
        probs, t, strategy="margin-diversity", unlabelled=embeddings, horizon=0
    )
    np.testing.assert_allclose(diverse, margin_scores(probs, t), atol=1e-12)


def test_a_pool_smaller_than_the_horizon_is_ordered_entirely_by_the_greedy_pass() -> None:
    rng = np.random.default_rng(7)
    n = 12
    scores = diversity_priority(rng.normal(size=(n, 8)), None, rng.uniform(size=n), horizon=100)
    # Every item is a pick: the scores are the ranks j / n, each exactly once.
    np.testing.assert_allclose(np.sort(scores), np.arange(n) / n)


def test_without_labelled_items_the_most_uncertain_goes_first() -> None:
    rng = np.random.default_rng(8)
    embeddings = rng.normal(size=(30, 8))
    uncertainty = rng.uniform(0.0, 0.9, size=30)
    uncertainty[17] = 0.95
    none = diversity_priority(embeddings, None, uncertainty)
    empty = diversity_priority(embeddings, np.zeros((0, 8)), uncertainty)
    np.testing.assert_array_equal(none, empty)
    assert int(np.argmin(none)) == 17 and none[17] == 0.0


def test_an_uncertain_copy_of_a_labelled_image_waits() -> None:
    rng = np.random.default_rng(9)
    labelled = rng.normal(size=(1, 8))
    embeddings = np.vstack([labelled[0] + 1e-4, rng.normal(size=(1, 8))])
    # Item 0 is the more uncertain, but its copy is labelled already.
    scores = diversity_priority(embeddings, labelled, np.array([0.9, 0.6]))
    assert scores[1] < scores[0]
    # Margin order alone would have it the other way round.
    assert priority_scores(np.array([[0.55], [0.7]]), [0.5], strategy="margin").argmin() == 0


def test_identical_items_are_ordered_by_index_and_runs_are_deterministic() -> None:
    embeddings = np.ones((6, 4))
    scores = diversity_priority(embeddings, None, np.full(6, 0.5), horizon=6)
    np.testing.assert_allclose(scores, np.arange(6) / 6)

    rng = np.random.default_rng(10)
    x, lab, u = rng.normal(size=(100, 8)), rng.normal(size=(10, 8)), rng.uniform(size=100)
    np.testing.assert_array_equal(
        diversity_priority(x, lab, u, horizon=30), diversity_priority(x, lab, u, horizon=30)
    )


def test_typicality_prefers_dense_neighbourhoods_and_excludes_the_item_itself() -> None:
    rng = np.random.default_rng(11)
    centre = rng.normal(size=16)
    dense = centre + 0.05 * rng.normal(size=(25, 16))
    sparse = rng.normal(size=(25, 16))
    typical = typicality(np.vstack([dense, sparse]), neighbours=5)
    assert typical.shape == (50,)
    assert typical.max() == 1.0 and typical.min() > 0.0
    assert typical[:25].min() > typical[25:].max()
    # Without excluding itself, every row would have a neighbour at distance 0.
    assert np.isfinite(typical).all()
    lone = np.vstack([np.eye(3), np.eye(3)[0] + 1e-9])
    # Rows 0 and 3 are copies (floored distance), rows 1 and 2 have only far neighbours.
    t = typicality(lone, neighbours=1)
    assert t[0] == t[3] == 1.0 and t[1] < 0.01


def test_typicality_with_a_reference_sample_stays_close_and_is_deterministic() -> None:
    rng = np.random.default_rng(12)
    x = np.vstack([rng.normal(size=(300, 8)), 3 + 0.2 * rng.normal(size=(300, 8))])
    full = typicality(x)
    sampled = typicality(x, max_reference=120)
    np.testing.assert_array_equal(sampled, typicality(x, max_reference=120))
    # A fifth of the pool as reference ranks the two populations the same way.
    assert np.corrcoef(full, sampled)[0, 1] > 0.9
    assert typicality(np.zeros((0, 8))).shape == (0,)
    assert typicality(np.ones((1, 8))).tolist() == [1.0]
    with pytest.raises(ValueError, match="neighbours"):
        typicality(x, neighbours=0)


def test_density_weighting_prefers_a_typical_image_over_an_outlier() -> None:
    rng = np.random.default_rng(13)
    crowd = rng.normal(size=16) + 0.1 * rng.normal(size=(40, 16))
    outlier = 5 * rng.normal(size=(1, 16))
    embeddings = np.vstack([crowd, outlier])
    # The outlier is as uncertain as the crowd (margin 0.2 each). With one crowd member
    # labelled, distance alone sends the outlier first; density weighting, a crowd member.
    probs = np.full((41, 1), 0.6)
    labelled = crowd[:1] + 0.01
    first = {
        strategy: int(
            np.argmin(
                priority_scores(
                    probs,
                    [0.5],
                    strategy=strategy,  # type: ignore[arg-type]
                    unlabelled=embeddings,
                    labelled=labelled,
                )
            )
        )
        for strategy in ("margin-diversity", "margin-density-diversity")
    }
    assert first["margin-diversity"] == 40
    assert first["margin-density-diversity"] < 40


def test_a_given_typicality_is_used_as_is() -> None:
    rng = np.random.default_rng(14)
    x, lab = rng.normal(size=(60, 8)), rng.normal(size=(10, 8))
    probs = rng.uniform(size=(60, 2))
    computed = priority_scores(
        probs, [0.5, 0.5], strategy="margin-density-diversity", unlabelled=x, labelled=lab
    )
    given = priority_scores(
        probs,
        [0.5, 0.5],
        strategy="margin-density-diversity",
        unlabelled=x,
        labelled=lab,
        typical=typicality(np.vstack([x, lab]))[:60],
    )
    np.testing.assert_array_equal(computed, given)
    flat = priority_scores(
        probs,
        [0.5, 0.5],
        strategy="margin-density-diversity",
        unlabelled=x,
        labelled=lab,
        typical=np.ones(60),
    )
    np.testing.assert_array_equal(
        flat,
        priority_scores(probs, [0.5, 0.5], strategy="margin-diversity", unlabelled=x, labelled=lab),
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_first_picks_do_not_depend_on_the_horizon(strategy: str) -> None:
    # What lets bench/active_learning.py plan only the 10 places it labels per round.
    rng = np.random.default_rng(17)
    x, lab = rng.normal(size=(150, 8)), rng.normal(size=(12, 8))
    probs = rng.uniform(size=(150, 3))

    def first_ten(horizon: int) -> list[int]:
        scores = priority_scores(
            probs,
            [0.5, 0.4, 0.6],
            strategy=strategy,  # type: ignore[arg-type]
            unlabelled=x,
            labelled=lab,
            horizon=horizon,
        )
        return np.argsort(scores, kind="stable")[:10].tolist()

    assert first_ten(10) == first_ten(40) == first_ten(100)


def test_zero_embeddings_and_an_empty_pool_are_handled() -> None:
    embeddings = np.zeros((5, 4))
    embeddings[0] = 1.0
    scores = diversity_priority(embeddings, np.ones((2, 4)), np.full(5, 0.5))
    assert np.isfinite(scores).all()
    # Item 0 duplicates the labelled direction; the zero rows are at distance 1/2 from it.
    assert scores[0] == scores.max()
    assert diversity_priority(np.zeros((0, 4)), None, np.zeros(0)).shape == (0,)


def test_the_default_strategy_is_a_named_one_and_margin_stays_available() -> None:
    assert DEFAULT_STRATEGY in STRATEGIES and "margin" in STRATEGIES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unlabelled": np.zeros((3, 4, 1))}, "2-D"),
        ({"labelled": np.zeros((2, 5))}, "dimensions"),
        ({"weight": np.full(3, 1.5)}, "within"),
        ({"weight": np.zeros(2)}, "expected 3 weight"),
        ({"margins": np.zeros(2)}, "expected 3 margins"),
        ({"unlabelled": np.full((3, 4), np.nan)}, "NaN"),
        ({"horizon": -1}, "horizon"),
        ({"horizon": 2.5}, "horizon"),
    ],
)
def test_bad_inputs_are_refused(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "unlabelled": np.ones((3, 4)),
        "labelled": np.ones((2, 4)),
        "weight": np.full(3, 0.5),
        "horizon": 10,
        "margins": None,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        diversity_priority(**args)  # type: ignore[arg-type]


def test_priority_scores_refuses_an_unknown_strategy_or_missing_embeddings() -> None:
    probs = np.full((3, 1), 0.5)
    with pytest.raises(ValueError, match="unknown strategy"):
        priority_scores(probs, [0.5], strategy="entropy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs the embeddings"):
        priority_scores(probs, [0.5], strategy="margin-diversity")
    with pytest.raises(ValueError, match="typical"):
        priority_scores(
            probs,
            [0.5],
            strategy="margin-density-diversity",
            unlabelled=np.ones((3, 4)),
            typical=np.full(3, 2.0),
        )
    with pytest.raises(ValueError, match="unlabelled embeddings"):
        priority_scores(probs, [0.5], strategy="margin-diversity", unlabelled=np.ones((2, 4)))


def test_importing_selection_does_not_import_torch() -> None:
    code = "import sys, labelloop.ml.selection; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
