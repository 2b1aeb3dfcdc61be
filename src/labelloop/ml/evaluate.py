"""Test-set evaluation: metrics, per-image predictions, PR curves and a Markdown report.

All outputs are meant to be read by people (report.md, pr_curves.png) or by other
tools (metrics.json, predictions.csv), so every number leaving this module is a
plain Python float/int/None: ``json.dumps`` must work without a custom encoder.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

from labelloop.ml.thresholds import (
    ThresholdResult,
    apply_thresholds,
    prediction_confidence,
    thresholds_array,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EvaluationReport",
    "compute_metrics",
    "plot_pr_curves",
    "prediction_confidence",
    "write_evaluation",
    "write_predictions_csv",
]

LABEL_SEPARATOR = ";"
PREDICTIONS_CSV = "predictions.csv"
METRICS_JSON = "metrics.json"
REPORT_MD = "report.md"
PR_CURVES_PNG = "pr_curves.png"

_SUMMARY_ROWS: tuple[tuple[str, str], ...] = (
    ("Samples", "n_samples"),
    ("F1 (micro)", "f1_micro"),
    ("F1 (macro)", "f1_macro"),
    ("F1 (samples)", "f1_samples"),
    ("F1 (weighted)", "f1_weighted"),
    ("Hamming loss", "hamming_loss"),
    ("mAP", "mAP"),
    ("Subset accuracy", "subset_accuracy"),
)
_AGGREGATE_KEYS: tuple[str, ...] = (
    "hamming_loss",
    "subset_accuracy",
    "f1_micro",
    "f1_macro",
    "f1_samples",
    "f1_weighted",
    "precision_micro",
    "precision_macro",
    "recall_micro",
    "recall_macro",
)


# --------------------------------------------------------------------------- metrics


def compute_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, y_prob: np.ndarray, classes: Sequence[str]
) -> dict[str, object]:
    """Multi-label metrics as a JSON-safe dict.

    Keys: n_samples, n_classes, hamming_loss, subset_accuracy, f1_{micro,macro,samples,
    weighted}, precision_{micro,macro}, recall_{micro,macro}, mAP and per_class
    ({class: precision, recall, f1, support, average_precision}).

    Undefined ratios count as 0 (``zero_division=0``). Average precision is undefined
    for a class without positives: it is None there and left out of mAP (None when
    no class has positives). With no samples or no classes the aggregates are None.
    """
    classes = [str(c) for c in classes]
    y_true, y_pred, y_prob = _as_label_arrays(y_true, y_pred, y_prob, n_classes=len(classes))
    n_samples, n_classes = y_true.shape
    metrics: dict[str, object] = {"n_samples": int(n_samples), "n_classes": int(n_classes)}

    if n_samples == 0 or n_classes == 0:
        # sklearn refuses empty inputs; an empty split should still yield a report.
        logger.warning(
            "Nothing to evaluate (%d samples, %d classes): metrics are None",
            n_samples,
            n_classes,
        )
        metrics.update({key: None for key in _AGGREGATE_KEYS})
        metrics["mAP"] = None
        metrics["per_class"] = {
            name: {
                "precision": None,
                "recall": None,
                "f1": None,
                "support": 0,
                "average_precision": None,
            }
            for name in classes
        }
        return metrics

    metrics.update(
        {
            "hamming_loss": float(hamming_loss(y_true, y_pred)),
            # accuracy_score on multilabel indicators is exact-match (subset) accuracy.
            "subset_accuracy": float(accuracy_score(y_true, y_pred)),
        }
    )
    for average in ("micro", "macro", "samples", "weighted"):
        metrics[f"f1_{average}"] = float(f1_score(y_true, y_pred, average=average, zero_division=0))
    for average in ("micro", "macro"):
        metrics[f"precision_{average}"] = float(
            precision_score(y_true, y_pred, average=average, zero_division=0)
        )
        metrics[f"recall_{average}"] = float(
            recall_score(y_true, y_pred, average=average, zero_division=0)
        )

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, average=None, zero_division=0
    )
    per_class: dict[str, dict[str, object]] = {}
    average_precisions: list[float] = []
    for c, name in enumerate(classes):
        ap = _average_precision(y_true[:, c], y_prob[:, c])
        if ap is not None:
            average_precisions.append(ap)
        per_class[name] = {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
            "average_precision": ap,
        }
    metrics["mAP"] = float(np.mean(average_precisions)) if average_precisions else None
    metrics["per_class"] = per_class
    return metrics


def pr_curve_points(
    y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str], *, max_points: int = 40
) -> dict[str, dict[str, list[float]]]:
    """Each class's precision-recall curve as at most `max_points` (recall, precision) pairs,
    JSON-safe and small enough to keep in a manifest and draw in a page. Classes without a
    positive have no curve."""
    y_true = _as_matrix(y_true, "y_true", len(classes), dtype=int)
    y_prob = _as_matrix(y_prob, "y_prob", len(classes), dtype=float)
    curves: dict[str, dict[str, list[float]]] = {}
    for c, name in enumerate(classes):
        if not y_true[:, c].any():
            continue
        precision, recall, _ = precision_recall_curve(y_true[:, c], y_prob[:, c])
        keep = np.unique(np.linspace(0, len(recall) - 1, min(max_points, len(recall))).astype(int))
        curves[str(name)] = {
            "recall": [round(float(v), 4) for v in recall[keep]],
            "precision": [round(float(v), 4) for v in precision[keep]],
        }
    return curves


def _average_precision(y_true: np.ndarray, y_prob: np.ndarray) -> float | None:
    # AP is undefined without positives (sklearn warns and returns a meaningless value).
    if not y_true.any():
        return None
    return float(average_precision_score(y_true, y_prob))


# --------------------------------------------------------------------------- confidence


# --------------------------------------------------------------------------- predictions CSV


def write_predictions_csv(
    path: Path,
    image_ids: Sequence[str],
    classes: Sequence[str],
    y_prob: np.ndarray,
    y_pred: np.ndarray,
    y_true: np.ndarray | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    *,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> Path:
    """One row per image: id, probabilities, predicted labels and optional extras.

    Columns, in order: ``image_id``, ``p_<class>`` (4 decimals) per class,
    ``predicted`` (labels joined with ";"), ``predicted_<group>`` per group when
    ``groups`` is given, ``true`` when ``y_true`` is given, and ``confidence``
    (see :func:`prediction_confidence`) when ``thresholds`` is given.
    """
    path = Path(path)
    classes = [str(c) for c in classes]
    image_ids = [str(i) for i in image_ids]
    y_prob = _as_matrix(y_prob, "y_prob", len(classes), dtype=float)
    y_pred = _as_matrix(y_pred, "y_pred", len(classes), dtype=bool)
    _check_rows(len(image_ids), y_prob=y_prob, y_pred=y_pred)

    columns: dict[str, object] = {"image_id": image_ids}
    for c, name in enumerate(classes):
        columns[f"p_{name}"] = y_prob[:, c]
    columns["predicted"] = _joined_labels(y_pred, classes)
    for group, members in _group_indices(groups, classes).items():
        columns[f"predicted_{group}"] = _joined_labels(
            y_pred[:, members], [classes[i] for i in members]
        )
    if y_true is not None:
        y_true_arr = _as_matrix(y_true, "y_true", len(classes), dtype=bool)
        _check_rows(len(image_ids), y_true=y_true_arr)
        columns["true"] = _joined_labels(y_true_arr, classes)
    if thresholds is not None:
        columns["confidence"] = prediction_confidence(y_prob, thresholds)

    path.parent.mkdir(parents=True, exist_ok=True)
    # An empty label set is an empty field; readers should treat a missing value as "no labels".
    pd.DataFrame(columns).to_csv(path, index=False, float_format="%.4f")
    logger.info("Wrote %d predictions to %s", len(image_ids), path)
    return path


def _joined_labels(mask: np.ndarray, names: Sequence[str]) -> list[str]:
    return [
        LABEL_SEPARATOR.join(name for name, on in zip(names, row, strict=True) if on)
        for row in mask
    ]


def _group_indices(
    groups: Mapping[str, Sequence[str]] | None, classes: Sequence[str]
) -> dict[str, list[int]]:
    """Column indices of each group's classes, in model class order."""
    if not groups:
        return {}
    position = {name: i for i, name in enumerate(classes)}
    result: dict[str, list[int]] = {}
    for group, members in groups.items():
        unknown = [str(m) for m in members if str(m) not in position]
        if unknown:
            # A group may list classes the model was not trained on (e.g. dropped
            # for lack of data); that must not block the evaluation.
            logger.warning("Group %r: ignoring classes not in the model: %s", group, unknown)
        result[str(group)] = sorted(position[str(m)] for m in members if str(m) in position)
    return result


