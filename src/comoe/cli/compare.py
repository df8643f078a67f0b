"""`comoe compare`: the grid file of ``--config``, the compare options and every run's flags."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from comoe.cli.flags import field_flags, given
from comoe.cli.train import given_fields, run_config_flags
from comoe.experiments.compare import CompareOptions, compare
from comoe.experiments.grid import load_grid
from comoe.training.run_settings import layered_fields, nest_fields, parse_field_value

GRID_OWNED = ("output_dir", "seed", "setting")  # set per cell by the grid, not a flag for every run


def compare_flags() -> list[argparse.ArgumentParser]:
    """The options of the grid itself, then a flag per run field (``--max-steps 10`` sets it for every run)."""
    return [
        field_flags(CompareOptions, group="grid"),
        *run_config_flags(exclude=GRID_OWNED, groups=("every run (the grid's base)", "every run's adapter")),
    ]


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "--grid",
        dest="config",
        metavar="GRID_YAML",
        help="YAML of the grid: variants (name → RunConfig fields) or preset, seeds, settings, base, reference",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a run field for every run, as its flag would (repeatable), e.g. --set train_per_task=64",
    )
    parser.add_argument(
        "--output-dir",
        "--out",
        dest="out",
        default="results/compare",
        help="grid directory (runs/, summary.json, summary.md). Default: results/compare.",
    )


def _refuse_hidden_overrides(overrides: dict, variants: dict[str, dict]) -> None:
    """A run flag sets the grid's base, under each variant's own fields: refuse one that a variant sets, which
    would silently not apply there (``--preset lambda --contrastive-weight 0.5``)."""
    given = {name for name in overrides if name != "adapter"} | {
        f"adapter.{name}" for name in overrides.get("adapter", {})
    }
    for variant, fields_ in variants.items():
        nested = nest_fields(fields_, f"variant {variant}")
        sets = {name for name in nested if name != "adapter"} | {
            f"adapter.{name}" for name in nested.get("adapter", {})
        }
        hidden = sorted(given & sets)
        if hidden:
            flags = ", ".join("--" + name.removeprefix("adapter.").replace("_", "-") for name in hidden)
            raise ValueError(
                f"{flags}: variant {variant!r} sets {', '.join(hidden)} itself, so the flag would not apply to "
                "it; drop the flag, or write a grid file (--config) whose variants set it"
            )


def run_compare(args: argparse.Namespace) -> int:
    try:
        options = CompareOptions(**given(args, [f.name for f in fields(CompareOptions)]))
    except ValueError as err:
        raise ValueError(f"command line: {err}") from None
    if args.config and options.preset:
        raise ValueError("give --config (a grid file) or --preset, not both")
    grid = options.apply(load_grid(args.config)) if args.config else options.preset_grid()
    base = {}
    for item in args.set:
        name, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"--set {item!r}: write FIELD=VALUE, e.g. --set train_per_task=64")
        base[name] = parse_field_value(name, value)
    overrides = layered_fields(("--set", base), ("command line", given_fields(args)))
    _refuse_hidden_overrides(overrides, grid.variants)
    grid = replace(grid, base=layered_fields(("the grid's base", grid.base), ("command line", overrides)))
    compare(
        grid,
        Path(args.out),
        getattr(args, "command_line", "comoe compare"),
        summary_only=options.summary_only,
        analyse=options.analysis,
        jobs=options.jobs,
    )
    return 0
