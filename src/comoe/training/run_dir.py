"""A run directory: the names of what it holds, where a run goes, and what a resumed run may change.

`comoe train` writes a run directory; `comoe eval`, `comoe analyze`, `comoe compare` and ``--resume`` read
it. Every module names its files through the constants here::

    RUN_DIR/run_config.yaml     RUN_CONFIG_NAME: the RunConfig as given (enough to reproduce or evaluate it)
    RUN_DIR/adapter/            ADAPTER_DIR: adapter_config.json + adapter_model.safetensors (multi-task)
    RUN_DIR/adapters/TASK/adapter/   ADAPTERS_DIR: one adapter per task (single-task setting)
    RUN_DIR/checkpoints/        CHECKPOINTS_DIR: step-NNNNNN/ (per task directory if single-task)
    RUN_DIR/tracking/           TRACKING_DIR: the tracker's files (--report-to tensorboard: event files)
    RUN_DIR/train_log.jsonl     TRAIN_LOG_NAME: one line per optimiser step (per task directory if single)
    RUN_DIR/base_metrics.json   BASE_SCORES_NAME: the zero-shot base's scores, kept for a resume
    RUN_DIR/metrics.json        RESULTS_NAME: the run's results (accuracy of the adapter, the base and the
                                majority class; training record); written last, so a run with it is finished
    RUN_DIR/eval_PROTOCOL.json  eval_scores_name(protocol): what `comoe eval` scored
    RUN_DIR/analysis.json       ANALYSIS_NAME: `comoe compare`'s specialisation numbers of the run
    RUN_DIR/grid_cell.yaml      GRID_CELL_CONFIG_NAME: the settings `comoe compare` started the run with
    RUN_DIR/train.log           TRAIN_OUTPUT_NAME: the run's output under `comoe compare --jobs N`
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from comoe.training.run_config import RunConfig
from comoe.training.run_settings import flat_fields, layered_fields, resolve_run
from comoe.utils.files import write_text_atomic

RUN_CONFIG_NAME = "run_config.yaml"
ADAPTER_DIR = "adapter"
ADAPTERS_DIR = "adapters"
CHECKPOINTS_DIR = "checkpoints"
TRAIN_LOG_NAME = "train_log.jsonl"
TRACKING_DIR = "tracking"
BASE_SCORES_NAME = "base_metrics.json"
RESULTS_NAME = "metrics.json"
ANALYSIS_NAME = "analysis.json"
GRID_CELL_CONFIG_NAME = "grid_cell.yaml"
TRAIN_OUTPUT_NAME = "train.log"

# Fields that only change what happens after training (evaluation, checkpoint cadence): a resumed run may
# change them. Every other field shapes the adapter being trained, and a resumed run keeps it.
RESUMABLE_FIELDS = (
    "save_steps",
    "protocol",
    "test_per_task",
    "eval_batch_size",
    "eval_base",
    "gradient_checkpointing",
    "compile",
    "report_to",
    "routing_health_steps",
    "eval_steps",
    "cpu_threads",
)  # the last six change memory, speed or what is logged, not the maths


def eval_scores_name(protocol: str) -> str:
    """The file `comoe eval` writes its scores under the ``protocol`` to."""
    return f"eval_{protocol}.json"


def adapter_dirs(run_dir: Path, setting: str, tasks: Iterable[str]) -> list[Path]:
    """Where a finished run's adapters are: one for a multi-task run, one per task for a single-task run."""
    if setting == "multi":
        return [run_dir / ADAPTER_DIR]
    return [run_dir / ADAPTERS_DIR / task / ADAPTER_DIR for task in tasks]


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run that `comoe train` started."""
    return (path / RUN_CONFIG_NAME).is_file()


def is_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` finished (its results are written last)."""
    return (run_dir / RESULTS_NAME).is_file()


def saved_run(run_dir: Path, **overrides: Any) -> RunConfig:
    """The run in ``run_dir``, from its ``run_config.yaml``; ``overrides`` (fields) win over it."""
    return RunConfig.from_yaml(run_dir / RUN_CONFIG_NAME, **overrides)


