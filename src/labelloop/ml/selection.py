"""Labelling priority: the order in which unlabelled tasks are worth a human's time.

Label Studio's Data Manager sorts tasks by their prediction score, so the score the backend
gives an unlabelled task *is* its place in the queue: ascending = label first. Three strategies:

``"margin"``
    The score is the prediction confidence of ``ml.thresholds.prediction_confidence``: how
    far the least certain class is from its threshold, 0 (on a threshold) to 1 (as far as can
    be). Most uncertain first. Cheap, needs no embeddings, and is today's served score. Its
    weakness: the model is uncertain about *kinds* of image, so the 20 lowest scores are often
    20 near-copies of one hard case, and labelling all of them teaches what one of them would.

``"margin-diversity"``
    Uncertain *and* unlike what is labelled. A greedy pass over the pool, in the backbone's
    embedding space, for the first ``horizon`` places of the queue::

        w_i = u_i = 1 - margin_i                 (uncertainty, in [0, 1])
        d_i = min over labelled-or-already-picked j of (1 - cos(x_i, x_j)) / 2   (in [0, 1])
        pick i* = argmax_i w_i * d_i  (lowest index on ties), then d_i <- min(d_i, dist(i, i*))

    With no labelled item at all, d starts at 1 everywhere, so the first pick is the most
    uncertain image. Once an image is picked, its near-copies have d ~ 0 and wait until
    something unlike them has had its turn: a batch of the lowest scores covers the pool's
    uncertain regions instead of one of them. This is the uncertainty-weighted form of k-center
    greedy (Sener & Savarese, 2018) restricted to a short horizon.

``"margin-density-diversity"``
    The same pass with ``w_i = u_i * typicality_i`` (`typicality`: the inverse of the mean
    distance to the item's 20 nearest neighbours in the pool, scaled to a maximum of 1). The
    distance term alone favours outliers, the images least like anything, which with a few
    hundred labels are the least useful to learn from (the "low budget" regime of Hacohen et
    al., 2022); weighting by density (information density, Settles & Craven, 2008) prefers
    uncertain images that stand for many others.

Scores of the greedy strategies (N unlabelled items, k = min(horizon, N) picks, h = k / N):

* the j-th pick (j = 0 .. k-1) scores ``j / N``: the share of the pool queued before it;
* every other item scores ``h + (1 - h) * margin``: after all picks, in margin order, so the
  tail of the queue keeps today's meaning, squeezed into [h, 1].

So every score lies in [0, 1], picks come first in pick order, and ``horizon=0`` gives the
plain margin back. The horizon only needs to cover what annotators label before the scores are
refreshed (the fast update runs every 10 labels); beyond it, diversity against picks that will
be re-planned anyway buys nothing. Cost: O(N * L * dim) for the nearest-labelled distances
(L labelled), O(N * horizon * dim) for the pass, and for typicality O(N * min(N + L, 2000) *
dim) (the neighbours are looked for among at most 2000 reference items). bench/active_learning.py
measures the strategies against random order (docs/active-learning.md), which chose the default.

Pure numpy (and scikit-learn through ml.thresholds): no torch, no Label Studio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from labelloop.ml.thresholds import prediction_confidence

__all__ = [
    "DEFAULT_HORIZON",
    "DEFAULT_NEIGHBOURS",
    "DEFAULT_STRATEGY",
    "MAX_REFERENCE",
    "STRATEGIES",
    "Strategy",
    "diversity_priority",
    "margin_scores",
    "priority_from_margins",
    "priority_scores",
    "typicality",
]

Strategy = Literal["margin", "margin-diversity", "margin-density-diversity"]
STRATEGIES: tuple[Strategy, ...] = ("margin", "margin-diversity", "margin-density-diversity")
# Chosen by bench/active_learning.py: docs/active-learning.md has the figures.
DEFAULT_STRATEGY: Strategy = "margin-density-diversity"
# Places of the queue planned for diversity: a few refreshes' worth of labelling (10 labels
# between fast updates) with room to spare, while the greedy pass stays a fraction of a second
# for pools of tens of thousands.
DEFAULT_HORIZON = 100
# Neighbours whose mean distance measures how typical an item is (TypiClust's 20).
DEFAULT_NEIGHBOURS = 20
# Typicality looks for neighbours among at most this many items (an even spread over the pool):
# density needs a sample of the pool, not all of it, and this keeps the cost linear in N.
MAX_REFERENCE = 2000

# Entries of a (pool rows x other items) similarity block computed at once: 16 MB of float32,
# whatever the sizes.
_BLOCK = 1 << 22
# Typicality's floor on the mean neighbour distance: exact copies would otherwise be infinitely
# typical and outweigh any uncertainty.
_MIN_NEIGHBOUR_DISTANCE = 1e-3


def margin_scores(probs: np.ndarray, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-item margin in [0, 1], low = uncertain: ``prediction_confidence`` itself.

    The same function as the served prediction score, so "margin" order is exactly the order
    Label Studio shows today; it is re-exported here so that selection has one entry point.
    """
    return prediction_confidence(probs, thresholds)


