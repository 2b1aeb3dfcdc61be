from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from labelloop.ml.evaluate import (
    EvaluationReport,
    compute_metrics,
    plot_pr_curves,
    write_evaluation,
    write_predictions_csv,
)
from labelloop.ml.thresholds import ThresholdResult, prediction_confidence

CLASSES = ["bolt", "nut", "scratch"]
Y_TRUE = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
Y_PRED = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 1, 0]])
Y_PROB = np.array([[0.9, 0.2, 0.4], [0.1, 0.8, 0.7], [0.7, 0.3, 0.2], [0.2, 0.6, 0.1]], dtype=float)
GROUPS = {"components": ["bolt", "nut"], "defects": ["scratch"]}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_metrics_hand_computed() -> None:
    m = compute_metrics(Y_TRUE, Y_PRED, Y_PROB, CLASSES)
    # Per class F1: bolt 1 (perfect), nut 1/2 (TP1 FP1 FN1), scratch 2/3 (TP1 FN1).
    assert m["f1_macro"] == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)
    # Micro: TP=4, FP=1, FN=2 -> 2*4 / (2*4 + 1 + 2).
    assert m["f1_micro"] == pytest.approx(8 / 11)
    assert m["precision_micro"] == pytest.approx(4 / 5)
    assert m["recall_micro"] == pytest.approx(4 / 6)
    assert m["hamming_loss"] == pytest.approx(3 / 12)
    assert m["subset_accuracy"] == pytest.approx(1 / 4)  # only row 1 matches exactly
    assert m["n_samples"] == 4 and m["n_classes"] == 3
    assert m["per_class"]["nut"] == {
        "precision": pytest.approx(0.5),
        "recall": pytest.approx(0.5),
        "f1": pytest.approx(0.5),
        "support": 2,
        "average_precision": pytest.approx(average_precision_score(Y_TRUE[:, 1], Y_PROB[:, 1])),
    }
    expected_map = np.mean([average_precision_score(Y_TRUE[:, c], Y_PROB[:, c]) for c in range(3)])
    assert m["mAP"] == pytest.approx(expected_map)


def test_support_zero_class_excluded_from_map() -> None:
    y_true = np.hstack([Y_TRUE, np.zeros((4, 1), dtype=int)])
    y_pred = np.hstack([Y_PRED, np.array([[0], [1], [0], [0]])])
    y_prob = np.hstack([Y_PROB, np.array([[0.1], [0.9], [0.2], [0.3]])])
    classes = CLASSES + ["crack"]
    m = compute_metrics(y_true, y_pred, y_prob, classes)
    assert m["per_class"]["crack"]["average_precision"] is None
    assert m["per_class"]["crack"]["support"] == 0
    expected_map = np.mean([average_precision_score(Y_TRUE[:, c], Y_PROB[:, c]) for c in range(3)])
    assert m["mAP"] == pytest.approx(expected_map)


def test_map_is_none_without_positives() -> None:
    m = compute_metrics(np.zeros((3, 2), dtype=int), np.zeros((3, 2)), np.zeros((3, 2)), ["a", "b"])
    assert m["mAP"] is None
    assert all(v["average_precision"] is None for v in m["per_class"].values())


def test_metrics_are_plain_json_types() -> None:
    m = compute_metrics(Y_TRUE, Y_PRED, Y_PROB, CLASSES)
    json.dumps(m, allow_nan=False)

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        else:
            assert value is None or type(value) in (int, float, str), type(value)

    walk(m)


def test_metrics_empty_split_does_not_crash() -> None:
    m = compute_metrics(np.zeros((0, 2), dtype=int), np.zeros((0, 2)), np.zeros((0, 2)), ["a", "b"])
    assert m["n_samples"] == 0 and m["f1_macro"] is None and m["mAP"] is None
    json.dumps(m, allow_nan=False)


def test_metrics_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"shape \(n_samples, 2\)"):
        compute_metrics(Y_TRUE, Y_PRED, Y_PROB, ["bolt", "nut"])


def test_prediction_confidence_extremes_and_threshold() -> None:
    t = [0.5, 0.3]
    y_prob = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 1.0], [1.0, 0.3], [0.65, 0.65]])
    conf = prediction_confidence(y_prob, t)
    # Rows: far on both classes, far on both, at threshold, at threshold, and
    # min((0.65-0.5)/0.5, (0.65-0.3)/0.7) = min(0.3, 0.5).
    np.testing.assert_allclose(conf, [1.0, 1.0, 0.0, 0.0, 0.3])


