"""One run's specialisation metrics: which runs can be analysed, loading a run's adapter and test sets,
recording its routing (:mod:`comoe.analysis.record`), and every metric of :mod:`comoe.analysis.metrics`."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from comoe.analysis.metrics import SCALARS, _mean, layer_rows, load_tables, module_metrics, pca_2d, tsne_2d
from comoe.analysis.options import AnalyzeOptions
from comoe.analysis.record import record_routing
from comoe.data.registry import load_splits
from comoe.model import layer_index
from comoe.training.methods import method_of
from comoe.training.run_config import RunConfig
from comoe.training.run_dir import ADAPTER_DIR, RESULTS_NAME, RUN_CONFIG_NAME, is_run_dir, saved_run


class NotAnalysable(ValueError):
    """A run without routers to analyse (plain LoRA, single-task, unfinished)."""


def skip_reason(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot be analysed, or None."""
    if not is_run_dir(run_dir):
        return f"no {RUN_CONFIG_NAME}: not a directory written by `comoe train`"
    run = saved_run(run_dir)
    if not method_of(run.method).routed:
        return "plain LoRA has no experts and no router: nothing to analyse"
    if run.setting == "single":
        return (
            "single-task run: each adapter has its own experts and sees one task, so there is no "
            "task-expert relation to measure; analyse a multi-task run"
        )
    if not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return "no adapter/ directory: the run has not finished"
    return None


def run_label(run: RunConfig) -> str:
    """method, contrastive weight and seed, e.g. ``comoe λ=0.01 s0``."""
    return f"{run.method} λ={run.trained_adapter.contrastive_weight:g} s{run.seed}"


def _chosen_module(names: Sequence[str], layer: int | None, module: str | None) -> str:
    """The adapted module the 2-D projection shows: ``module`` in ``layer`` (default: the middle layer)."""
    if module is None:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        module = "q_proj" if "q_proj" in kinds else kinds[0]
    candidates = sorted((layer_index(n), n) for n in names if n.rsplit(".", 1)[-1] == module)
    if not candidates:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"--module {module!r} is not adapted in this run; adapted module types: {', '.join(kinds)}"
        )
    layers = [i for i, _ in candidates]
    if layer is None:
        return candidates[len(candidates) // 2][1]
    for i, name in candidates:
        if i == layer:
            return name
    raise ValueError(f"--layer {layer}: no adapted {module} there; adapted layers: {layers}")


def projection_data(outputs: torch.Tensor, chosen: torch.Tensor, use_tsne: bool, seed: int) -> dict:
    """PCA (and t-SNE) of the expert outputs (n, E, D): one point per (token, expert)."""
    n, n_exp, dim = outputs.shape
    flat = outputs.reshape(n * n_exp, dim)
    experts = np.tile(np.arange(n_exp), n)
    active = torch.zeros(n, n_exp, dtype=torch.bool).scatter_(1, chosen.long(), True).reshape(-1).numpy()
    points, variance = pca_2d(flat)
    data = {"pca": points, "explained_variance": variance, "experts": experts, "active": active, "tsne": None}
    if use_tsne:
        data["tsne"] = tsne_2d(flat, seed)
    return data


def analyse_run(run_dir: Path, options: AnalyzeOptions) -> tuple[dict, dict | None]:
    """Load the run's adapter, record routing over its test sets, and compute every metric.

    Returns (the run's metrics, for metrics.json; projection arrays for the plot, or None).
    """
    from comoe.training.adapters import load_adapted_model
    from comoe.training.base_models import load_base_model

    started = time.time()
    run = saved_run(run_dir, test_per_task=options.test_per_task)
    _, test = load_splits(
        run.tasks, run.train_per_task, run.test_per_task, run.seed, skip_invalid_rows=run.skip_invalid_rows
    )
    base, tokenizer = load_base_model(run.model, quantize=run.quantize)
    if torch.cuda.is_available():
        base.to("cuda")
    model = load_adapted_model(base, run_dir / ADAPTER_DIR)
    names = list(getattr(model, "routed_modules", {}))
    if not names:
        raise NotAnalysable(f"{run_dir}: the adapter has no routed experts")
    projected = _chosen_module(names, options.layer, options.module)
    loaded = time.time()
    print(
        f"analysing {run_dir} ({run_label(run)}): {sum(map(len, test.values()))} test examples of "
        f"{len(test)} tasks, {len(names)} adapted modules",
        flush=True,
    )
    recorder = record_routing(
        model,
        tokenizer,
        test,
        list(test),
        options,
        options.max_length or run.max_length,
        projected,
        desc=run_label(run),
    )
    passed = time.time()
    cfg = model.comoe_config
    positives = cfg.top_k - 1
    negatives = cfg.num_negatives if cfg.num_negatives is not None else cfg.num_experts - cfg.top_k
    summary = recorder.summary()
    modules = {}
    for name in tqdm(names, desc="metrics", unit="module", disable=not options.progress):
        sample = recorder.records[name].outputs()
        outputs = None if sample is None else _evenly(sample[0], options.samples)
        modules[name] = module_metrics(name, summary[name], outputs, positives, negatives)
    proj = recorder.records[projected].outputs()
    projection = None if proj is None else projection_data(proj[0], proj[2], options.tsne, options.seed)
    metrics = {
        "label": run_label(run),
        "run_dir": str(run_dir),
        "method": run.method,
        "seed": run.seed,
        "contrastive_weight": cfg.contrastive_weight,
        "tasks": list(test),
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "routing": cfg.routing,
        "temperature": cfg.temperature,
        "positives": positives,
        "negatives": negatives,
        "examples_per_task": {t: len(test[t]) for t in test},
        "tokens_per_task": summary[names[0]]["tokens_per_task"],
        "accuracy": _run_accuracy(run_dir),
        "summary": {key: _mean([m[key] for m in modules.values()]) for key in SCALARS},
        "layers": layer_rows(modules),
        "load": load_tables(modules),
        "modules": modules,
        "projection": None
        if projection is None
        else {
            "module": projected,
            "layer": layer_index(projected),
            "tokens": int(proj[0].shape[0]),
            "explained_variance": projection["explained_variance"],
        },
        "seconds": {"load": loaded - started, "pass": passed - loaded, "metrics": time.time() - passed},
    }
    return metrics, projection


def _evenly(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows spread evenly over ``rows`` (the projection's module keeps more than the others)."""
    if rows.shape[0] <= count:
        return rows
    return rows[torch.linspace(0, rows.shape[0] - 1, count).round().long()]


def _run_accuracy(run_dir: Path) -> float | None:
    """The run's own macro accuracy from its metrics.json, if there."""
    path = run_dir / RESULTS_NAME
    try:
        return json.loads(path.read_text())["adapter"]["macro"]["accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
