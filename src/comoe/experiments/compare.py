"""`comoe compare` as a function: run a grid, summarise it, write ``summary.json`` and ``summary.md``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from comoe.experiments.grid import PRESETS, Grid, preset_grid, run_grid
from comoe.experiments.summary import summarise_grid, to_markdown
from comoe.utils.files import write_json_atomic, write_text_atomic
from comoe.utils.machine import machine_summary
from comoe.utils.validation import check_field_types, doc

COMMAND_NAME = "command.txt"


@dataclass
class CompareOptions:
    """How `comoe compare` runs a grid; each field is a flag, and the grid-shaped ones override the grid file."""

    preset: str | None = field(
        default=None,
        metadata=doc(
            "A ready-made grid (without --config); none = default. table1/table2/table3 reproduce the "
            "structure of the paper's Tables 1 (methods × MT/ST), 2 (LoRA vs DoRA experts, ST) and 3 (math).",
            sorted(PRESETS),
        ),
    )
    seeds: list[int] | None = field(default=None, metadata=doc("Seeds, e.g. 0,1,2; none = the grid's."))
    settings: list[str] | None = field(
        default=None, metadata=doc("multi, single or multi,single; none = the grid's.")
    )
    reference: list[str] | None = field(
        default=None,
        metadata=doc(
            "Variant(s) the paired differences are taken against, e.g. moe-lora,lora; none = the grid's."
        ),
    )
    jobs: int = field(
        default=1,
        metadata=doc(
            "Runs trained at once, each with its output in RUN_DIR/train.log (and torch threads for the cores the others leave free)."
        ),
    )
    summary_only: bool = field(default=False, metadata=doc("Summarise the finished runs; start none."))
    analysis: bool = field(
        default=True,
        metadata=doc("Specialisation numbers per routed run (a `comoe analyze` pass, ~40 s each on CPU)."),
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(sorted(PRESETS))}, got {self.preset!r}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")

    def apply(self, grid: Grid) -> Grid:
        """A copy of ``grid`` with the seeds, settings and reference these options give."""
        given = {name: getattr(self, name) for name in ("seeds", "settings", "reference")}
        return replace(grid, **{name: value for name, value in given.items() if value})

    def preset_grid(self) -> Grid:
        return self.apply(preset_grid(self.preset or "default"))


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
    summary = summarise_grid(finished, grid.reference)
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
