"""`comoe train` and `comoe eval`: one flag per RunConfig field (the adapter's among them), over ``--config``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from comoe.cli.flags import KEEP, field_flags, given
from comoe.config import CoMoEConfig
from comoe.training.methods import DEFAULT_METHOD
from comoe.training.run_adapter import ADAPTER_FIELDS, method_overrides
from comoe.training.run_config import RunConfig
from comoe.training.run_settings import layered_fields, nest_fields, parse_field_value, resolve_run
from comoe.utils.yaml_files import load_yaml_mapping

RUN_FIELDS = tuple(name for name in RunConfig.__dataclass_fields__ if name != "adapter")
EVAL_FIELDS = (
    "model",
    "tasks",
    "test_per_task",
    "protocol",
    "eval_batch_size",
)  # what `comoe eval` may change


def run_train(args: argparse.Namespace) -> int:
    from comoe.training.job import resumed_run, run_job
    from comoe.training.tracking import end_processes

    try:
        if args.resume:
            run_dir = Path(args.resume)
            run_job(resumed_run(run_dir, requested_fields(args)), run_dir, resume=True)
            return 0
        run = run_config_from_args(args)
        check_method_overrides(args, run.method)
        run_job(run)
        return 0
    finally:
        end_processes()


def check_method_overrides(args: argparse.Namespace, method: str) -> None:
    """Refuse an adapter flag that ``method`` replaces, which would silently not apply (``--method moe-lora
    --contrastive-weight 0.5`` trains with 0). A ``--config`` file keeps its settings as given, so that one
    file trains every method (a run's ``run_config.yaml``, `comoe compare`'s cells): a value of it that the
    method replaces, other than the field's default, is named in a warning."""
    flags = given_fields(args).get("adapter", {})
    for name, (value, fixed) in method_overrides(method, flags).items():
        raise ValueError(
            f"{_flag(name)} {value}: method {method!r} sets {name} itself (to {fixed!r}), so the flag would "
            f"not apply to it; drop the flag, or choose a method that uses it (--method {DEFAULT_METHOD})"
        )
    data = load_yaml_mapping(args.config, "RunConfig fields") if args.config else {}
    if data:
        from_file = nest_fields(data, str(args.config)).get("adapter", {})
        for name, (value, fixed) in method_overrides(method, from_file).items():
            if value != CoMoEConfig.__dataclass_fields__[name].default:
                print(
                    f"warning: {args.config} sets {name}: {value!r}, which method {method!r} replaces with "
                    f"{fixed!r}; the run trains with {fixed!r} (run_config.yaml keeps {value!r} for other methods)",
                    file=sys.stderr,
                )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run_eval(args: argparse.Namespace) -> int:
    from comoe.training.job import eval_job

    if args.run_dir is None and not args.base_only:
        raise ValueError(
            "give a RUN_DIR (a directory written by `comoe train`), or --base-only to score the base model"
        )
    overrides = given_fields(args)
    resolve_run(("command line", overrides))  # the flags' own errors name the command line
    eval_job(Path(args.run_dir) if args.run_dir else None, base_only=args.base_only, overrides=overrides)
    return 0


def run_config_flags(
    only: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    groups: tuple[str, str] = ("run", "adapter (CoMoEConfig; `adapter:` in YAML)"),
) -> list[argparse.ArgumentParser]:
    """Parent parsers holding one flag per RunConfig field and per adapter field (``--num-experts`` sets
    ``adapter.num_experts``), or per field in ``only``; see `comoe.cli.flags.field_flags`."""
    default = None if only is None else KEEP
    run_names = [name for name in RUN_FIELDS if (only is None or name in only) and name not in exclude]
    parents = [
        field_flags(RunConfig, only=run_names, group=groups[0], parse=parse_field_value, default=default)
    ]
    adapter_names = [name for name in ADAPTER_FIELDS if only is None or name in only]
    if adapter_names:
        parents.append(
            field_flags(
                CoMoEConfig,
                only=adapter_names,
                group=groups[1],
                parse=parse_field_value,
                default=default,
            )
        )
    return parents


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The fields whose flags were given, ``none`` values included, the adapter's under ``"adapter"``."""
    return nest_fields(given(args, (*RUN_FIELDS, *ADAPTER_FIELDS)), "command line")


def requested_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The fields that the --config file and the flags set (the flags win), the adapter's nested."""
    from_file = load_yaml_mapping(args.config, "RunConfig fields") if args.config else {}
    return layered_fields((str(args.config), from_file), ("command line", given_fields(args)))


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the YAML file of ``--config`` if given, then every flag that was given (``none`` included)."""
    if getattr(args, "config", None):
        from_file = load_yaml_mapping(args.config, "RunConfig fields")
        return resolve_run(
            (str(args.config), from_file), ("command line", given_fields(args)), source=str(args.config)
        )
    return resolve_run(("command line", given_fields(args)))
