"""Progress: a bar only on a terminal; plain log lines for log collectors."""

from __future__ import annotations

import logging

import pytest

import labelloop.progress as progress
from labelloop.loop.preannotate import _steps


def test_off_a_terminal_progress_is_a_line_per_tenth(caplog, capsys) -> None:
    with caplog.at_level(logging.INFO, logger="labelloop.progress"):
        with progress.Progress("pre-annotate", unit="task") as bar:
            for done in range(0, 1001, 5):
                bar.update(done, 1000)
    lines = [r.getMessage() for r in caplog.records]
    # 10 %, 20 %, ... 90 %, then the end: never a bar, never a line per update.
    assert len(lines) == 10, lines
    assert lines[0].startswith("pre-annotate: 100/1000 tasks")
    assert lines[-1].startswith("pre-annotate: 1000/1000 tasks")
    assert "\r" not in capsys.readouterr().err


def test_tqdm_is_told_to_hide_off_a_terminal() -> None:
    assert progress.tqdm_disable(True) is None  # tqdm: disabled when not a TTY
    assert progress.tqdm_disable(False) is True


@pytest.mark.parametrize(
    ("n", "size", "first", "expected"),
    [
        (0, 256, 32, []),
        (10, 256, 32, [(0, 10)]),
        (300, 256, 32, [(0, 32), (32, 288), (288, 300)]),
        (64, 16, 32, [(0, 16), (16, 32), (32, 48), (48, 64)]),
    ],
)
def test_the_first_step_is_short_so_predictions_reach_label_studio_soon(
    n, size, first, expected
) -> None:
    assert _steps(n, size, first=first) == expected