def test_prediction_confidence_monotone_away_from_threshold() -> None:
    t = 0.3
    above = np.linspace(t, 1.0, 20)
    below = np.linspace(t, 0.0, 20)
    conf_above = prediction_confidence(above[:, None], [t])
    conf_below = prediction_confidence(below[:, None], [t])
    assert np.all(np.diff(conf_above) > 0) and np.all(np.diff(conf_below) > 0)
    assert conf_above[0] == 0.0 and conf_below[0] == 0.0
    assert conf_above[-1] == pytest.approx(1.0) and conf_below[-1] == pytest.approx(1.0)


def test_prediction_confidence_threshold_at_bounds() -> None:
    conf = prediction_confidence(np.array([[1.0, 0.0], [0.5, 0.5]]), [1.0, 0.0])
    assert np.all(np.isfinite(conf)) and conf[0] == 0.0


def test_predictions_csv_columns(tmp_path: Path) -> None:
    path = write_predictions_csv(
        tmp_path / "sub" / "p.csv",
        ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
        CLASSES,
        Y_PROB,
        Y_PRED,
        y_true=Y_TRUE,
        groups=GROUPS,
        thresholds=[0.5, 0.5, 0.5],
    )
    rows = _read_csv(path)
    assert list(rows[0]) == [
        "image_id",
        "p_bolt",
        "p_nut",
        "p_scratch",
        "predicted",
        "predicted_components",
        "predicted_defects",
        "true",
        "confidence",
    ]
    assert rows[1]["predicted"] == "nut;scratch"
    assert rows[1]["predicted_components"] == "nut"
    assert rows[1]["predicted_defects"] == "scratch"
    assert rows[0]["true"] == "bolt;scratch"
    assert rows[3]["true"] == ""
    assert rows[0]["p_bolt"] == "0.9000"


def test_predictions_csv_optional_columns_absent(tmp_path: Path) -> None:
    path = write_predictions_csv(tmp_path / "p.csv", ["a", "b", "c", "d"], CLASSES, Y_PROB, Y_PRED)
    rows = _read_csv(path)
    assert list(rows[0]) == ["image_id", "p_bolt", "p_nut", "p_scratch", "predicted"]


def test_predictions_csv_rejects_row_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected 3 rows"):
        write_predictions_csv(tmp_path / "p.csv", ["a", "b", "c"], CLASSES, Y_PROB, Y_PRED)


def test_plot_pr_curves_none_without_positives(tmp_path: Path) -> None:
    out = plot_pr_curves(tmp_path / "pr.png", np.zeros((3, 2)), np.full((3, 2), 0.5), ["a", "b"])
    assert out is None
    assert not (tmp_path / "pr.png").exists()


def test_write_evaluation_writes_everything(tmp_path: Path) -> None:
    out_dir = tmp_path / "eval" / "test"
    thresholds = ThresholdResult(
        thresholds=np.array([0.5, 0.5, 0.5]),
        methods=("pr_curve",) * 3,
        scores=np.array([1.0, 1.0, 1.0]),
    )
    report = write_evaluation(
        out_dir,
        image_ids=["a", "b", "c", "d"],
        classes=CLASSES,
        thresholds=thresholds,
        y_true=Y_TRUE,
        y_prob=Y_PROB,
        groups=GROUPS,
        title="Test set",
        extra={"model_version": "v7", "dataset": "demo"},
    )
    assert isinstance(report, EvaluationReport)
    for p in (report.predictions_csv, report.metrics_json, report.report_md, report.pr_curves_png):
        assert p is not None and p.parent == out_dir and p.stat().st_size > 0

    # Y_PROB >= 0.5 reproduces Y_PRED, so the hand-computed metrics apply.
    metrics = json.loads(report.metrics_json.read_text())
    assert metrics == report.metrics
    assert metrics["f1_macro"] == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)
    assert metrics["thresholds"] == {"bolt": 0.5, "nut": 0.5, "scratch": 0.5}

    rows = _read_csv(report.predictions_csv)
    assert [r["image_id"] for r in rows] == ["a", "b", "c", "d"]
    assert {"true", "confidence", "predicted_components", "predicted_defects"} <= set(rows[0])

    md = report.report_md.read_text()
    assert md.startswith("# Test set")
    for name in CLASSES + ["components", "defects", "model_version", "v7"]:
        assert name in md
    assert "](pr_curves.png)" in md

    png = report.pr_curves_png
    assert png is not None
    assert png.read_bytes()[:8] == _PNG_MAGIC
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
