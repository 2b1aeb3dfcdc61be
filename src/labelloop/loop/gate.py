"""The promotion gate: does a candidate replace the served model?

Both models are scored on the same held-out items (annotated tasks never trained on, plus the
offline model's own test split, relabelled into the project's classes), each at its own
thresholds. The score is macro-F1 over the classes that occur in those items: a class with no
positive there says nothing about either model. A paired bootstrap over the items gives the
uncertainty of the difference, so a decision on 12 tasks is not read like one on 1,200:

- no served model yet: promote a candidate whose out-of-fold macro-F1 is above 0;
- nothing to compare on, or both models score 0: keep the served model (no evidence);
- otherwise promote when the difference is at least `-tolerance`, or, with fewer than
  `min_items` items, when the bootstrap cannot tell it is worse (its 90 % interval reaches 0):
  with so few items a real improvement and noise look alike, and more labels usually help.

Every decision comes back as a dict with its numbers and a sentence saying why, stored on the
job and shown by `labelloop status` and `/status`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_BOOTSTRAP_ROUNDS = 400
_INTERVAL = (5.0, 95.0)  # a 90 % interval


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, *, weights: np.ndarray | None = None) -> float:
    """Macro-F1 over the classes with at least one positive in `y_true` (0 when none has)."""
    scores = _f1_rows(y_true, y_pred, None if weights is None else weights[None, :])
    return float(scores[0])


def _f1_rows(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Macro-F1 for each row of `weights` (B, n): item i counted weights[b, i] times."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    w = np.ones((1, len(t))) if weights is None else weights
    present = t.sum(axis=0) > 0
    if not present.any():
        return np.zeros(len(w))
    tp = w @ (t * p)
    fp = w @ ((1 - t) * p)
    fn = w @ (t * (1 - p))
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1[:, present].mean(axis=1)


def decide(
    y_true: np.ndarray,
    candidate_pred: np.ndarray,
    current_pred: np.ndarray | None,
    *,
    tolerance: float,
    min_items: int,
    candidate_oof_f1: float | None = None,
    sources: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The gate's decision: `promote` (bool), `reason` (a sentence) and the numbers behind it."""
    n = int(len(y_true))
    decision: dict[str, Any] = {"n_items": n, "sources": dict(sources or {})}
    if candidate_oof_f1 is not None:
        decision["candidate_oof_f1"] = round(float(candidate_oof_f1), 4)
    if current_pred is None:
        score = candidate_oof_f1 if candidate_oof_f1 is not None else 0.0
        if n:
            decision["candidate_f1"] = round(macro_f1(y_true, candidate_pred), 4)
            score = max(score, decision["candidate_f1"])
        promote = score > 0
        decision.update(
            promote=promote,
            reason=(
                "first model of the project"
                if promote
                else "first model predicts nothing right yet (macro-F1 0); waiting for labels"
            ),
        )
        return decision
    if n == 0:
        decision.update(
            promote=False,
            reason=f"no held-out items to compare on yet; label a few more (at least {min_items})",
        )
        return decision
    candidate_f1 = macro_f1(y_true, candidate_pred)
    current_f1 = macro_f1(y_true, current_pred)
    diff = candidate_f1 - current_f1
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=_BOOTSTRAP_ROUNDS).astype(np.float64)
    diffs = _f1_rows(y_true, candidate_pred, counts) - _f1_rows(y_true, current_pred, counts)
    low, high = (float(v) for v in np.percentile(diffs, _INTERVAL))
    decision.update(
        candidate_f1=round(candidate_f1, 4),
        current_f1=round(current_f1, 4),
        diff=round(diff, 4),
        ci90=[round(low, 4), round(high, 4)],
        tolerance=tolerance,
    )
    if candidate_f1 == 0 and current_f1 == 0:
        decision.update(promote=False, reason=f"both models score 0 on {n} held-out items")
        return decision
    if diff >= -tolerance:
        reason = (
            f"macro-F1 {candidate_f1:.3f} vs {current_f1:.3f} on {n} held-out items "
            f"(difference {diff:+.3f}, 90% interval {low:+.3f}..{high:+.3f})"
        )
        decision.update(promote=True, reason=reason)
    elif n < min_items and high >= 0:
        decision.update(
            promote=True,
            reason=(
                f"only {n} held-out items (fewer than {min_items}): the drop {diff:+.3f} is "
                f"within noise (90% interval {low:+.3f}..{high:+.3f})"
            ),
        )
    else:
        decision.update(
            promote=False,
            reason=(
                f"worse on {n} held-out items: macro-F1 {candidate_f1:.3f} vs {current_f1:.3f} "
                f"(difference {diff:+.3f}, 90% interval {low:+.3f}..{high:+.3f}, tolerance "
                f"{tolerance})"
            ),
        )
    return decision


def predictions_for(
    space_classes: Sequence[str],
    model_classes: Sequence[str],
    probs: np.ndarray,
    thresholds: Sequence[float],
) -> np.ndarray:
    """A model's 0/1 predictions laid out in `space_classes` order; classes the model does not
    know are never predicted by it."""
    index = {name: i for i, name in enumerate(model_classes)}
    out = np.zeros((len(probs), len(space_classes)), dtype=bool)
    for j, name in enumerate(space_classes):
        if name in index:
            i = index[name]
            out[:, j] = probs[:, i] >= thresholds[i]
    return out
