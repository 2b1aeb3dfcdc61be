"""Label review (loop/review.py): confident-learning flags on out-of-fold probabilities, the
project path through the ledger and the embedding cache, and the three output formats."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelloop.config import PreprocessConfig
from labelloop.labels import LabelSpace
from labelloop.labelstudio.annotations import AnnotationRecord
from labelloop.loop.ledger import Ledger, TrainingExample
from labelloop.loop.review import (
    SCORINGS,
    Flag,
    NothingToReview,
    Scoring,
    class_thresholds,
    format_flags,
    oof_probabilities,
    review,
    review_project,
    suspects,
)
from labelloop.ml.embeddings import EmbeddingCache
from labelloop.ml.model import build_model
from labelloop.store import ModelBundle, manifest_for

CLASSES = ["bolt", "nut", "rust"]
CONTROLS = ["components", "components", "defects"]


def separable(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, targets and how clear each entry is: class c is present iff dimension c is
    positive, at a distance from 0 (its clarity) between 0.2 and 3, under noise of sigma 0.3,
    plus five noise dimensions. A head learns every label; entries near 0 are ambiguous, far
    ones are not."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(CLASSES))) < 0.4).astype(np.float32)
    clarity = rng.uniform(0.2, 3.0, y.shape)
    signal = (2 * y - 1) * clarity + rng.normal(0, 0.3, y.shape)
    x = np.concatenate([signal, rng.normal(0, 1, (n, 5))], axis=1).astype(np.float32)
    return x, y, clarity


def clear_entries(clarity: np.ndarray, k: int, seed: int = 1) -> list[tuple[int, int]]:
    """k random (image, class) entries the features leave no doubt about."""
    clear = np.argwhere(clarity > 2.0)
    chosen = clear[np.random.default_rng(seed).choice(len(clear), k, replace=False)]
    return [(int(i), int(c)) for i, c in chosen]


def flipped_copy(y: np.ndarray, entries: list[tuple[int, int]]) -> np.ndarray:
    noisy = y.copy()
    for i, c in entries:
        noisy[i, c] = 1 - noisy[i, c]
    return noisy


# --------------------------------------------------------------------------- the flags


@pytest.mark.parametrize("scoring", SCORINGS)
def test_flipped_labels_rank_at_the_top(scoring: Scoring) -> None:
    x, y, clarity = separable()
    flips = clear_entries(clarity, 8)
    noisy = flipped_copy(y, flips)
    task_ids = [1000 + i for i in range(len(x))]

    flags = review(x, noisy, CLASSES, CONTROLS, task_ids, scoring=scoring)

    top = {(f.task_id, f.label) for f in flags[: len(flips)]}
    assert top == {(1000 + i, CLASSES[c]) for i, c in flips}
    scores = [f.score for f in flags]
    assert scores == sorted(scores, reverse=True)


def test_a_flag_says_what_was_annotated_and_what_the_model_sees() -> None:
    x, y, clarity = separable()
    flips = clear_entries(clarity, 2)
    noisy = flipped_copy(y, flips)

    flags = review(x, noisy, CLASSES, CONTROLS, list(range(len(x))))

    assert {(f.task_id, f.label) for f in flags} == {(i, CLASSES[c]) for i, c in flips}
    for flag in flags:
        i, c = flag.task_id, CLASSES.index(flag.label)
        assert flag.control == CONTROLS[c]
        assert flag.annotated == bool(noisy[i, c])
        # The model sees the truth: present when annotated absent, and the other way round.
        assert (flag.probability > 0.5) == bool(y[i, c])


def test_a_clean_dataset_gives_no_flags() -> None:
    x, y, _ = separable()

    assert review(x, y, CLASSES, CONTROLS, list(range(len(x)))) == []


def test_top_keeps_the_best_flags() -> None:
    x, y, clarity = separable()
    noisy = flipped_copy(y, clear_entries(clarity, 8))
    task_ids = list(range(len(x)))

    probs = oof_probabilities(x, noisy)
    every = suspects(probs, noisy, CLASSES, CONTROLS, task_ids)
    three = suspects(probs, noisy, CLASSES, CONTROLS, task_ids, top=3)

    assert len(every) >= 8
    assert three == every[:3]


def test_thresholds_are_the_mean_self_confidence_of_each_class() -> None:
    probs = np.array([[0.9, 0.2], [0.5, 0.4], [0.1, 0.8], [0.3, 0.6]], np.float32)
    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], np.float32)

    t_present, t_absent = class_thresholds(probs, targets)

    np.testing.assert_allclose(t_present, [0.7, 0.8], rtol=1e-6)
    np.testing.assert_allclose(t_absent, [0.8, (0.8 + 0.6 + 0.4) / 3], rtol=1e-6)


def test_the_confident_learning_rule_on_one_class() -> None:
    # Labelled present: p = 0.8, 0.7, 0.6, 0.5, 0.1 -> t_present 0.54.
    # Labelled absent:  p = 0.1, 0.1, 0.2, 0.3, 0.6 -> t_absent 0.74.
    p = np.array([0.8, 0.7, 0.6, 0.5, 0.1, 0.1, 0.1, 0.2, 0.3, 0.6], np.float32)[:, None]
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], np.float32)[:, None]

    flags = suspects(p, y, ["bolt"], ["components"], list(range(10)), scoring="probability")

    # Task 4: annotated present, 1 - p = 0.9 >= 0.74. Task 9: annotated absent, p = 0.6 >= 0.54.
    # Task 3 (present, p = 0.5) is not: 1 - p = 0.5 < 0.74. Nor task 8 (absent, p = 0.3 < 0.54).
    assert [(f.task_id, f.annotated) for f in flags] == [(4, True), (9, False)]
    np.testing.assert_allclose([f.score for f in flags], [0.9, 0.6], rtol=1e-6)
    np.testing.assert_allclose([f.probability for f in flags], [0.1, 0.6], rtol=1e-6)


def test_when_both_thresholds_are_reached_the_likelier_side_wins() -> None:
    # A weak class: t_present = 0.4 and t_absent = 0.5, so p in [0.4, 0.5] reaches both.
    present = [0.2, 0.3, 0.45, 0.52, 0.53]  # tasks 0-4, annotated present
    absent = [0.45, 0.7, 0.51, 0.54, 0.3]  # tasks 5-9, annotated absent
    p = np.array(present + absent, np.float32)[:, None]
    y = np.array([1] * 5 + [0] * 5, np.float32)[:, None]
    t_present, t_absent = class_thresholds(p, y)
    assert (t_present[0], t_absent[0]) == (pytest.approx(0.4), pytest.approx(0.5))

    flagged = {f.task_id for f in suspects(p, y, ["bolt"], ["components"], list(range(10)))}

    # Task 2 (p = 0.45, annotated present): both reached, absent (0.55) likelier -> flagged.
    # Task 5 (p = 0.45, annotated absent): both reached, absent likelier -> kept.
    assert flagged == {0, 1, 2, 6, 7, 8}


def test_margin_scorings_measure_from_the_class_threshold() -> None:
    p = np.array([0.8, 0.7, 0.6, 0.5, 0.1, 0.1, 0.1, 0.2, 0.3, 0.6], np.float32)[:, None]
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], np.float32)[:, None]
    args = (p, y, ["bolt"], ["components"], list(range(10)))

    margin = {f.task_id: f.score for f in suspects(*args, scoring="margin")}
    scaled = {f.task_id: f.score for f in suspects(*args, scoring="scaled_margin")}

    # float32 probabilities: a margin of 0.06 carries an error of a few 1e-8.
    assert margin == pytest.approx({4: 0.9 - 0.74, 9: 0.6 - 0.54}, abs=1e-6)
    assert scaled == pytest.approx({4: (0.9 - 0.74) / 0.26, 9: (0.6 - 0.54) / 0.46}, abs=1e-6)


def test_a_class_with_too_few_positives_is_skipped_and_said_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x, y, clarity = separable()
    noisy = flipped_copy(y, clear_entries(clarity, 8))
    noisy[:, 2] = 0
    noisy[:3, 2] = 1  # three images labelled rust: below the minimum of five

    with caplog.at_level(logging.WARNING, logger="labelloop.loop.review"):
        flags = review(x, noisy, CLASSES, CONTROLS, list(range(len(x))))

    assert flags and all(f.label != "rust" for f in flags)
    assert "defects/rust (3 of 200 with it)" in caplog.text


def test_nothing_to_review_when_no_class_has_enough_labels() -> None:
    x, y, _ = separable(n=40)
    y[:] = 0
    y[0, 0] = 1

    with pytest.raises(NothingToReview, match="no class has 5 images labelled with it"):
        review(x, y, CLASSES, CONTROLS, list(range(len(x))))


def test_too_few_images_for_the_folds() -> None:
    x, y, _ = separable(n=9)

    with pytest.raises(NothingToReview, match="at least 10 labelled images for 5 folds, got 9"):
        oof_probabilities(x, y)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, y, ids: (x[:-1], y, ids), "feature rows but"),
        (lambda x, y, ids: (x, y * 0.5, ids), "must be 0 or 1"),
        (lambda x, y, ids: (x, y, ids[:-1]), "task ids"),
        (lambda x, y, ids: (x, y[:, :2], ids), "target columns but 3 classes"),
    ],
)
def test_mismatched_inputs_are_rejected(change: Callable, message: str) -> None:
    x, y, _ = separable(n=40)
    bad_x, bad_y, bad_ids = change(x, y, list(range(40)))

    with pytest.raises(ValueError, match=message):
        review(bad_x, bad_y, CLASSES, CONTROLS, bad_ids)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top": 0}, "top must be at least 1"),
        ({"scoring": "loudest"}, "scoring must be one of"),
        ({"min_per_class": 0}, "min_per_class must be at least 1"),
        ({"folds": 1}, "folds must be at least 2"),
    ],
)
def test_bad_options_are_rejected(options: dict, message: str) -> None:
    x, y, _ = separable(n=40)

    with pytest.raises(ValueError, match=message):
        review(x, y, CLASSES, CONTROLS, list(range(40)), **options)


def test_out_of_fold_probabilities_do_not_vouch_for_their_own_label() -> None:
    x, y, clarity = separable()
    [(i, c)] = clear_entries(clarity, 1)
    noisy = flipped_copy(y, [(i, c)])

    probs = oof_probabilities(x, noisy)

    assert probs.shape == y.shape
    # Held out of its own fit, the wrongly labelled row is predicted as what it shows.
    assert (probs[i, c] > 0.5) == bool(y[i, c])


# --------------------------------------------------------------------------- formats

SAMPLE = [
    Flag(12, "components", "bolt", True, 0.0312, 0.87654),
    Flag(7, "defects", "rust", False, 0.9812, 0.5),
]


def test_json_is_a_list_of_flag_objects() -> None:
    records = json.loads(format_flags(SAMPLE, "json"))

    assert [r["task_id"] for r in records] == [12, 7]
    assert records[0] == {
        "task_id": 12,
        "control": "components",
        "label": "bolt",
        "annotated": True,
        "probability": 0.0312,
        "score": 0.8765,
    }


def test_csv_has_a_header_and_one_row_per_flag() -> None:
    rows = list(csv.DictReader(io.StringIO(format_flags(SAMPLE, "csv"))))

    assert list(rows[0]) == ["task_id", "control", "label", "annotated", "probability", "score"]
    assert [(r["task_id"], r["label"], r["annotated"]) for r in rows] == [
        ("12", "bolt", "true"),
        ("7", "rust", "false"),
    ]


def test_the_table_names_the_tasks_and_fits_80_columns() -> None:
    long = Flag(123456, "a_control_with_a_very_long_name", "x" * 40, True, 0.01, 0.99)

    text = format_flags([*SAMPLE, long], "table")

    lines = text.splitlines()
    assert lines[0].split() == ["#", "task", "control", "label", "annotated", "p(present)", "score"]
    assert lines[1].split()[:5] == ["1", "12", "components", "bolt", "present"]
    assert lines[2].split()[:5] == ["2", "7", "defects", "rust", "absent"]
    assert "123456" in lines[3]
    assert max(len(line) for line in lines) <= 80


def test_no_flags_in_every_format() -> None:
    assert json.loads(format_flags([], "json")) == []
    assert format_flags([], "csv").strip() == "task_id,control,label,annotated,probability,score"
    assert "No suspect labels" in format_flags([], "table")


def test_an_unknown_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="format must be one of table, json, csv"):
        format_flags(SAMPLE, "xml")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- a project

PROJECT = 3
CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="colour" toName="image" '
    'choice="multiple"><Choice value="red"/><Choice value="blue"/></Choices></View>'
)
N_TASKS = 30
WRONG_TASK = 5  # a red image labelled blue


def colour_png(red: bool, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
    pixels[..., 0 if red else 2] += 180
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def is_red(task_id: int) -> bool:
    return task_id % 2 == 0


def colour_bundle() -> ModelBundle:
    """A random-init ResNet18 at 32 px: its features still tell a red image from a blue one."""
    space = LabelSpace.from_mapping({"colour": ["red", "blue"]})
    torch.manual_seed(0)
    model = build_model("resnet18", len(space)).eval()
    preprocess = PreprocessConfig(image_size=32)
    manifest = manifest_for(
        version="v1", backbone="resnet18", dropout=0.0, label_space=space, preprocess=preprocess
    )
    return ModelBundle(model, space, [0.5, 0.5], preprocess, manifest, Path("."))


@pytest.fixture()
def project(tmp_path: Path):
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        ledger.set_label_config(PROJECT, CONFIG)
        ledger.upsert(
            [
                AnnotationRecord(
                    project_id=PROJECT,
                    annotation_id=100 + t,
                    task_id=t,
                    image_ref=f"/data/upload/{t}.png",
                    labels={"colour": ("blue",) if t == WRONG_TASK or not is_red(t) else ("red",)},
                    updated_at="2026-12-01T00:00:00Z",
                    was_cancelled=False,
                    ground_truth=False,
                    completed_by=1,
                )
                for t in range(1, N_TASKS + 1)
            ]
        )
        with EmbeddingCache(tmp_path / "embeddings.sqlite3") as cache:
            yield ledger, cache


def fetch_colour(example: TrainingExample) -> bytes | None:
    red = is_red(example.task_id) or example.task_id == WRONG_TASK
    return colour_png(red, example.task_id)


def test_review_project_puts_the_wrong_annotation_first(project) -> None:
    ledger, cache = project

    flags = review_project(ledger, PROJECT, colour_bundle(), fetch_colour, cache, top=2)

    assert {(f.task_id, f.control) for f in flags} == {(WRONG_TASK, "colour")}
    assert {(f.label, f.annotated) for f in flags} == {("red", False), ("blue", True)}


def test_review_project_leaves_out_images_it_cannot_fetch(
    project, caplog: pytest.LogCaptureFixture
) -> None:
    ledger, cache = project

    def fetch(example: TrainingExample) -> bytes | None:
        return None if example.task_id == WRONG_TASK else fetch_colour(example)

    with caplog.at_level(logging.WARNING, logger="labelloop.loop.review"):
        flags = review_project(ledger, PROJECT, colour_bundle(), fetch, cache)

    assert all(f.task_id != WRONG_TASK for f in flags)
    assert "leaves out 1 of 30 tasks" in caplog.text


def test_review_project_says_what_is_missing(project, tmp_path: Path) -> None:
    ledger, cache = project
    bundle = colour_bundle()

    with pytest.raises(NothingToReview, match="could be read"):
        review_project(ledger, PROJECT, bundle, lambda e: None, cache)
    with pytest.raises(NothingToReview, match="no annotations yet"):
        ledger.set_label_config(PROJECT + 1, CONFIG)
        review_project(ledger, PROJECT + 1, bundle, fetch_colour, cache)
    with pytest.raises(NothingToReview, match="label config of project 99 is not known"):
        review_project(ledger, 99, bundle, fetch_colour, cache)


def test_review_project_rejects_a_bad_option_before_fetching(project) -> None:
    ledger, cache = project

    def fetch(example: TrainingExample) -> bytes | None:
        raise AssertionError("fetched despite top=0")

    with pytest.raises(ValueError, match="top must be at least 1"):
        review_project(ledger, PROJECT, colour_bundle(), fetch, cache, top=0)


REVIEW_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="components" toName="image" choice="multiple">
    <Choice value="bolt"/><Choice value="nut"/>
  </Choices>
  <Choices name="defects" toName="image" choice="single">
    <Choice value="rust"/><Choice value="dent"/>
  </Choices>
</View>"""


