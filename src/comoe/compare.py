"""`comoe compare`: a resumable grid of runs (variants × seeds × settings) and its statistics.

Each run is an ordinary `comoe train` run directory under ``OUT/runs/`` and is executed in its own
process, so a killed grid resumes where it stopped: finished runs (with ``metrics.json``) are skipped,
started ones continue from their last checkpoint. The summary gives per-task accuracy as mean ± std
over seeds and the paired difference of each variant against a reference variant, with a bootstrap
confidence interval over test examples and seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from comoe.files import write_json_atomic, write_text_atomic
from comoe.runconfig import RunConfig, load_yaml

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {"lora": {"method": "lora"}, "moe-lora": {"method": "moe-lora"}, "comoe": {"method": "comoe"}},
    "lambda": {f"lambda={w:g}": {"method": "comoe", "contrastive_weight": w} for w in (0.0, 0.001, 0.01, 0.1, 1.0)},
    "tau": {f"tau={t:g}": {"method": "comoe", "temperature": t} for t in (0.05, 0.1, 0.2, 0.5, 1.0)},
    "experts": {f"experts={n}": {"method": "comoe", "num_experts": n} for n in (4, 5, 6, 7, 8)},
    "layers": {f"layers={g}": {"method": "comoe", "layers": g} for g in ("low", "middle", "high", "low+high")},
    "anchor": {f"anchor={a}": {"method": "comoe", "anchor": a} for a in ("random", "all")},
    "negatives": {"negatives=all": {"method": "comoe"}, "negatives=1": {"method": "comoe", "num_negatives": 1}},
}
# the variant each preset's paired differences are taken against: λ = 0, or the current default
REFERENCE: dict[str, str | list[str]] = {
    "default": ["moe-lora", "lora"], "lambda": "lambda=0", "tau": "tau=0.1", "experts": "experts=4",
    "anchor": "anchor=random", "negatives": "negatives=all"}
# `comoe analyze` summary numbers (means over adapted modules) reported per variant
SPECIALISATION = {"nmi": "NMI", "nmi_sets": "NMI of top-k sets", "cosine": "expert cosine", "cka": "CKA",
                  "contrastive_loss": "L_con", "infonce_bound": "log N − L_con"}
ANALYSIS_NAME = "analysis.json"
MAJORITY = "majority class"
COMMAND_NAME = "command.txt"


@dataclass
class Grid:
    variants: dict[str, dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    settings: list[str] = field(default_factory=lambda: ["multi"])
    base: dict[str, Any] = field(default_factory=dict)  # RunConfig fields shared by every run
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
                    config = RunConfig.from_dict({**self.base, **overrides, "setting": setting, "seed": seed},
                                                 source=f"variant {name}")
                    cells.append((name, setting, seed, config))
        return cells


def load_grid(path: str | Path) -> Grid:
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping (variants, seeds, settings, base, reference)")
    if "preset" in data:
        preset = data.pop("preset")
        data.setdefault("variants", PRESETS[preset])
        data.setdefault("reference", REFERENCE.get(preset))
    unknown = sorted(set(data) - {"variants", "seeds", "settings", "base", "reference"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected variants, seeds, settings, base, reference, preset")
    return Grid(**data)


def run_grid(grid: Grid, out: Path, dry_run: bool = False, analyse: bool = True,
             jobs: int = 1) -> list[dict[str, Any]]:
    """Run every missing cell (each in a subprocess) and return the finished runs' metrics.

    With ``jobs`` > 1, that many cells train at once, each with ``cpu_count // jobs`` torch threads and its
    output in ``RUN_DIR/train.log`` (threads that outnumber the free cores spin and slow every run down).
    With ``analyse``, each finished run with routers also gets its specialisation numbers (see
    ``specialisation``) under the key ``"specialisation"``.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(yaml.safe_dump(asdict(grid), sort_keys=False))
    cells = grid.runs()
    todo = []
    for i, (name, setting, seed, config) in enumerate(cells, 1):
        run_dir = cell_dir(out, name, setting, seed)
        label = f"[{i}/{len(cells)}] {name} {setting} seed {seed}"
        if (run_dir / "metrics.json").is_file():
            print(f"{label}: done, skipped", flush=True)
        elif not dry_run:
            todo.append((label, config, run_dir))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(_start_cell, label, config, run_dir, threads): label for label, config, run_dir in todo}
        for future in as_completed(futures):
            try:
                future.result()
            except subprocess.CalledProcessError as err:
                failed.append(f"{futures[future]} (exit status {err.returncode})")
    if failed:
        raise ValueError(f"{len(failed)} run(s) failed: {'; '.join(sorted(failed))}; the finished runs are kept, and "
                         "running the same command again resumes the others")
    finished = []
    for name, setting, seed, _ in cells:
        run_dir = cell_dir(out, name, setting, seed)
        if (run_dir / "metrics.json").is_file():
            finished.append({"variant": name, "setting": setting, "seed": seed, "run_dir": str(run_dir),
                             **json.loads((run_dir / "metrics.json").read_text()),
                             "specialisation": specialisation(run_dir) if analyse else None})
    return finished


