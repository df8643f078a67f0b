"""`comoe compare`: a resumable grid of runs (variants × seeds × settings) and its statistics.

Each run is an ordinary `comoe train` run directory under ``OUT/runs/`` and is executed in its own
process, so a killed grid resumes where it stopped: finished runs (with ``metrics.json``) are skipped,
started ones continue from their last checkpoint. The summary gives per-task accuracy as mean ± std
over seeds and the paired difference of each variant against a reference variant, with a bootstrap
confidence interval over test examples and seeds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from comoe.training.methods import method_variant
from comoe.training.run_config import RunConfig
from comoe.training.run_dir import (
    ANALYSIS_NAME,
    GRID_CELL_CONFIG_NAME,
    RESULTS_NAME,
    TRAIN_OUTPUT_NAME,
    is_finished,
    is_run_dir,
)
from comoe.training.run_settings import resolve_run
from comoe.utils.files import write_json_atomic
from comoe.utils.validation import unknown_fields
from comoe.utils.yaml_files import load_yaml_mapping, write_yaml

_v = method_variant  # a variant: a method (an entry of comoe.training.methods.METHODS) and adapter settings
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {"lora": _v("lora"), "moe-lora": _v("moe-lora"), "comoe": _v("comoe")},
    "lambda": {f"lambda={w:g}": _v("comoe", contrastive_weight=w) for w in (0.0, 0.001, 0.01, 0.1, 1.0)},
    "tau": {f"tau={t:g}": _v("comoe", temperature=t) for t in (0.05, 0.1, 0.2, 0.5, 1.0)},
    "experts": {f"experts={n}": _v("comoe", num_experts=n) for n in (4, 5, 6, 7, 8)},
    "layers": {f"layers={g}": _v("comoe", layers=g) for g in ("low", "middle", "high", "low+high")},
    "anchor": {f"anchor={a}": _v("comoe", anchor=a) for a in ("random", "all")},
    "negatives": {"negatives=all": _v("comoe"), "negatives=1": _v("comoe", num_negatives=1)},
    # the structure of the paper's tables, on whatever --model and --tasks are given
    "table1": {  # its Table 1: methods, multi-task and single-task
        "lora": _v("lora"),
        "dora": _v("lora", use_dora=True),
        "moe-lora": _v("moe-lora"),
        "mixlora": _v("mixlora"),  # whole-FFN experts, MixLoRA's defaults unless the base sets them
        "comoe": _v("comoe"),
        "comoe-dora": _v("comoe", use_dora=True),
    },
    "table2": {  # its Table 2: CoMoE with LoRA and with DoRA experts, single-task, beside their PEFT twins
        "lora": _v("lora"),
        "dora": _v("lora", use_dora=True),
        "comoe-lora": _v("comoe"),
        "comoe-dora": _v("comoe", use_dora=True),
    },
    "table3": {"lora": _v("lora"), "moe-lora": _v("moe-lora"), "comoe": _v("comoe")},
}
# what a table preset sets besides its variants (a grid file or the flags still override them)
PRESET_SETTINGS: dict[str, list[str]] = {"table1": ["multi", "single"], "table2": ["single"]}
PRESET_BASE: dict[str, dict[str, Any]] = {
    "table3": {"tasks": "suite:math"}
}  # the paper's math setting, offline
# the variant each preset's paired differences are taken against: λ = 0, or the current default
REFERENCE: dict[str, str | list[str]] = {
    "default": ["moe-lora", "lora"],
    "lambda": "lambda=0",
    "tau": "tau=0.1",
    "experts": "experts=4",
    "anchor": "anchor=random",
    "negatives": "negatives=all",
    "table1": ["moe-lora", "lora"],
    "table2": ["comoe-lora", "lora"],
    "table3": ["moe-lora", "lora"],
}


@dataclass
class Grid:
    """What a grid file holds (``preset`` aside): variants (name → RunConfig fields), seeds, settings, base
    (RunConfig fields shared by every run), reference."""

    variants: dict[str, dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    settings: list[str] = field(default_factory=lambda: ["multi"])
    base: dict[str, Any] = field(
        default_factory=dict
    )  # RunConfig fields shared by every run (adapter nested)
    reference: str | list[str] | None = None  # the variant(s) paired differences are taken against

    def runs(self) -> list[tuple[str, str, int, RunConfig]]:
        """(variant, setting, seed, config) for every cell; configs are validated here, before any run.

        Seed-major order: a grid stopped part-way has every variant for its first seeds, so its paired
        differences can already be read.
        """
        cells = []
        for seed in self.seeds:
            for name, overrides in self.variants.items():
                for setting in self.settings:
                    source = f"variant {name}"
                    config = resolve_run(
                        ("base", self.base), (source, overrides), (source, {"setting": setting, "seed": seed})
                    )
                    cells.append((name, setting, seed, config))
        return cells


GRID_KEYS = {f.name for f in fields(Grid)}


def load_grid(path: str | Path) -> Grid:
    data = load_yaml_mapping(path, "grid keys (variants, seeds, settings, base, reference)")
    if "preset" in data:
        preset = data.pop("preset")
        if preset not in PRESETS:
            raise ValueError(f"{path}: unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        defaults = preset_grid(preset)
        data.setdefault("variants", defaults.variants)
        data.setdefault("reference", defaults.reference)
        data.setdefault("settings", defaults.settings)
        data["base"] = {**defaults.base, **(data.get("base") or {})}
    unknown = set(data) - GRID_KEYS
    if unknown:
        raise ValueError(f"{path}: {unknown_fields(unknown, [*GRID_KEYS, 'preset'], kind='grid')}")
    return Grid(**data)


def preset_grid(name: str) -> Grid:
    """The grid of preset ``name``: its variants, reference, and for the table presets settings and base."""
    return Grid(
        variants=PRESETS[name],
        reference=REFERENCE.get(name),
        settings=list(PRESET_SETTINGS.get(name, ["multi"])),
        base=dict(PRESET_BASE.get(name, {})),
    )


def run_grid(
    grid: Grid, out: Path, dry_run: bool = False, analyse: bool = True, jobs: int = 1
) -> list[dict[str, Any]]:
    """Run every missing cell (each in a subprocess) and return the finished runs' metrics.

    With ``jobs`` > 1, that many cells train at once, each with its output in ``RUN_DIR/train.log``; each
    run's torch threads follow the cores the others leave free, as every `comoe train` does
    (``RunConfig.cpu_threads``).
    With ``analyse``, each finished run with routers also gets its specialisation numbers (see
    ``specialisation``) under the key ``"specialisation"``.
    """
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "grid.yaml", asdict(grid))
    cells = grid.runs()
    todo = []
    for i, (name, setting, seed, config) in enumerate(cells, 1):
        run_dir = cell_dir(out, name, setting, seed)
        label = f"[{i}/{len(cells)}] {name} {setting} seed {seed}"
        if is_finished(run_dir):
            print(f"{label}: done, skipped", flush=True)
        elif not dry_run:
            todo.append((label, config, run_dir))
    own_log = jobs > 1
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {
            pool.submit(_start_cell, label, config, run_dir, own_log): label
            for label, config, run_dir in todo
        }
        for future in as_completed(futures):
            try:
                future.result()
            except subprocess.CalledProcessError as err:
                failed.append(f"{futures[future]} (exit status {err.returncode})")
    if failed:
        raise ValueError(
            f"{len(failed)} run(s) failed: {'; '.join(sorted(failed))}; the finished runs are kept, and "
            "running the same command again resumes the others"
        )
    finished = []
    for name, setting, seed, _ in cells:
        run_dir = cell_dir(out, name, setting, seed)
        if is_finished(run_dir):
            finished.append(
                {
                    "variant": name,
                    "setting": setting,
                    "seed": seed,
                    "run_dir": str(run_dir),
                    **json.loads((run_dir / RESULTS_NAME).read_text()),
                    "specialisation": specialisation(run_dir) if analyse else None,
                }
            )
    return finished


def cell_dir(out: Path, variant: str, setting: str, seed: int) -> Path:
    return out / "runs" / f"{variant}-{setting}-seed{seed}"


def _start_cell(label: str, config: RunConfig, run_dir: Path, own_log: bool) -> None:
    started = is_run_dir(run_dir)
    where = f" (output in {run_dir / TRAIN_OUTPUT_NAME})" if own_log else ""
    print(f"{label}: {'resuming' if started else 'running'} in {run_dir}{where}", flush=True)
    _train_in_subprocess(config, run_dir, resume=started, own_log=own_log)
    if own_log:
        print(f"{label}: finished", flush=True)


def specialisation(run_dir: Path) -> dict[str, float | None] | None:
    """The run's `comoe analyze` summary (means over its adapted modules), or None for runs without routers.

    Computed once (routing recorded over the run's test sets) and kept in ``RUN_DIR/analysis.json``.
    """
    from comoe.analysis.options import AnalyzeOptions, analysis_threads
    from comoe.analysis.run_metrics import analyse_run, skip_reason

    path = run_dir / ANALYSIS_NAME
    if path.is_file():
        return json.loads(path.read_text())["summary"]
    if skip_reason(run_dir) is not None:
        return None
    options = AnalyzeOptions(progress=False, tsne=False)
    with analysis_threads(options.threads):
        metrics, _ = analyse_run(run_dir, options)
    kept = {key: metrics[key] for key in ("label", "summary", "layers", "seconds")}
    write_json_atomic(path, {**kept, "options": asdict(options)})
    return metrics["summary"]


def _train_in_subprocess(config: RunConfig, run_dir: Path, resume: bool, own_log: bool = False) -> None:
    """`comoe train` for one cell; with ``own_log``, its output in train.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        cmd = [sys.executable, "-m", "comoe", "train", "--resume", str(run_dir)]
    else:
        cell = run_dir / GRID_CELL_CONFIG_NAME
        replace(config, output_dir=str(run_dir)).to_yaml(cell)  # a copy: the grid's cell is left as it is
        cmd = [sys.executable, "-m", "comoe", "train", "--config", str(cell)]
    if not own_log:
        subprocess.run(cmd, check=True)
        return
    with open(run_dir / TRAIN_OUTPUT_NAME, "a", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