def default_run_dir(run: RunConfig) -> Path:
    """``runs/<time>-<method>-<setting>-seed<seed>``: where a run without ``output_dir`` goes."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{run.method}-{run.setting}-seed{run.seed}"


def output_dir(run: RunConfig, run_dir: str | os.PathLike | None = None) -> Path:
    """The directory a run writes: ``run_dir`` if given, else the run's ``output_dir``, else the default."""
    return Path(run_dir or run.output_dir or default_run_dir(run))


def check_output_dir(run_dir: Path, resume: bool) -> None:
    """Refuse, before anything is loaded or written, a run directory that cannot be (or must not be) used."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(
            f"output directory {run_dir} is an existing file; give a directory path (--output-dir)"
        )
    if not resume and is_run_dir(run_dir):
        raise ValueError(
            f"{run_dir} already holds a run; continue it with `comoe train --resume {run_dir}` "
            "or choose another --output-dir"
        )
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"output directory {run_dir}: {existing} is a file, not a directory; give another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"output directory {run_dir}: {existing} is not writable; give a path you can write to"
        )


def resumed_run(run_dir: Path, requested: Mapping[str, Any], report: bool = True) -> RunConfig:
    """The configuration of the run in ``run_dir``, with the ``requested`` values that a resume may change.

    A requested value of any other field that differs from the run's is refused, naming each field: the
    run's adapter was partly trained with the old value, so silently keeping or applying it would both be
    wrong. Nothing is written here.
    """
    if not is_run_dir(run_dir):
        raise ValueError(
            f"--resume {run_dir}: no {RUN_CONFIG_NAME} there; give a directory written by `comoe train`"
        )
    saved = saved_run(run_dir)
    elsewhere = requested.get("output_dir")
    if elsewhere is not None and Path(elsewhere).resolve() != run_dir.resolve():
        raise ValueError(
            f"--resume {run_dir} continues the run in its own directory; drop --output-dir {elsewhere}"
        )
    wanted = resolve_run(
        (str(run_dir / RUN_CONFIG_NAME), saved.to_dict()),
        ("the resume flags", requested),
        ("the run directory", {"output_dir": str(run_dir)}),
        source="the resume flags",
    )
    given = layered_fields(("the resume flags", requested))
    before, after = flat_fields(saved), flat_fields(wanted)
    changed = [
        name
        for name in before
        if _requested(name, given) and name != "output_dir" and after[name] != before[name]
    ]
    refused = [name for name in changed if name not in RESUMABLE_FIELDS]
    if refused:
        listing = "; ".join(f"{name}: {before[name]!r} -> {after[name]!r}" for name in refused)
        raise ValueError(
            f"--resume {run_dir}: the run was started with other settings ({listing}). A resumed run keeps the "
            f"settings its adapter was trained with; drop those flags, or start a new run without --resume. "
            f"On resume only {', '.join(RESUMABLE_FIELDS)} may change."
        )
    for name in changed if report else []:
        print(f"resume: {name} = {after[name]!r} (was {before[name]!r})")
    return wanted


def _requested(flat_name: str, requested: Mapping[str, Any]) -> bool:
    """Whether a resume asked for field ``flat_name`` (``adapter.NAME`` for an adapter field)."""
    if flat_name.startswith("adapter."):
        return flat_name.removeprefix("adapter.") in requested.get("adapter", {})
    return flat_name in requested


# train_log.jsonl keys of earlier versions -> their names now; read_train_log renames them
OLD_LOG_KEYS = {"con": "contrastive", "bal": "balance"}


def read_train_log(path: Path) -> list[dict]:
    """The rows of a ``train_log.jsonl``, with the loss parts under their current names (``OLD_LOG_KEYS``);
    a last line cut short by a killed process is skipped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(
                    f"{path}:{number}: not a JSON row; the log is damaged (delete the line)"
                ) from None
            continue
        rows.append({OLD_LOG_KEYS.get(key, key): value for key, value in row.items()})
    return rows


def truncate_train_log(path: Path, step: int) -> None:
    """Keep only the rows of steps ``<= step`` (all of them gone for a fresh start), atomically."""
    if not path.is_file():
        return
    kept = [row for row in read_train_log(path) if row["step"] <= step] if step > 0 else []
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
