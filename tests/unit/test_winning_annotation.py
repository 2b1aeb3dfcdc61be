"""One rule picks the annotation that labels a task, for JSON exports and the ledger alike."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from labelloop.config import DataConfig
from labelloop.labelstudio.annotations import (
    AnnotationRank,
    annotation_rank,
    record_from_task_annotation,
    winning_annotation,
)
from labelloop.labelstudio.export import load_labelstudio_export
from labelloop.loop.ledger import Ledger

PROJECT = 1


def _annotation(annotation_id: int, updated_at: str | None, **flags: bool) -> dict[str, Any]:
    """An annotation whose one label, ``a<id>``, tells which annotation won."""
    result = [
        {
            "from_name": "pick",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [f"a{annotation_id}"]},
        }
    ]
    annotation: dict[str, Any] = {"id": annotation_id, "result": result, **flags}
    if updated_at is not None:
        annotation["updated_at"] = updated_at
    return annotation


# (case, annotations, id of the winner or None, whether comparing the strings picks another)
CASES = [
    (
        "offset-vs-z",  # 10:00+02:00 is 08:00Z, earlier than 09:00Z; as text "T10" > "T09"
        [_annotation(1, "2026-03-01T10:00:00+02:00"), _annotation(2, "2026-03-01T09:00:00Z")],
        2,
        True,
    ),
    (
        "fraction-vs-none",  # "Z" sorts after ".", but .1 s is later
        [_annotation(1, "2026-03-01T09:00:00Z"), _annotation(2, "2026-03-01T09:00:00.1Z")],
        2,
        True,
    ),
    (
        "naive-space-vs-t",  # a naive time is UTC; " " sorts before "T"
        [_annotation(1, "2026-03-01T09:00:00Z"), _annotation(2, "2026-03-01 09:30:00")],
        2,
        True,
    ),
    (
        "same-instant-two-forms",  # a tie in time: the higher id wins, whatever the text says
        [_annotation(4, "2026-03-01T11:00:00+02:00"), _annotation(5, "2026-03-01T09:00:00Z")],
        5,
        True,
    ),
    (
        "identical-timestamps",
        [_annotation(7, "2026-03-01T09:00:00Z"), _annotation(3, "2026-03-01T09:00:00Z")],
        7,
        False,
    ),
    (
        "old-ground-truth",  # a ground truth beats any other, however old
        [
            _annotation(1, "2020-01-01T00:00:00Z", ground_truth=True),
            _annotation(2, "2026-01-01T00:00:00Z"),
        ],
        1,
        False,
    ),
    (
        "skipped-ground-truth-ignored",
        [
            _annotation(1, "2020-01-01T00:00:00Z", ground_truth=True),
            _annotation(2, "2026-06-01T00:00:00Z", ground_truth=True, was_cancelled=True),
            _annotation(3, "2026-01-01T00:00:00Z"),
        ],
        1,
        False,
    ),
    (
        "latest-of-two-ground-truths-by-time",
        [
            _annotation(1, "2026-03-01T10:00:00+02:00", ground_truth=True),
            _annotation(2, "2026-03-01T09:00:00Z", ground_truth=True),
            _annotation(3, "2026-12-01T00:00:00Z"),
        ],
        2,
        True,
    ),
    (
        "newest-skipped",
        [
            _annotation(1, "2026-01-01T00:00:00Z"),
            _annotation(2, "2026-02-01T00:00:00Z", was_cancelled=True),
        ],
        1,
        False,
    ),
    (
        "all-skipped",
        [_annotation(1, "2026-01-01T00:00:00Z", was_cancelled=True)],
        None,
        False,
    ),
]


def _by_string(annotations: list[dict[str, Any]]) -> int | None:
    """The rule the export used to apply: timestamps compared as text."""
    answered = [a for a in annotations if not a.get("was_cancelled")]
    if not answered:
        return None
    best = max(
        answered,
        key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or ""), a["id"]),
    )
    return best["id"]


def _tasks() -> list[dict[str, Any]]:
    """One task per case; annotation ids (unique in Label Studio) shifted by 100 x task id."""
    return [
        {
            "id": task_id,
            "data": {"image": f"/data/upload/{PROJECT}/{name}.png"},
            "annotations": [_shifted(a, 100 * task_id) for a in annotations],
        }
        for task_id, (name, annotations, _, _) in enumerate(CASES, start=1)
    ]


def _shifted(annotation: dict[str, Any], offset: int) -> dict[str, Any]:
    flags = {k: v for k, v in annotation.items() if k in ("ground_truth", "was_cancelled")}
    return _annotation(annotation["id"] + offset, annotation.get("updated_at"), **flags)


def _winner_id(labels: dict[str, tuple[str, ...]]) -> int:
    (label,) = labels["pick"]
    return int(label.removeprefix("a"))


def _export_winners(tmp_path: Path) -> dict[int, int]:
    images = tmp_path / "images"
    images.mkdir()
    for name, *_ in CASES:
        Image.new("RGB", (8, 8)).save(images / f"{name}.png")
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_tasks()), encoding="utf-8")
    data = load_labelstudio_export(export, images, DataConfig())
    return {sample.sources[0]: _winner_id(sample.labels) for sample in data.samples}


def _ledger_winners(tmp_path: Path) -> dict[int, int]:
    records = [
        record_from_task_annotation(PROJECT, task, annotation, None)
        for task in _tasks()
        for annotation in task["annotations"]
    ]
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.upsert(records)
        examples = ledger.training_set(PROJECT)
    winners = {example.task_id: _winner_id(example.labels) for example in examples}
    for example in examples:
        assert example.annotation_id == winners[example.task_id]
    return winners


def test_export_and_ledger_pick_the_same_annotation(tmp_path: Path) -> None:
    expected = {
        task_id: 100 * task_id + winner
        for task_id, (_, _, winner, _) in enumerate(CASES, start=1)
        if winner is not None
    }
    assert _export_winners(tmp_path) == expected
    assert _ledger_winners(tmp_path) == expected


@pytest.mark.parametrize(("name", "annotations", "winner", "text_differs"), CASES)
def test_the_cases_are_tricky_where_they_say(
    name: str, annotations: list[dict[str, Any]], winner: int | None, text_differs: bool
) -> None:
    chosen = winning_annotation(annotations, annotation_rank)
    assert (chosen["id"] if chosen else None) == winner, name
    # Where marked, comparing the timestamps as text (the export's old rule) picks another one.
    assert (_by_string(annotations) != winner) is text_differs, name


def test_missing_or_unreadable_updated_at_ranks_oldest() -> None:
    undated, garbled, dated = (
        _annotation(9, None),
        _annotation(8, "yesterday"),
        _annotation(1, "1970-01-02T00:00:00Z"),
    )
    assert annotation_rank(undated).updated_ts == -math.inf
    assert annotation_rank(garbled).updated_ts == -math.inf
    assert winning_annotation([undated, garbled, dated], annotation_rank) is dated
    assert winning_annotation([undated, garbled], annotation_rank) is undated  # then the id


def test_winning_annotation_takes_any_item_with_a_rank() -> None:
    rows = [("old-gt", True, 1.0, 1), ("new", False, 2.0, 2), ("skipped-gt", True, 3.0, 3)]

    def rank(row: tuple[str, bool, float, int]) -> AnnotationRank:
        name, ground_truth, ts, annotation_id = row
        return AnnotationRank(name.startswith("skipped"), ground_truth, ts, annotation_id)

    assert winning_annotation(rows, rank) == rows[0]
    assert winning_annotation([], rank) is None
