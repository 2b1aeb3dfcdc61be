"""Benchmark: how long `labelloop --help` and a command's --help take, against the bare
interpreter start and `import typer` (the floor any typer CLI pays), median of N runs.

    .venv/bin/python bench/cli_startup.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import time

from _common import append_section, machine

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import typer'": [sys.executable, "-c", "import typer"],
    "labelloop --help": [sys.executable, "-m", "labelloop", "--help"],
    "labelloop serve --help": [sys.executable, "-m", "labelloop", "serve", "--help"],
    "labelloop preannotate --help": [sys.executable, "-m", "labelloop", "preannotate", "--help"],
}


def wall(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = {name: wall(argv, args.runs) for name, argv in COMMANDS.items()}
    floor = rows["python -c 'import typer'"]
    lines = [
        f"\n## CLI start-up, {dt.date.today()}\n\n"
        f"Machine: {machine()}. Median wall time of {args.runs} runs of each command, as a new "
        "process. Target: help and commands that do not need torch start in under 1 s.\n\n"
        "| command | wall time | vs `import typer` |\n|---|---|---|\n"
    ]
    for name, seconds in rows.items():
        lines.append(f"| `{name}` | {seconds:.2f} s | {seconds / floor:.1f}x |\n")
    text = "".join(lines)
    print(text)
    if not args.no_record:
        append_section(text)


if __name__ == "__main__":
    main()