def test_review_predictions_propose_the_annotation_with_the_flagged_labels_turned_over(
    tmp_path: Path,
) -> None:
    from labelloop.labelstudio.label_config import parse_label_config
    from labelloop.labelstudio.results import validate_prediction
    from labelloop.loop.review import review_predictions

    def record(task: int, labels: dict[str, tuple[str, ...]]) -> AnnotationRecord:
        return AnnotationRecord(
            5,
            100 + task,
            task,
            f"/data/{task}.png",
            labels,
            "2026-12-02T00:00:00Z",
            False,
            False,
            1,
        )

    flags = [
        Flag(1, "components", "bolt", True, 0.02, 0.98),  # bolt annotated, surely absent
        Flag(1, "components", "nut", False, 0.95, 0.95),  # nut missing, surely present
        Flag(2, "defects", "dent", False, 0.90, 0.90),  # single choice: dent instead of rust
        Flag(3, "defects", "rust", True, 0.10, 0.90),  # the only defect is wrong: none left
        Flag(4, "components", "bolt", True, 0.01, 0.99),  # annotation deleted since
    ]
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        ledger.set_label_config(5, REVIEW_CONFIG)
        ledger.upsert(
            [
                record(1, {"components": ("bolt",), "defects": ("rust",)}),
                record(2, {"components": ("nut",), "defects": ("rust",)}),
                record(3, {"components": ("bolt", "nut"), "defects": ("rust",)}),
            ]
        )
        out = dict(review_predictions(flags, ledger, 5, "v3-20261202T000000"))
    assert sorted(out) == [1, 2, 3]
    config = parse_label_config(REVIEW_CONFIG)
    proposed = {
        task: {item.from_name: item.value.choices for item in p.result} for task, p in out.items()
    }
    assert proposed == {
        1: {"components": ["nut"], "defects": ["rust"]},
        2: {"components": ["nut"], "defects": ["dent"]},
        3: {"components": ["bolt", "nut"]},
    }
    for prediction in out.values():
        assert prediction.model_version == "review-v3-20261202T000000"
        validate_prediction(prediction, config)
    # Lowest score = most suspect, as Label Studio sorts; the flags travel in meta.
    assert out[1].score == pytest.approx(0.02)
    flagged = next(i for i in out[1].result if i.from_name == "components")
    assert [f["label"] for f in flagged.meta["review"]] == ["bolt", "nut"]
    unflagged = next(i for i in out[1].result if i.from_name == "defects")
    assert unflagged.meta is None
