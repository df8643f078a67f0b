"""Runs a trained adapter over its test sets with routing records on, and computes its metrics."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from comoe.analysis.metrics import SCALARS, _mean, layer_rows, load_tables, module_metrics, pca_2d, tsne_2d
from comoe.data.registry import load_splits
from comoe.model import layer_index
from comoe.records import RoutingRecorder
from comoe.training.methods import method_of
from comoe.training.run_config import RunConfig
from comoe.training.run_dir import ADAPTER_DIR, RESULTS_NAME, RUN_CONFIG_NAME, is_run_dir, saved_run
from comoe.utils.modeling import accepts_logits_to_keep, model_device, pad_token_id
from comoe.utils.validation import check_field_types, doc

DEFAULT_TEST_PER_TASK = 32


@dataclass
class AnalyzeOptions:
    """What `comoe analyze` does; every field is a command-line flag (and a key of its ``--config`` file)."""

    test_per_task: int | None = field(
        default=DEFAULT_TEST_PER_TASK, metadata=doc("Test examples per task routed; none = all.")
    )
    batch_size: int = field(default=16, metadata=doc("Sequences per forward pass."))
    max_length: int | None = field(default=None, metadata=doc("Token limit per example; none = the run's."))
    samples: int = field(
        default=128, metadata=doc("Tokens per module whose expert outputs are kept (redundancy metrics).")
    )
    projection_samples: int = field(default=400, metadata=doc("Tokens kept for the 2-D projection."))
    layer: int | None = field(
        default=None, metadata=doc("Layer of the 2-D projection; none = the middle adapted layer.")
    )
    module: str | None = field(
        default=None,
        metadata=doc(
            "Module of the 2-D projection; none = q_proj, or the routed module of an FFN run (mlp)."
        ),
    )
    seed: int = field(default=0, metadata=doc("Seeds the token samples and t-SNE."))
    progress: bool = field(default=True, metadata=doc("Progress bars."))
    tsne: bool = field(default=True, metadata=doc("A t-SNE projection too, when scikit-learn is installed."))
    threads: int | None = field(
        default=None,
        metadata=doc("CPU threads for torch; none = torch's, or 1 when the machine is already busy."),
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("test_per_task", "batch_size", "samples", "projection_samples", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def cpu_threads(requested: int | None) -> int:
    """``requested``, or torch's default unless the machine is busy (1-minute load ≥ cores − ½): then 1.

    On a shared CPU, OpenMP threads that find no free core spin at every barrier; measured here on 2 busy
    cores, one thread ran the pass 1.6× faster than two.
    """
    if requested is not None:
        return requested
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5
    except OSError:
        busy = False
    return 1 if busy else torch.get_num_threads()


@contextmanager
def analysis_threads(requested: int | None) -> Iterator[int]:
    """Run the block with ``cpu_threads(requested)`` torch threads (unchanged on CUDA); yields the count."""
    previous = torch.get_num_threads()
    threads = previous if torch.cuda.is_available() else cpu_threads(requested)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


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


def _encoded_batches(test: dict, tasks: list[str], tokenizer, max_length: int, batch_size: int) -> list[list]:
    """Test examples encoded as in training, sorted by length (less padding) and cut into batches."""
    from comoe.data.batching import encode_example

    encoded = [
        encode_example(ex, tokenizer, task_id, max_length)
        for task_id, task in enumerate(tasks)
        for ex in test[task]
    ]
    encoded.sort(key=lambda item: -len(item.input_ids))
    return [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]


def record_routing(
    model,
    tokenizer,
    test: dict,
    tasks: list[str],
    options: AnalyzeOptions,
    max_length: int,
    projection_module: str | None,
    desc: str = "analyze",
) -> RoutingRecorder:
    """One pass over the test sets with routing records on; returns the filled recorder."""
    from comoe.data.batching import collate

    batches = _encoded_batches(test, tasks, tokenizer, max_length, options.batch_size)
    limits = (
        {projection_module: max(options.projection_samples, options.samples)} if projection_module else {}
    )
    recorder = RoutingRecorder(
        num_tasks=len(tasks),
        sample_outputs=options.samples,
        contrastive=True,
        sample_limits=limits,
        spread_over=len(batches),
        seed=options.seed,
    )
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # no vocabulary-sized logits
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    torch.manual_seed(options.seed)  # the contrastive loss draws random anchors
    model.eval()
    with torch.no_grad(), model.recording(recorder):
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not options.progress):
            tensors = collate(batch, pad)
            model(
                input_ids=tensors["input_ids"].to(device),
                attention_mask=tensors["attention_mask"].to(device),
                task_ids=tensors["task_ids"].to(device),
                **extra,
            )
    return recorder


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