# --------------------------------------------------------------------------- PR curves


def plot_pr_curves(
    path: Path,
    y_true: np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> Path | None:
    """One PNG with a PR curve per class that has positives; None if no class has any.

    Each panel is titled with the class, its average precision and support; when
    thresholds are given the operating point (precision/recall at the threshold)
    is marked.
    """
    path = Path(path)
    classes = [str(c) for c in classes]
    y_true = _as_matrix(y_true, "y_true", len(classes), dtype=int)
    y_prob = _as_matrix(y_prob, "y_prob", len(classes), dtype=float)
    _check_rows(y_true.shape[0], y_prob=y_prob)
    t = None if thresholds is None else thresholds_array(thresholds, len(classes))

    plotted = [c for c in range(len(classes)) if y_true[:, c].any()]
    if not plotted:
        logger.warning("No class has positive samples: PR curves not plotted")
        return None

    n_cols = min(4, len(plotted))
    n_rows = math.ceil(len(plotted) / n_cols)
    # Figure (not pyplot): no global state, no interactive backend, thread-safe enough
    # for use inside a server.
    fig = Figure(figsize=(4.0 * n_cols, 3.6 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, c in zip(axes, plotted, strict=False):
        _plot_one_pr_curve(
            ax, y_true[:, c], y_prob[:, c], classes[c], None if t is None else float(t[c])
        )
    for ax in axes[len(plotted) :]:
        ax.set_visible(False)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    logger.info("Wrote PR curves for %d classes to %s", len(plotted), path)
    return path


def _plot_one_pr_curve(
    ax: Axes, y_true: np.ndarray, y_prob: np.ndarray, name: str, threshold: float | None
) -> None:
    precision, recall, _ = precision_recall_curve(y_true, y_prob)
    ap = average_precision_score(y_true, y_prob)
    support = int(y_true.sum())
    ax.step(recall, precision, where="post", color="tab:blue")
    # Precision of a random classifier: the floor any useful curve must beat.
    ax.axhline(support / len(y_true), color="grey", linestyle="--", linewidth=0.8)
    if threshold is not None:
        predicted = y_prob >= threshold
        op_precision = precision_score(y_true, predicted, zero_division=0)
        op_recall = recall_score(y_true, predicted, zero_division=0)
        ax.plot([op_recall], [op_precision], "o", color="tab:red", label=f"t={threshold:.2f}")
        ax.legend(loc="lower left", fontsize="small")
    ax.set_title(f"{name}  AP={ap:.3f}  n={support}", fontsize="medium")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.grid(True, alpha=0.3)


# --------------------------------------------------------------------------- full evaluation


@dataclass(frozen=True)
class EvaluationReport:
    """Paths of everything ``write_evaluation`` produced, and the metrics it wrote.

    ``metrics`` is exactly the content of metrics.json: the ``compute_metrics``
    dict plus ``"thresholds": {class: threshold}``.
    """

    metrics: dict
    predictions_csv: Path
    metrics_json: Path
    report_md: Path
    pr_curves_png: Path | None


def write_evaluation(
    out_dir: Path,
    *,
    image_ids: Sequence[str],
    classes: Sequence[str],
    thresholds: Sequence[float] | np.ndarray | ThresholdResult,
    y_true: np.ndarray,
    y_prob: np.ndarray,
    groups: Mapping[str, Sequence[str]] | None = None,
    title: str = "Evaluation",
    extra: Mapping[str, object] | None = None,
) -> EvaluationReport:
    """Evaluate at the given thresholds and write predictions.csv, metrics.json,
    pr_curves.png and report.md into ``out_dir`` (created if missing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = [str(c) for c in classes]
    if isinstance(thresholds, ThresholdResult):
        thresholds = thresholds.thresholds
    t = thresholds_array(thresholds, len(classes))

    y_pred = apply_thresholds(_as_matrix(y_prob, "y_prob", len(classes), dtype=float), t)
    metrics = compute_metrics(y_true, y_pred, y_prob, classes)
    metrics["thresholds"] = {name: float(t[c]) for c, name in enumerate(classes)}

    predictions_csv = write_predictions_csv(
        out_dir / PREDICTIONS_CSV,
        image_ids,
        classes,
        y_prob,
        y_pred,
        y_true=y_true,
        groups=groups,
        thresholds=t,
    )
    metrics_json = out_dir / METRICS_JSON
    # allow_nan=False: a NaN sneaking in would produce invalid JSON for other tools.
    metrics_json.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    pr_curves_png = plot_pr_curves(out_dir / PR_CURVES_PNG, y_true, y_prob, classes, t)
    report_md = out_dir / REPORT_MD
    report_md.write_text(
        _render_report(
            title=title,
            metrics=metrics,
            classes=classes,
            thresholds=t,
            groups=groups,
            extra=extra,
            pr_curves_png=pr_curves_png,
        ),
        encoding="utf-8",
    )
    logger.info("Wrote evaluation report to %s", report_md)
    return EvaluationReport(
        metrics=metrics,
        predictions_csv=predictions_csv,
        metrics_json=metrics_json,
        report_md=report_md,
        pr_curves_png=pr_curves_png,
    )


def _render_report(
    *,
    title: str,
    metrics: Mapping[str, object],
    classes: Sequence[str],
    thresholds: np.ndarray,
    groups: Mapping[str, Sequence[str]] | None,
    extra: Mapping[str, object] | None,
    pr_curves_png: Path | None,
) -> str:
    lines = [f"# {title}", "", "## Summary", ""]
    lines += _md_table(
        ["Metric", "Value"], [[label, _fmt(metrics.get(key))] for label, key in _SUMMARY_ROWS]
    )
    if extra:
        lines += ["", "## Details", ""]
        lines += _md_table(["Key", "Value"], [[str(k), _fmt(v)] for k, v in extra.items()])

    group_of = _group_of_class(groups)
    per_class = cast(Mapping[str, Mapping[str, object]], metrics["per_class"])
    header = ["Class", "Threshold", "Precision", "Recall", "F1", "AP", "Support"]
    rows = []
    for c, name in enumerate(classes):
        m = per_class[name]
        row = [
            name,
            _fmt(float(thresholds[c])),
            _fmt(m["precision"]),
            _fmt(m["recall"]),
            _fmt(m["f1"]),
            _fmt(m["average_precision"]),
            _fmt(m["support"]),
        ]
        rows.append([group_of.get(name, "")] + row if group_of else row)
    lines += ["", "## Per class", ""]
    lines += _md_table(["Group"] + header if group_of else header, rows)

    lines += ["", "## Precision-recall curves", ""]
    if pr_curves_png is None:
        lines.append("No class has positive samples: no PR curves.")
    else:
        # Relative link: the report stays valid when the run folder is moved or served.
        lines.append(f"![Precision-recall curves]({pr_curves_png.name})")
    return "\n".join(lines) + "\n"


def _group_of_class(groups: Mapping[str, Sequence[str]] | None) -> dict[str, str]:
    """Class -> group name; a class listed in several groups gets them all, comma-joined."""
    group_of: dict[str, str] = {}
    for group, members in (groups or {}).items():
        for member in members:
            key = str(member)
            group_of[key] = f"{group_of[key]}, {group}" if key in group_of else str(group)
    return group_of


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(_md_cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return lines


def _md_cell(value: str) -> str:
    # A raw "|" or newline would break the table layout.
    return value.replace("|", "\\|").replace("\n", " ")


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{float(value):.4f}"
    return str(value)


# --------------------------------------------------------------------------- validation


def _as_matrix(values: object, name: str, n_classes: int, *, dtype: type) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2 or array.shape[1] != n_classes:
        raise ValueError(
            f"{name} must have shape (n_samples, {n_classes}) to match the classes, "
            f"got {array.shape}"
        )
    return array.astype(dtype, copy=False)


def _check_rows(n_rows: int, **arrays: np.ndarray) -> None:
    for name, array in arrays.items():
        if array.shape[0] != n_rows:
            raise ValueError(
                f"expected {n_rows} rows in {name} (one per image), got {array.shape[0]}"
            )


def _as_label_arrays(
    y_true: object, y_pred: object, y_prob: object, *, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    true = _as_matrix(y_true, "y_true", n_classes, dtype=int)
    pred = _as_matrix(y_pred, "y_pred", n_classes, dtype=int)
    prob = _as_matrix(y_prob, "y_prob", n_classes, dtype=float)
    _check_rows(true.shape[0], y_pred=pred, y_prob=prob)
    return true, pred, prob