def cell_dir(out: Path, variant: str, setting: str, seed: int) -> Path:
    return out / "runs" / f"{variant}-{setting}-seed{seed}"


def _start_cell(label: str, config: RunConfig, run_dir: Path, threads: int | None) -> None:
    started = (run_dir / "run_config.yaml").is_file()
    where = f" (output in {run_dir / 'train.log'})" if threads else ""
    print(f"{label}: {'resuming' if started else 'running'} in {run_dir}{where}", flush=True)
    _train_in_subprocess(config, run_dir, resume=started, threads=threads)
    if threads:
        print(f"{label}: finished", flush=True)


def specialisation(run_dir: Path) -> dict[str, float | None] | None:
    """The run's `comoe analyze` summary (means over its adapted modules), or None for runs without routers.

    Computed once (routing recorded over the run's test sets) and kept in ``RUN_DIR/analysis.json``.
    """
    from comoe.analysis import AnalyzeOptions, analyse_run, analysis_threads, skip_reason

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


def _train_in_subprocess(config: RunConfig, run_dir: Path, resume: bool, threads: int | None = None) -> None:
    """`comoe train` for one cell; with ``threads``, that many torch threads and the output in train.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        cmd = [sys.executable, "-m", "comoe.cli", "train", "--resume", str(run_dir)]
    else:
        config.output_dir = str(run_dir)
        config.to_yaml(run_dir / "grid_cell.yaml")
        cmd = [sys.executable, "-m", "comoe.cli", "train", "--config", str(run_dir / "grid_cell.yaml")]
    if threads is None:
        subprocess.run(cmd, check=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)


# --- statistics ------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def correct_vectors(metrics: dict[str, Any], tasks: list[str]) -> dict[str, np.ndarray]:
    """Per task, 1/0 per test example for the adapter's predictions."""
    block = metrics["adapter"]["tasks"]
    return {t: np.asarray(block[t]["predictions"]) == np.asarray(block[t]["answers"]) for t in tasks}


