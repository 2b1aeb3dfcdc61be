"""Per-class decision thresholds for a multi-label (sigmoid) classifier.

A single global 0.5 cut-off is rarely right for every class: rare classes and
poorly calibrated heads need their own operating point. Thresholds are tuned on
the validation set (never the test set) by maximising F-beta per class, then
applied unchanged at test and serving time.

Decision rule everywhere in labelloop: a class is predicted when
``probability >= threshold``. This matches the convention of
``sklearn.metrics.precision_recall_curve``, so a threshold taken from the curve
reproduces exactly the precision/recall the curve reported.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    fbeta_score,
    precision_recall_curve,
)

logger = logging.getLogger(__name__)

__all__ = ["ThresholdResult", "apply_thresholds", "tune_thresholds"]

METHOD_PR_CURVE = "pr_curve"
METHOD_GRID = "grid"
METHOD_DEFAULT = "default"

# Two F-beta values closer than this are treated as a tie. Mathematically equal
# scores reached through different precision/recall pairs can differ in the last
# bits, which would otherwise make the tie rule depend on rounding noise.
_TIE_TOLERANCE = 1e-12


# eq=False: the fields are numpy arrays, for which the generated __eq__/__hash__
# would raise ("truth value of an array is ambiguous") rather than compare.
@dataclass(frozen=True, eq=False)
class ThresholdResult:
    """Tuned thresholds, aligned with the class order of the tuning data.

    Attributes:
        thresholds: float array, shape (n_classes,).
        methods: per class, how the threshold was chosen: "pr_curve", "grid" or "default".
        scores: per class, F-beta on the tuning data at the final (clipped)
            threshold; nan where the method is "default".
    """

    thresholds: np.ndarray
    methods: tuple[str, ...]
    scores: np.ndarray

    def __post_init__(self) -> None:
        thresholds = np.array(self.thresholds, dtype=float).reshape(-1)
        scores = np.array(self.scores, dtype=float).reshape(-1)
        methods = tuple(str(m) for m in self.methods)
        if not (len(thresholds) == len(scores) == len(methods)):
            raise ValueError(
                "ThresholdResult fields must have one entry per class; got "
                f"{len(thresholds)} thresholds, {len(methods)} methods, {len(scores)} scores"
            )
        # Read-only copies so that "frozen" also holds for the array contents.
        thresholds.setflags(write=False)
        scores.setflags(write=False)
        object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "methods", methods)

    def to_dict(self, classes: Sequence[str]) -> dict[str, dict[str, object]]:
        """JSON-safe mapping ``{class: {"threshold", "method", "fbeta"}}`` (nan -> None)."""
        classes = list(classes)
        if len(classes) != len(self.thresholds):
            raise ValueError(
                f"expected {len(self.thresholds)} class names (one per threshold), "
                f"got {len(classes)}"
            )
        return {
            str(name): {
                "threshold": float(t),
                "method": method,
                "fbeta": None if math.isnan(s) else float(s),
            }
            for name, t, method, s in zip(
                classes, self.thresholds, self.methods, self.scores, strict=True
            )
        }


def tune_thresholds(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    *,
    beta: float = 1.0,
    default: float = 0.5,
    min_positives: int = 1,
    min_threshold: float = 0.05,
    max_threshold: float = 0.95,
    grid_size: int = 101,
    classes: Sequence[str] | None = None,
    fallback: Sequence[float] | None = None,
) -> ThresholdResult:
    """Choose one threshold per class maximising F-beta on (validation) data.

    `classes` names the columns in log messages (else they are called by index). `fallback`
    gives each class its own threshold for when it cannot be tuned (a parent model's), in
    place of `default`.

    Per class:
      * fewer than ``min_positives`` positives -> ``default`` (method "default", score nan);
      * degenerate PR curve (fewer than 2 distinct scores, no negatives, or no
        positives) -> grid search over ``np.linspace(0, 1, grid_size)`` (method "grid");
      * otherwise the best threshold of ``precision_recall_curve`` (method "pr_curve").

    Ties: among thresholds reaching the maximum F-beta, the largest one is taken.
    It is deterministic and, for equal F-beta, predicts fewer positives (fewer false
    positives), which is the cheaper error for an annotation-assist tool.

    The chosen threshold is clipped to ``[min_threshold, max_threshold]`` so that
    no class is always-on or always-off in production, and its score is recomputed
    at the clipped value.

    Args:
        y_true: (n_samples, n_classes) 0/1 labels.
        y_prob: (n_samples, n_classes) probabilities in [0, 1].
    """
    y_true, y_prob = _validate_inputs(
        y_true,
        y_prob,
        beta=beta,
        default=default,
        min_positives=min_positives,
        min_threshold=min_threshold,
        max_threshold=max_threshold,
        grid_size=grid_size,
    )
    n_samples, n_classes = y_true.shape
    if fallback is None:
        untuned = np.full(n_classes, float(default))
    else:
        untuned = np.asarray(fallback, dtype=float).reshape(-1)
        if untuned.shape != (n_classes,):
            raise ValueError(f"expected {n_classes} fallback thresholds, got {untuned.shape[0]}")
    if n_samples == 0:
        if n_classes:
            logger.warning(
                "No tuning samples: every one of the %d classes keeps its %s threshold",
                n_classes,
                "fallback" if fallback is not None else f"default ({default:.3f})",
            )
        return ThresholdResult(
            thresholds=untuned.copy(),
            methods=(METHOD_DEFAULT,) * n_classes,
            scores=np.full(n_classes, np.nan),
        )

    thresholds = np.empty(n_classes, dtype=float)
    scores = np.empty(n_classes, dtype=float)
    methods: list[str] = []
    for c in range(n_classes):
        t, method, score = _tune_one(
            y_true[:, c],
            y_prob[:, c],
            name=classes[c] if classes is not None and c < len(classes) else f"index {c}",
            beta=beta,
            default=float(untuned[c]),
            min_positives=min_positives,
            min_threshold=min_threshold,
            max_threshold=max_threshold,
            grid_size=grid_size,
        )
        thresholds[c] = t
        scores[c] = score
        methods.append(method)
    return ThresholdResult(thresholds=thresholds, methods=tuple(methods), scores=scores)


def apply_thresholds(y_prob: np.ndarray, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Boolean (n_samples, n_classes) predictions: ``y_prob >= thresholds`` per class."""
    y_prob = np.asarray(y_prob, dtype=float)
    if y_prob.ndim != 2:
        raise ValueError(f"y_prob must be 2-D (n_samples, n_classes), got shape {y_prob.shape}")
    t = np.asarray(thresholds, dtype=float).reshape(-1)
    if t.shape[0] != y_prob.shape[1]:
        raise ValueError(
            f"expected {y_prob.shape[1]} thresholds (one per class of y_prob), got {t.shape[0]}"
        )
    return y_prob >= t[np.newaxis, :]


# --------------------------------------------------------------------------- helpers


def _tune_one(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    *,
    name: str,
    beta: float,
    default: float,
    min_positives: int,
    min_threshold: float,
    max_threshold: float,
    grid_size: int,
) -> tuple[float, str, float]:
    """Threshold, method and F-beta at that threshold for one class column."""
    n_pos = int(y_true.sum())
    if n_pos < min_positives:
        logger.warning(
            "Class %s has %d positive(s) (< min_positives=%d): keeping the threshold %.3f",
            name,
            n_pos,
            min_positives,
            default,
        )
        return float(default), METHOD_DEFAULT, float("nan")

    if _pr_curve_is_degenerate(y_true, y_prob):
        method = METHOD_GRID
        raw = _best_grid_threshold(y_true, y_prob, beta=beta, grid_size=grid_size)
        logger.debug("Class %s: degenerate PR curve, grid search gave %.4f", name, raw)
    else:
        method = METHOD_PR_CURVE
        raw = _best_pr_curve_threshold(y_true, y_prob, beta=beta)

    threshold = float(np.clip(raw, min_threshold, max_threshold))
    if threshold != raw:
        logger.debug("Class %s: threshold %.4f clipped to %.4f", name, raw, threshold)
    # Scored with sklearn at the final threshold, so the reported score is the one
    # that apply_thresholds will actually produce (clipped or not).
    score = float(fbeta_score(y_true, y_prob >= threshold, beta=beta, zero_division=0))
    return threshold, method, score


def _pr_curve_is_degenerate(y_true: np.ndarray, y_prob: np.ndarray) -> bool:
    """True when the PR curve cannot rank thresholds meaningfully.

    With a single distinct score there is only one candidate threshold; without
    negatives precision is constantly 1; without positives recall is undefined
    (sklearn warns and returns nan).
    """
    n_pos = int(y_true.sum())
    return np.unique(y_prob).size < 2 or n_pos == 0 or n_pos == y_true.size


def _best_pr_curve_threshold(y_true: np.ndarray, y_prob: np.ndarray, *, beta: float) -> float:
    precision, recall, thresholds = precision_recall_curve(y_true, y_prob)
    # The last (precision=1, recall=0) point has no threshold: drop it so the
    # arrays line up with `thresholds`.
    precision, recall = precision[:-1], recall[:-1]
    # sklearn has no vectorised "F-beta at every threshold"; calling fbeta_score per
    # threshold would be O(n^2). The formula below is the standard one, with 0/0 -> 0
    # to match fbeta_score(zero_division=0).
    b2 = beta * beta
    numerator = (1.0 + b2) * precision * recall
    denominator = b2 * precision + recall
    fbeta = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
    return _largest_argmax(thresholds, fbeta)


def _best_grid_threshold(
    y_true: np.ndarray, y_prob: np.ndarray, *, beta: float, grid_size: int
) -> float:
    grid = np.linspace(0.0, 1.0, grid_size)
    # One sklearn call for the whole grid: each grid point becomes a "label" column
    # of a multilabel problem, and average=None yields one F-beta per column.
    predictions = y_prob[:, np.newaxis] >= grid[np.newaxis, :]
    targets = np.repeat(y_true[:, np.newaxis], grid_size, axis=1)
    fbeta = np.asarray(
        fbeta_score(targets, predictions, beta=beta, average=None, zero_division=0),
        dtype=float,
    )
    return _largest_argmax(grid, fbeta)


def _largest_argmax(candidates: np.ndarray, values: np.ndarray) -> float:
    """Largest candidate among those whose value is (within tolerance) maximal."""
    best = values.max()
    return float(candidates[values >= best - _TIE_TOLERANCE].max())


def _validate_inputs(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    *,
    beta: float,
    default: float,
    min_positives: int,
    min_threshold: float,
    max_threshold: float,
    grid_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    y_true_arr = np.asarray(y_true)
    y_prob_arr = np.asarray(y_prob, dtype=float)
    if y_true_arr.ndim != 2 or y_prob_arr.ndim != 2:
        raise ValueError(
            "y_true and y_prob must be 2-D (n_samples, n_classes); got shapes "
            f"{y_true_arr.shape} and {y_prob_arr.shape}"
        )
    if y_true_arr.shape != y_prob_arr.shape:
        raise ValueError(
            "y_true and y_prob must have the same shape; got "
            f"{y_true_arr.shape} and {y_prob_arr.shape}"
        )
    if y_true_arr.size and not np.isin(y_true_arr, (0, 1)).all():
        raise ValueError(
            f"y_true must contain only 0/1, got values {np.unique(y_true_arr)[:10].tolist()}"
        )
    # Catches logits passed instead of probabilities, and NaNs from a broken model.
    if y_prob_arr.size:
        n_bad = int((~np.isfinite(y_prob_arr)).sum())
        if n_bad:
            raise ValueError(
                f"y_prob must be finite probabilities in [0, 1], got {n_bad} non-finite values"
            )
        if y_prob_arr.min() < 0.0 or y_prob_arr.max() > 1.0:
            raise ValueError(
                "y_prob must be finite probabilities in [0, 1], got values in "
                f"[{y_prob_arr.min()}, {y_prob_arr.max()}]"
            )
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not 0.0 <= min_threshold <= max_threshold <= 1.0:
        raise ValueError(
            "expected 0 <= min_threshold <= max_threshold <= 1, got "
            f"min_threshold={min_threshold!r}, max_threshold={max_threshold!r}"
        )
    if not 0.0 <= default <= 1.0:
        raise ValueError(f"default must be within [0, 1], got {default!r}")
    if not _is_int(min_positives) or min_positives < 0:
        raise ValueError(f"min_positives must be an int >= 0, got {min_positives!r}")
    if not _is_int(grid_size) or grid_size < 2:
        raise ValueError(f"grid_size must be an int >= 2, got {grid_size!r}")
    return y_true_arr.astype(int, copy=False), y_prob_arr


def _is_int(value: object) -> bool:
    # bool is an Integral too, but True as a count is almost certainly a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def prediction_confidence(
    y_prob: np.ndarray, thresholds: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Per-sample confidence in [0, 1]: how far the least certain class is from its threshold.

    For each class the margin is the distance to the threshold normalised by the
    room available on that side, so 0 means "exactly at the threshold" and 1 means
    "at 0 or 1, as far as possible":

        margin_c = (p - t) / (1 - t)  if p >= t
                   (t - p) / t        otherwise

    The confidence of a sample is ``min_c margin_c``: a single class near its
    threshold makes the whole image worth a human look. With no classes it is 1.
    """
    y_prob = np.asarray(y_prob, dtype=float)
    if y_prob.ndim != 2:
        raise ValueError(f"y_prob must be 2-D (n_samples, n_classes), got shape {y_prob.shape}")
    t = np.broadcast_to(thresholds_array(thresholds, y_prob.shape[1]), y_prob.shape)
    above = y_prob >= t
    distance = np.where(above, y_prob - t, t - y_prob)
    room = np.where(above, 1.0 - t, t)
    # room == 0 only when p sits exactly on a threshold of 0 or 1: margin 0.
    margin = np.divide(distance, room, out=np.zeros_like(distance), where=room > 0)
    confidence = np.min(margin, axis=1, initial=1.0)
    return np.clip(confidence, 0.0, 1.0)


def thresholds_array(thresholds: Sequence[float] | np.ndarray, n_classes: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=float).reshape(-1)
    if t.shape[0] != n_classes:
        raise ValueError(f"expected {n_classes} thresholds (one per class), got {t.shape[0]}")
    return t
