"""`comoe train` and `comoe eval`: one flag per RunConfig field, over the YAML file of ``--config``."""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from comoe.training.run_config import RunConfig, load_yaml, parse_field_value
from comoe.utils.validation import did_you_mean


def run_train(args: argparse.Namespace) -> int:
    from comoe.training.job import resumed_run, run_job

    if args.resume:
        run_dir = Path(args.resume)
        run_job(resumed_run(run_dir, requested_fields(args)), run_dir, resume=True)
        return 0
    run_job(run_config_from_args(args))
    return 0


def requested_fields(args: argparse.Namespace) -> dict:
    """The RunConfig fields that the --config file and the flags set (the flags win)."""
    requested = {}
    if args.config:
        data = load_yaml(args.config) or {}
        if not isinstance(data, dict):
            raise ValueError(
                f"{args.config}: expected a mapping of RunConfig fields, got {type(data).__name__}"
            )
        known = {f.name for f in fields(RunConfig)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ValueError(
                f"{args.config}: unknown fields {unknown}{did_you_mean(unknown, known)}; "
                f"known fields: {sorted(known)}"
            )
        requested.update(data)
    requested.update(given_fields(args))  # a flag given as `none` counts too
    return requested


def run_eval(args: argparse.Namespace) -> int:
    from comoe.training.job import eval_job

    if args.run_dir is None and not args.base_only:
        raise ValueError(
            "give a RUN_DIR (a directory written by `comoe train`), or --base-only to score the base model"
        )
    overrides = {
        k: getattr(args, k)
        for k in ("tasks", "test_per_task", "protocol", "model", "eval_batch_size")
        if getattr(args, k) is not None
    }
    eval_job(Path(args.run_dir) if args.run_dir else None, base_only=args.base_only, overrides=overrides)
    return 0


def add_run_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per RunConfig field; unset flags leave YAML/default values alone.

    A flag that is not given leaves no attribute on the parsed namespace (``argparse.SUPPRESS``), so that
    ``--max-steps none`` (None) is told apart from no ``--max-steps`` at all.
    """
    defaults = asdict(RunConfig())
    for f in fields(RunConfig):
        default = defaults[f.name]
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar="VALUE",
            type=lambda text, name=f.name: _flag_value(name, text),
            help=f"default: {shown}",
        )


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the YAML file of ``--config`` if given, then every flag that was given (``none`` included)."""
    overrides = given_fields(args)
    if getattr(args, "config", None):
        return RunConfig.from_yaml(args.config, **overrides)
    return RunConfig.from_dict(overrides, source="command line")


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields whose flags were given (see `add_run_config_flags`), ``none`` values included."""
    return {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}


def _flag_value(name: str, text: str) -> Any:
    try:
        return parse_field_value(name, text)
    except ValueError as err:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(err)) from err
