"""The CLI reads well: whole option names in an 80-column terminal, and no torch at start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from labelloop.cli import app

COMMAND = typer.main.get_command(app)  # a click group (typer's own copy of click)


@pytest.mark.parametrize("name", sorted(COMMAND.commands))  # type: ignore[attr-defined]
def test_help_shows_every_option_name_whole_at_80_columns(name: str) -> None:
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    command = COMMAND.commands[name]  # type: ignore[attr-defined]
    for param in command.params:
        if param.param_type_name == "option":
            for option in (*param.opts, *param.secondary_opts):
                assert option in result.output, f"{name} --help lacks {option} whole"
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_the_command_starts_without_importing_torch() -> None:
    """`labelloop --help` and the commands that do not train must start in well under a second;
    importing torch alone takes seconds on a busy two-core machine."""
    code = (
        "import sys, labelloop.cli; "
        "print(sorted(m for m in ('torch', 'pandas', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
