"""`comoe compare` as a function: run a grid, summarise it, write ``summary.json`` and ``summary.md``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from comoe.experiments.grid import Grid, run_grid
from comoe.experiments.summary import summarise, to_markdown
from comoe.utils.files import write_json_atomic, write_text_atomic
from comoe.utils.machine import machine_summary

COMMAND_NAME = "command.txt"


def compare(
    grid: Grid,
    out: Path,
    command: str = "comoe compare",
    summary_only: bool = False,
    analyse: bool = True,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run the grid's missing cells (none with ``summary_only``), then write and print its summary.

    ``command`` is the command line that runs this grid, kept in ``OUT/command.txt`` and the summary.
    """
    grid.runs()  # validate every cell before the first run starts
    started = time.time()
    command = recorded_command(out, command, summary_only)
    finished = run_grid(grid, out, dry_run=summary_only, analyse=analyse, jobs=jobs)
    summary = summarise(finished, grid.reference)
    summary["grid_seconds"] = time.time() - started
    write_json_atomic(out / "summary.json", summary)
    markdown = to_markdown(summary, command, machine_summary())
    write_text_atomic(out / "summary.md", markdown)
    print(markdown)
    return summary


def recorded_command(out: Path, command: str, summary_only: bool) -> str:
    """``command``, kept in ``OUT/command.txt``; with ``summary_only`` the kept one is read back instead."""
    path = out / COMMAND_NAME
    if summary_only and path.is_file():
        return path.read_text().strip()
    if not summary_only:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, command + "\n")
    return command
