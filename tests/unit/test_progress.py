"""Progress: a bar only on a terminal; plain log lines for log collectors."""

from __future__ import annotations

import logging

import pytest

import labelloop.progress as progress
from labelloop.loop.preannotate import _steps


def test_off_a_terminal_progress_is_a_few_plain_lines(monkeypatch, caplog, capsys) -> None:
    clock = iter(float(t) for t in range(0, 1000, 3))
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="labelloop.progress"):
        with progress.Progress("pre-annotate", unit="task") as bar:
            for done in range(0, 101, 10):
                bar.update(done, 100)
    lines = [r.getMessage() for r in caplog.records]
    # One line per 10 s of work (3 s a step here) and one at the end, never a bar.
    assert 2 <= len(lines) <= 5, lines
    assert lines[-1].startswith("pre-annotate: 100/100 tasks")
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