def typicality(
    embeddings: np.ndarray,
    *,
    neighbours: int = DEFAULT_NEIGHBOURS,
    max_reference: int = MAX_REFERENCE,
) -> np.ndarray:
    """Per row in (0, 1], 1 = the most typical: how densely the row's neighbourhood is filled.

    ``1 / mean(halved cosine distance to the row's `neighbours` nearest other rows)``, scaled
    so that the largest is 1. Neighbours are looked for among `max_reference` rows spread
    evenly over `embeddings` (all of them when there are fewer), the row itself excluded. It
    depends on the pool only, not on the model, so a caller may compute it once per pool.
    """
    x = _normalised(embeddings, "pool")
    n = x.shape[0]
    if neighbours < 1 or max_reference < 2:
        raise ValueError(
            f"neighbours must be >= 1 and max_reference >= 2, got {neighbours}, {max_reference}"
        )
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if n == 1:
        return np.ones(1, dtype=np.float64)
    # Evenly spread, not random: the same pool always gives the same values.
    reference = np.unique(np.linspace(0, n - 1, min(n, max_reference)).round().astype(int))
    position = np.full(n, -1)
    position[reference] = np.arange(len(reference))
    k = min(neighbours, len(reference) - 1)
    mean_distance = np.empty(n, dtype=np.float64)
    rows = max(1, _BLOCK // len(reference))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        distance = np.clip((1.0 - x[start:stop] @ x[reference].T) / 2.0, 0.0, 1.0)
        own = position[start:stop]
        inside = np.flatnonzero(own >= 0)
        distance[inside, own[inside]] = np.inf  # a row is not its own neighbour
        nearest = np.partition(distance, k - 1, axis=1)[:, :k]
        mean_distance[start:stop] = nearest.astype(np.float64).mean(axis=1)
    density = 1.0 / np.maximum(mean_distance, _MIN_NEIGHBOUR_DISTANCE)
    return density / density.max()


def diversity_priority(
    unlabelled: np.ndarray,
    labelled: np.ndarray | None,
    weight: np.ndarray,
    *,
    horizon: int = DEFAULT_HORIZON,
    margins: np.ndarray | None = None,
) -> np.ndarray:
    """Priority score per unlabelled item in [0, 1], lower = label first (module docstring).

    Args:
        unlabelled: (N, d) backbone embeddings of the unlabelled items (any scale: they are
            L2-normalised here; an all-zero row is at cosine distance 1/2 from everything).
        labelled: (L, d) embeddings of the labelled items, or None / an (0, d) array for none.
        weight: (N,) in [0, 1], how much an item is worth labelling on its own: the
            uncertainty ``1 - margin``, possibly times `typicality`.
        horizon: how many places the greedy pass plans; 0 orders by `margins` alone.
        margins: (N,) in [0, 1], the order of the items past the horizon; ``1 - weight`` when
            not given.

    Deterministic: ties go to the lowest index, and nothing is random.
    """
    x = _normalised(unlabelled, "unlabelled")
    n = x.shape[0]
    w = _unit_interval(weight, n, "weight")
    tail = 1.0 - w if margins is None else _unit_interval(margins, n, "margins")
    if isinstance(horizon, bool) or not isinstance(horizon, int | np.integer) or horizon < 0:
        raise ValueError(f"horizon must be an int >= 0, got {horizon!r}")
    if n == 0:
        return np.zeros(0, dtype=np.float64)

    k = min(int(horizon), n)
    h = k / n
    # Items past the horizon: margin order, after every pick.
    scores = h + (1.0 - h) * tail
    if k == 0:
        return np.clip(scores, 0.0, 1.0)

    nearest = _nearest_labelled_distance(x, labelled)
    picked = np.zeros(n, dtype=bool)
    for j in range(k):
        gain = w * nearest
        # -1 is below any real gain (>= 0), so a picked item is never picked again.
        gain[picked] = -1.0
        i = int(np.argmax(gain))  # first maximum: ties go to the lowest index
        picked[i] = True
        scores[i] = j / n
        # The pick is "labelled" from now on for the items planned after it.
        np.minimum(nearest, _distance(x, x[i]), out=nearest)
    return np.clip(scores, 0.0, 1.0)


def priority_scores(
    probs: np.ndarray,
    thresholds: Sequence[float] | np.ndarray,
    *,
    strategy: Strategy = DEFAULT_STRATEGY,
    unlabelled: np.ndarray | None = None,
    labelled: np.ndarray | None = None,
    horizon: int = DEFAULT_HORIZON,
    typical: np.ndarray | None = None,
) -> np.ndarray:
    """The labelling priority of each unlabelled item in [0, 1], lower = label first.

    `probs` (N, C) are the model's probabilities for the unlabelled items and `thresholds` its
    per-class thresholds. "margin" needs nothing else; the other strategies need `unlabelled`
    (N, d), the items' backbone embeddings, and `labelled` (L, d), those of the labelled items
    (None when nothing is labelled yet), all from the backbone that is served.
    "margin-density-diversity" computes the unlabelled items' `typicality` among all N + L
    items unless `typical` (N,) gives it (it depends on the pool only, so it can be kept).
    """
    return priority_from_margins(
        margin_scores(probs, thresholds),
        strategy=strategy,
        unlabelled=unlabelled,
        labelled=labelled,
        horizon=horizon,
        typical=typical,
    )


def priority_from_margins(
    margins: np.ndarray,
    *,
    strategy: Strategy = DEFAULT_STRATEGY,
    unlabelled: np.ndarray | None = None,
    labelled: np.ndarray | None = None,
    horizon: int = DEFAULT_HORIZON,
    typical: np.ndarray | None = None,
) -> np.ndarray:
    """`priority_scores` from the items' margins (the served prediction scores) instead of
    their probabilities: what a caller holding Label Studio predictions has."""
    margins = _unit_interval(margins, len(margins), "margins")
    if strategy == "margin":
        return margins
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    if unlabelled is None:
        raise ValueError(f"strategy {strategy!r} needs the embeddings of the unlabelled items")
    if len(unlabelled) != len(margins):
        raise ValueError(f"{len(margins)} margins but {len(unlabelled)} unlabelled embeddings")
    weight = 1.0 - margins
    if strategy == "margin-density-diversity":
        if typical is None:
            pool = (
                unlabelled
                if labelled is None or not len(labelled)
                else _stack(unlabelled, labelled)
            )
            typical = typicality(pool)[: len(margins)]
        weight = weight * _unit_interval(typical, len(margins), "typical")
    return diversity_priority(unlabelled, labelled, weight, horizon=horizon, margins=margins)


# --------------------------------------------------------------------------- helpers


def _stack(unlabelled: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    a, b = np.asarray(unlabelled), np.asarray(labelled)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"unlabelled and labelled embeddings must be (n, d) with the same d, got shapes "
            f"{a.shape} and {b.shape}"
        )
    return np.concatenate([a, b])


def _unit_interval(values: np.ndarray, n: int, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.shape != (n,):
        raise ValueError(f"expected {n} {name} values (one per unlabelled item), got {v.size}")
    if not np.isfinite(v).all() or (v < 0).any() or (v > 1).any():
        raise ValueError(f"{name} must be finite and within [0, 1]")
    return v


def _normalised(embeddings: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """float32 rows scaled to unit length (zero rows stay zero), checked for shape and NaNs.

    float32: the greedy pass is one (N x d) matrix-vector product per pick, bound by memory
    traffic, and distances only need to rank, not to be exact in the last bits.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} embeddings must be 2-D (n, d), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} embeddings have {x.shape[1]} dimensions, expected {dim}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} embeddings contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine distance halved, in [0, 1], between unit rows of `x` and one unit vector `y`."""
    return np.clip((1.0 - (x @ y).astype(np.float64)) / 2.0, 0.0, 1.0)


def _nearest_labelled_distance(x: np.ndarray, labelled: np.ndarray | None) -> np.ndarray:
    """Per row of `x`, the (halved cosine) distance to the nearest labelled item; 1 with none.

    1 is the largest distance there is, so with nothing labelled the first pick is decided by
    the weight alone.
    """
    nearest = np.ones(x.shape[0], dtype=np.float64)
    if labelled is None:
        return nearest
    lab = _normalised(labelled, "labelled", dim=x.shape[1])
    if lab.shape[0] == 0:
        return nearest
    rows = max(1, _BLOCK // lab.shape[0])
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows] @ lab.T
        closest = block.max(axis=1).astype(np.float64)
        nearest[start : start + rows] = np.clip((1.0 - closest) / 2.0, 0.0, 1.0)
    return nearest