def paired_bootstrap(a_runs: list[dict[str, np.ndarray]], b_runs: list[dict[str, np.ndarray]],
                     samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Macro-average accuracy difference a − b over paired seeds; 95% CI from resampling test examples
    (within each task, shared by both arms) and seeds."""
    rng = np.random.default_rng(seed)
    tasks = list(a_runs[0])
    n_seeds = len(a_runs)
    diff = [np.stack([a[t].astype(float) - b[t].astype(float) for a, b in zip(a_runs, b_runs, strict=True)])
            for t in tasks]  # per task: (seeds, examples)
    point = float(np.mean([d.mean() for d in diff]))
    stats = np.empty(samples)
    for s in range(samples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        stats[s] = np.mean([d[seeds][:, rng.integers(0, d.shape[1], d.shape[1])].mean() for d in diff])
    low, high = np.percentile(stats, [2.5, 97.5])
    return point, float(low), float(high)


def training_seconds(metrics: dict[str, Any]) -> float:
    """Seconds spent in training steps (all adapters of a single-task run), without evaluation."""
    train = metrics["train"]
    if "per_task" in train:
        return sum(log["seconds"] for log in train["per_task"].values())
    return train["seconds"]


def references(reference: str | list[str] | None) -> list[str]:
    if reference is None:
        return []
    return [reference] if isinstance(reference, str) else list(reference)


def modal_share(metrics: dict[str, Any]) -> float:
    """Mean over tasks of the share of test predictions that are the task's most frequent prediction.

    1.0 means the adapter gives one constant answer per task: it has learnt an answer prior, not the task.
    """
    shares = []
    for block in metrics["adapter"]["tasks"].values():
        counts = Counter(map(str, block["predictions"]))
        shares.append(max(counts.values()) / len(block["predictions"]))
    return float(np.mean(shares))


def majority_run(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The run's majority-class predictor (its training sample's most frequent answer per task) in the shape
    of a run, so the adapter can be paired with it; None when a task has no answer index (generation)."""
    tasks = {}
    for t, block in metrics["adapter"]["tasks"].items():
        label = metrics["majority"]["tasks"].get(t, {}).get("majority")
        if label is None or "answers" not in block:
            return None
        tasks[t] = {"predictions": [label] * len(block["answers"]), "answers": block["answers"]}
    return {"seed": metrics["seed"], "adapter": {"tasks": tasks, "macro": metrics["majority"]["macro"]}}


def paired_difference(runs: list[dict[str, Any]], ref_runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Macro-accuracy difference runs − ref_runs over their shared seeds, per seed and bootstrapped."""
    seeds = sorted({m["seed"] for m in runs} & {m["seed"] for m in ref_runs})
    if not seeds:
        return None
    a = [next(m for m in runs if m["seed"] == s) for s in seeds]
    b = [next(m for m in ref_runs if m["seed"] == s) for s in seeds]
    tasks = list(a[0]["adapter"]["tasks"])
    per_seed = [x["adapter"]["macro"]["accuracy"] - y["adapter"]["macro"]["accuracy"] for x, y in zip(a, b, strict=True)]
    point, low, high = paired_bootstrap([correct_vectors(m, tasks) for m in a], [correct_vectors(m, tasks) for m in b])
    return {"seeds": seeds, "per_seed": per_seed, "mean": point, "ci95": [low, high],
            "significant": not (low <= 0.0 <= high)}


def summarise(finished: list[dict[str, Any]], reference: str | list[str] | None) -> dict[str, Any]:
    """Mean ± std per variant and task, parameters, time, and paired differences against each reference
    variant (a pair already taken the other way round is not repeated), of each variant's single-task
    setting against its multi-task one, and against the majority class."""
    by_variant: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for m in finished:
        by_variant.setdefault((m["variant"], m["setting"]), []).append(m)
    rows = []
    for (variant, setting), runs in by_variant.items():
        runs.sort(key=lambda m: m["seed"])
        tasks = list(runs[0]["adapter"]["tasks"])
        row = {"variant": variant, "setting": setting, "seeds": [m["seed"] for m in runs], "tasks": {},
               "trainable": runs[0].get("trainable"), "trainable_pct": 100 * runs[0]["trainable"] / runs[0]["total_params"],
               "train_minutes": mean_std([training_seconds(m) / 60 for m in runs]),
               "run_minutes": mean_std([m["train_seconds"] / 60 for m in runs])}
        for t in tasks:
            row["tasks"][t] = mean_std([m["adapter"]["tasks"][t]["accuracy"] for m in runs])
        row["average"] = mean_std([m["adapter"]["macro"]["accuracy"] for m in runs])
        row["modal_share"] = mean_std([modal_share(m) for m in runs])
        base = [m["base"]["macro"]["accuracy"] for m in runs if "base" in m]
        row["base_average"] = float(np.mean(base)) if base else None
        # the majority class comes from each seed's training sample, so it can differ between seeds
        row["majority_average"] = mean_std([m["majority"]["macro"]["accuracy"] for m in runs])
        analysed = [m["specialisation"] for m in runs if m.get("specialisation")]
        row["specialisation"] = {key: mean_std([a[key] for a in analysed]) for key in SPECIALISATION
                                 if analysed and all(a.get(key) is not None for a in analysed)}
        rows.append(row)
    differences = []
    for ref in references(reference):
        for (variant, setting), runs in by_variant.items():
            ref_runs = by_variant.get((ref, setting))
            mirrored = any(d["variant"] == ref and d["reference"] == variant and d["setting"] == setting
                           for d in differences)
            if ref_runs and variant != ref and not mirrored:
                difference = paired_difference(runs, ref_runs)
                if difference is not None:
                    differences.append({"variant": variant, "reference": ref, "setting": setting, **difference})
    for (variant, setting), runs in by_variant.items():  # the paper's MT-vs-ST question, per variant
        multi = by_variant.get((variant, "multi"))
        if setting == "single" and multi:
            difference = paired_difference(runs, multi)
            if difference is not None:
                differences.append({"variant": variant, "reference": f"{variant} (multi)", "setting": setting,
                                    **difference})
    for (variant, setting), runs in by_variant.items():
        majority = [majority_run(m) for m in runs]
        if all(majority):
            difference = paired_difference(runs, majority)
            if difference is not None:
                differences.append({"variant": variant, "reference": MAJORITY, "setting": setting, **difference})
    return {"rows": rows, "differences": differences}


def to_markdown(summary: dict[str, Any], command: str, machine: str) -> str:
    rows = summary["rows"]
    if not rows:
        return "No finished runs.\n"
    tasks = list(rows[0]["tasks"])
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    lines = [f"Command: `{command}`  ", f"Machine: {machine}", "",
             "Accuracy (%) on the test sets, mean ± std over seeds:", "",
             "| variant | setting | seeds | " + " | ".join(tasks) + " | average | modal answer | trainable | train min | train + eval min |",
             "|" + "---|" * (len(tasks) + 8)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['setting']} | {len(r['seeds'])} | "
                     + " | ".join(pct(r["tasks"][t]) for t in tasks)
                     + f" | **{pct(r['average'])}** | {pct(r['modal_share'])} | {r['trainable']:,} ({r['trainable_pct']:.2f}%) "
                     f"| {r['train_minutes'][0]:.1f} | {r['run_minutes'][0]:.1f} |")
    lines += ["", "*modal answer*: share of each task's test predictions that are its most frequent prediction "
              "(100 = one constant answer per task), averaged over tasks."]
    base = next((r["base_average"] for r in rows if r["base_average"] is not None), None)
    majority = rows[0]["majority_average"]
    lines += ["", (f"Zero-shot base average: {100 * base:.1f}; " if base is not None else "")
              + f"majority class average (the training sample's most frequent answer per task): {pct(majority)}."]
    analysed = [r for r in rows if r.get("specialisation")]
    if analysed:
        lines += ["", "Specialisation (`comoe analyze`: means over adapted modules, then mean ± std over seeds; "
                  "runs without routers are left out):", "",
                  "| variant | setting | " + " | ".join(SPECIALISATION.values()) + " |",
                  "|" + "---|" * (len(SPECIALISATION) + 2)]
        for r in analysed:
            cells = [f"{r['specialisation'][k][0]:.3f} ± {r['specialisation'][k][1]:.3f}"
                     if k in r["specialisation"] else "—" for k in SPECIALISATION]
            lines.append(f"| {r['variant']} | {r['setting']} | " + " | ".join(cells) + " |")
    if summary["differences"]:
        lines += ["", "Paired differences in average accuracy (points; 95% CI: bootstrap over test examples and seeds):",
                  "", "| variant − reference | setting | per seed | mean | 95% CI | significant |", "|---|---|---|---|---|---|"]
        for d in summary["differences"]:
            seeds = ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"])
            lines.append(f"| {d['variant']} − {d['reference']} | {d['setting']} | {seeds} | {100 * d['mean']:+.2f} | "
                         f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] | {'yes' if d['significant'] else 'no'} |")
    return "\n".join(lines) + "\n"


# --- command line ----------------------------------------------------------------------------------
def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", help="YAML: variants (name → RunConfig overrides) or preset, seeds, settings, base, reference")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a ready-made grid (default: lora / moe-lora / comoe)")
    parser.add_argument("--reference", type=lambda s: s.split(","),
                        help="variant(s) to take paired differences against, e.g. moe-lora,lora (default: the preset's)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 0,1,2")
    parser.add_argument("--settings", type=lambda s: s.split(","), help="multi, single or multi,single")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a RunConfig field for every run (repeatable), e.g. --set train_per_task=64")
    parser.add_argument("--out", default="results/compare", help="grid directory (runs/, summary.json, summary.md)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each with cores/jobs torch threads and its output in RUN_DIR/train.log")
    parser.add_argument("--summary-only", action="store_true", help="summarise finished runs, start none")
    parser.add_argument("--no-analysis", action="store_true",
                        help="skip the specialisation numbers (a `comoe analyze` pass per routed run, ~40 s each on CPU)")


def run_compare(args: argparse.Namespace) -> int:
    from comoe.runconfig import parse_field_value

    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")

    grid = load_grid(args.grid) if args.grid else Grid(variants=PRESETS[args.preset or "default"],
                                                       reference=REFERENCE.get(args.preset or "default"))
    if args.grid and args.preset:
        raise ValueError("give --grid or --preset, not both")
    if args.seeds:
        grid.seeds = args.seeds
    if args.reference:
        grid.reference = args.reference
    if args.settings:
        grid.settings = args.settings
    for item in args.set:
        name, _, value = item.partition("=")
        grid.base[name] = parse_field_value(name, value)
    grid.runs()  # validate every cell before the first run starts
    out = Path(args.out)
    started = time.time()
    command = grid_command(out, args.summary_only)
    finished = run_grid(grid, out, dry_run=args.summary_only, analyse=not args.no_analysis, jobs=args.jobs)
    summary = summarise(finished, grid.reference)
    summary["grid_seconds"] = time.time() - started
    write_json_atomic(out / "summary.json", summary)
    markdown = to_markdown(summary, command, _machine())
    write_text_atomic(out / "summary.md", markdown)
    print(markdown)
    return 0


def grid_command(out: Path, summary_only: bool) -> str:
    """The command that ran the grid: this one, kept in ``OUT/command.txt``; ``--summary-only`` reads it back."""
    path = out / COMMAND_NAME
    if summary_only and path.is_file():
        return path.read_text().strip()
    command = "comoe compare " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["compare"] else "comoe compare"
    if not summary_only:
        write_text_atomic(path, command + "\n")
    return command


def _machine() -> str:
    import platform

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}"

