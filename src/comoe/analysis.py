"""`comoe analyze RUN_DIR [RUN_DIR ...]`: do the experts specialise? Metrics, plots and a report.

The adapter of each run is run over its test sets (encoded as in training: prompt + answer) with routing
records on; everything below is computed per adapted module, then averaged over the modules of a layer.

Definitions (also written into ``metrics.json`` under ``definitions``):

- **activation frequency** of expert e for task t: the share of t's real tokens whose top-k contains e
  (rows sum to k; under soft routing the mean gate weight, rows sum to 1). The paper's Fig. 4.
- **NMI** (the specialisation number): mutual information between the task T of a token and an expert X
  it chose, each of the k choices of a token counting as one sample (gate mass under soft routing),
  normalised as I(T;X) / min(H(T), H(X)). It is 1 when one variable determines the other (tasks with
  disjoint expert sets; or one expert per task with k = 1) and 0 when routing ignores the task. The
  min-normalisation is chosen because with k > 1 a task always spreads over k experts, so H(X|T) ≥ log k
  and the symmetric sqrt(H(T)H(X)) could not reach 1 even for perfectly task-specific experts.
- **NMI of expert sets**: the same with X = the chosen top-k set (one sample per token). With more tasks
  than disjoint expert sets (e.g. 6 tasks, 4 experts, top-2) only this one can reach 1: each task its
  own pair of experts.
  Both are plug-in estimates, biased upwards by about (|T|−1)(|X|−1) / (2N) nats for N samples:
  negligible at the thousands of tokens of a test pass.
- **routing entropy**: mean over tokens of the entropy of the router's softmax (nats; log E = uniform).
- **load CV**: coefficient of variation (population std / mean) of the experts' total loads; 0 = balanced.
- **redundancy (cosine)**: mean over sampled tokens and expert pairs i < j of cos(E_i(x), E_j(x)), every
  expert evaluated on the same token, active or not. 1 = identical experts.
- **redundancy (CKA)**: mean over expert pairs of linear CKA between their output matrices (n × D) on the
  same sampled tokens (Kornblith et al. 2019). 1 = the same representation up to rotation and scale.
- **L_con**: CoMoE's contrastive loss (Algorithm 1, the run's own τ, anchor mode and negatives), in eval
  mode, token-weighted mean over the test pass.
- **InfoNCE bound** on the paper's mutual-information gap: log N − L_con with N = (P + M) / P, where P = k − 1
  positives and M negatives are the candidates of the loss's denominator besides the anchor. With the
  paper's k = 2 this is the usual one-positive InfoNCE with N = 1 + M candidates; dividing by P makes the
  bound 0 at chance (all similarities equal, L_con = log((P + M)/P)) for any k. It is at most log N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from comoe.model import layer_index
from comoe.records import RoutingRecorder
from comoe.runconfig import RUN_CONFIG_NAME, RunConfig

DEFAULT_TEST_PER_TASK = 32
REPORT_NAME = "report.md"
METRICS_NAME = "metrics.json"
DEFINITIONS = {
    "activation": "share of the task's real tokens whose top-k contains the expert (soft: mean gate weight)",
    "nmi": "I(task; chosen expert) / min(H(task), H(expert)), each of a token's k choices one sample",
    "nmi_sets": "I(task; chosen top-k set) / min(H(task), H(set)), one sample per token",
    "entropy": "mean over tokens of the router softmax entropy, nats (log E = uniform)",
    "cv": "std / mean of the experts' total loads (population std); 0 = balanced",
    "cosine": "mean over sampled tokens and expert pairs i<j of cos(E_i(x), E_j(x)); 1 = identical experts",
    "cka": "mean over expert pairs of linear CKA of their (n x D) outputs on the same tokens",
    "contrastive_loss": "CoMoE's contrastive loss in eval mode, token-weighted mean over the test pass",
    "infonce_bound": "log((P+M)/P) - L_con, P = k-1 positives, M negatives per anchor; 0 at chance",
    "layer values": "mean over the adapted modules of the layer",
    "summary values": "mean over all adapted modules",
}


# --- metrics: pure functions ---------------------------------------------------------------------------
def entropy(weights: np.ndarray) -> float:
    """Entropy (nats) of the distribution proportional to ``weights``."""
    p = np.asarray(weights, dtype=float).ravel()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * np.log(p)).sum())


def mutual_information(joint: np.ndarray) -> float:
    """I(A;B) in nats from a joint count (or probability) table (|A| × |B|)."""
    joint = np.asarray(joint, dtype=float)
    return entropy(joint.sum(1)) + entropy(joint.sum(0)) - entropy(joint)


def normalized_mutual_information(joint: np.ndarray) -> float | None:
    """I(A;B) / min(H(A), H(B)) ∈ [0, 1]; None when either side is constant (nothing to explain)."""
    joint = np.asarray(joint, dtype=float)
    scale = min(entropy(joint.sum(1)), entropy(joint.sum(0)))
    if scale <= 1e-12:
        return None
    return float(np.clip(mutual_information(joint) / scale, 0.0, 1.0))


def coefficient_of_variation(load: Sequence[float]) -> float | None:
    load = np.asarray(load, dtype=float)
    mean = load.mean()
    return float(load.std() / mean) if mean > 0 else None


def mean_pairwise_cosine(outputs: torch.Tensor, eps: float = 1e-12) -> float | None:
    """Mean over tokens and expert pairs i < j of cos(E_i(x), E_j(x)); outputs (n, E, D).

    None when the outputs are all zero (e.g. B = 0 at init): the cosine is undefined there.
    """
    outputs = outputs.double()
    norms = outputs.norm(dim=-1)
    if norms.max() <= eps:
        return None
    unit = outputs / norms.clamp_min(eps)[..., None]
    cos = unit @ unit.transpose(1, 2)  # (n, E, E)
    i, j = torch.triu_indices(cos.shape[1], cos.shape[1], offset=1)
    return float(cos[:, i, j].mean())


def _centered_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    return x @ x.t()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Linear CKA of two representations of the same n examples, x (n, D1) and y (n, D2)."""
    return _cka_from_grams(_centered_gram(x), _centered_gram(y))


def _cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float | None:  # noqa: E741
    # ||XᵀY||²_F = <K, L>_F for centred Gram matrices K = XXᵀ, L = YYᵀ
    denom = math.sqrt(float((k * k).sum()) * float((l * l).sum()))
    return float((k * l).sum()) / denom if denom > 1e-24 else None


def mean_pairwise_cka(outputs: torch.Tensor) -> float | None:
    """Mean linear CKA over expert pairs i < j; outputs (n, E, D) for the same n tokens."""
    grams = [_centered_gram(outputs[:, e]) for e in range(outputs.shape[1])]
    values = [_cka_from_grams(grams[i], grams[j]) for i in range(len(grams)) for j in range(i + 1, len(grams))]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def infonce_bound(loss: float | None, positives: int, negatives: int) -> float | None:
    """log((P + M) / P) − L_con: the InfoNCE lower bound on the paper's mutual-information gap."""
    if loss is None or positives < 1:
        return None
    return math.log((positives + negatives) / positives) - loss


def activation_frequency(counts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """(T, E) share of each task's tokens that activate each expert (0 for tasks without tokens)."""
    counts, tokens = np.asarray(counts, dtype=float), np.asarray(tokens, dtype=float)
    return counts / np.maximum(tokens, 1e-12)[:, None] * (tokens > 0)[:, None]


def pca_2d(x: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    """The first two principal components of x (M, D) and the share of variance each explains."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    var = (s**2) / max(float((s**2).sum()), 1e-300)
    return (x @ vh[:2].t()).numpy(), var[:2].tolist()


def tsne_2d(x: torch.Tensor, seed: int = 0) -> np.ndarray | None:
    """t-SNE to 2-D when scikit-learn is installed, else None."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return None
    x = x.double().numpy()
    perplexity = float(min(30, max(5, (len(x) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


# --- per-module and per-layer numbers -----------------------------------------------------------------
def module_metrics(name: str, stats: dict, outputs: torch.Tensor | None, positives: int, negatives: int) -> dict:
    """Every number of one adapted module, from its ``RoutingRecorder.summary()`` entry and sampled outputs."""
    counts = np.asarray(stats["counts"], dtype=float)
    tokens = np.asarray(stats["tokens_per_task"], dtype=float)
    n_exp = counts.shape[1]
    sets = stats.get("combination_counts")
    loss = stats.get("contrastive_loss")
    return {
        "layer": layer_index(name),
        "type": name.rsplit(".", 1)[-1],
        "activation": activation_frequency(counts, tokens).tolist(),
        "activation_all": (counts.sum(0) / max(tokens.sum(), 1e-12)).tolist(),
        "counts": counts.tolist(),
        "tokens": tokens.tolist(),
        "nmi": normalized_mutual_information(counts),
        "mi_nats": mutual_information(counts),
        "nmi_sets": normalized_mutual_information(np.asarray(sets)) if sets is not None else None,
        "expert_sets": stats.get("combinations"),
        "set_counts": sets,
        "entropy": stats["gate_entropy"],
        "entropy_normalized": stats["gate_entropy"] / math.log(n_exp) if n_exp > 1 else None,
        "cv": coefficient_of_variation(counts.sum(0)),
        "contrastive_loss": loss,
        "infonce_bound": infonce_bound(loss, positives, negatives),
        "pos_cos": stats.get("pos_cos"),
        "neg_cos": stats.get("neg_cos"),
        "cosine": mean_pairwise_cosine(outputs) if outputs is not None else None,
        "cka": mean_pairwise_cka(outputs) if outputs is not None else None,
        "sampled_tokens": 0 if outputs is None else int(outputs.shape[0]),
    }


SCALARS = ("nmi", "nmi_sets", "entropy", "entropy_normalized", "cv", "cosine", "cka", "contrastive_loss",
           "infonce_bound", "pos_cos", "neg_cos")


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def layer_rows(modules: dict[str, dict]) -> list[dict]:
    """Per layer (sorted), the mean of each scalar over the layer's modules."""
    by_layer: dict[int, list[dict]] = defaultdict(list)
    for module in modules.values():
        by_layer[module["layer"] if module["layer"] is not None else -1].append(module)
    return [{"layer": layer, "modules": len(group), **{key: _mean([m[key] for m in group]) for key in SCALARS}}
            for layer, group in sorted(by_layer.items())]


def load_tables(modules: dict[str, dict]) -> dict[str, list]:
    """(T, E) activation frequency summed over layers, per module type and over all modules."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for module in modules.values():
        groups[module["type"]].append(module)
    groups["all"] = list(modules.values())
    tables = {}
    for kind, group in groups.items():
        counts = sum(np.asarray(m["counts"], dtype=float) for m in group)
        tokens = sum(np.asarray(m["tokens"], dtype=float) for m in group)
        tables[kind] = activation_frequency(counts, tokens).tolist()
    return tables


# --- running the adapter with records on ----------------------------------------------------------------
@dataclass
class AnalyzeOptions:
    """What `comoe analyze` does; every field is a command-line flag."""

    test_per_task: int | None = DEFAULT_TEST_PER_TASK
    batch_size: int = 16
    max_length: int | None = None  # None: the run's
    samples: int = 128  # tokens whose expert outputs are kept, per module (redundancy)
    projection_samples: int = 400  # tokens kept for the 2-D projection's module
    layer: int | None = None  # None: the middle adapted layer
    module: str = "q_proj"
    seed: int = 0
    progress: bool = True
    tsne: bool = True
    threads: int | None = None  # torch CPU threads; None: see ``cpu_threads``


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
    if not (run_dir / RUN_CONFIG_NAME).is_file():
        return f"no {RUN_CONFIG_NAME}: not a directory written by `comoe train`"
    run = RunConfig.from_yaml(run_dir / RUN_CONFIG_NAME)
    if run.method == "lora":
        return "plain LoRA has no experts and no router: nothing to analyse"
    if run.setting == "single":
        return ("single-task run: each adapter has its own experts and sees one task, so there is no "
                "task-expert relation to measure; analyse a multi-task run")
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        return "no adapter/ directory: the run has not finished"
    return None


def run_label(run: RunConfig) -> str:
    """method, contrastive weight and seed, e.g. ``comoe λ=0.01 s0``."""
    return f"{run.method} λ={run.comoe_config().contrastive_weight:g} s{run.seed}"


def _encoded_batches(test: dict, tasks: list[str], tokenizer, max_length: int, batch_size: int) -> list[list]:
    """Test examples encoded as in training, sorted by length (less padding) and cut into batches."""
    from comoe.batching import encode_example

    encoded = [encode_example(ex, tokenizer, task_id, max_length)
               for task_id, task in enumerate(tasks) for ex in test[task]]
    encoded.sort(key=lambda item: -len(item.input_ids))
    return [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]


def record_routing(model, tokenizer, test: dict, tasks: list[str], options: AnalyzeOptions, max_length: int,
                   projection_module: str | None, desc: str = "analyze") -> RoutingRecorder:
    """One pass over the test sets with routing records on; returns the filled recorder."""
    from comoe.batching import collate
    from comoe.evaluate import accepts_logits_to_keep

    batches = _encoded_batches(test, tasks, tokenizer, max_length, options.batch_size)
    limits = {projection_module: max(options.projection_samples, options.samples)} if projection_module else {}
    recorder = RoutingRecorder(num_tasks=len(tasks), sample_outputs=options.samples, contrastive=True,
                               sample_limits=limits, spread_over=len(batches), seed=options.seed)
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # no vocabulary-sized logits
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(options.seed)  # the contrastive loss draws random anchors
    model.eval()
    with torch.no_grad(), model.recording(recorder):
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not options.progress):
            tensors = collate(batch, pad)
            model(input_ids=tensors["input_ids"].to(device), attention_mask=tensors["attention_mask"].to(device),
                  task_ids=tensors["task_ids"].to(device), **extra)
    return recorder


def _chosen_module(names: Sequence[str], layer: int | None, module: str) -> str:
    """The adapted module the 2-D projection shows: ``module`` in ``layer`` (default: the middle layer)."""
    candidates = sorted((layer_index(n), n) for n in names if n.rsplit(".", 1)[-1] == module)
    if not candidates:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"--module {module!r} is not adapted in this run; adapted module types: {', '.join(kinds)}")
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
    from comoe.adapters import load_adapted_model
    from comoe.job import load_splits
    from comoe.models import load_base_model

    started = time.time()
    run = RunConfig.from_yaml(run_dir / RUN_CONFIG_NAME, test_per_task=options.test_per_task)
    _, test = load_splits(run)
    base, tokenizer = load_base_model(run.model, quantize=run.quantize)
    if torch.cuda.is_available():
        base.to("cuda")
    model = load_adapted_model(base, run_dir / "adapter")
    names = list(getattr(model, "adapted_modules", {}))
    if not names:
        raise NotAnalysable(f"{run_dir}: the adapter has no routed experts")
    projected = _chosen_module(names, options.layer, options.module)
    loaded = time.time()
    print(f"analysing {run_dir} ({run_label(run)}): {sum(map(len, test.values()))} test examples of "
          f"{len(test)} tasks, {len(names)} adapted modules", flush=True)
    recorder = record_routing(model, tokenizer, test, list(test), options, options.max_length or run.max_length,
                              projected, desc=run_label(run))
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
        "label": run_label(run), "run_dir": str(run_dir), "method": run.method, "seed": run.seed,
        "contrastive_weight": cfg.contrastive_weight, "tasks": list(test),
        "num_experts": cfg.num_experts, "top_k": cfg.top_k, "routing": cfg.routing, "temperature": cfg.temperature,
        "positives": positives, "negatives": negatives,
        "examples_per_task": {t: len(test[t]) for t in test},
        "tokens_per_task": summary[names[0]]["tokens_per_task"],
        "accuracy": _run_accuracy(run_dir),
        "summary": {key: _mean([m[key] for m in modules.values()]) for key in SCALARS},
        "layers": layer_rows(modules),
        "load": load_tables(modules),
        "modules": modules,
        "projection": None if projection is None else {
            "module": projected, "layer": layer_index(projected), "tokens": int(proj[0].shape[0]),
            "explained_variance": projection["explained_variance"]},
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
    path = run_dir / "metrics.json"
    try:
        return json.loads(path.read_text())["adapter"]["macro"]["accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- figures and report ------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text.replace("λ", "lambda")).strip("_")


def make_figures(runs: list[dict], projections: list[dict | None], out: Path) -> dict[str, list[str]]:
    """Write every PNG; returns section name -> file names (relative to ``out``)."""
    from comoe import plots

    files: dict[str, list[str]] = {}
    files["load"] = [plots.load_overview(runs, out / "load_overview.png").name]
    files["load_by_layer"] = [plots.load_by_layer(r, out / f"load_by_layer_{_slug(r['label'])}.png").name
                              for r in runs]
    nmi_ref = [(1.0, "task ↔ expert fully determined")]
    files["nmi"] = [plots.layer_curves(runs, [
        {"keys": ["nmi"], "ylabel": "NMI", "title": "task vs chosen expert", "ylim": (0, 1.05), "hlines": nmi_ref},
        {"keys": ["nmi_sets"], "ylabel": "NMI", "title": "task vs chosen top-k expert set", "ylim": (0, 1.05),
         "hlines": nmi_ref},
    ], out / "nmi.png", "Specialisation: normalised mutual information between task and routing").name]
    log_e = math.log(runs[0]["num_experts"])
    files["balance"] = [plots.layer_curves(runs, [
        {"keys": ["entropy"], "ylabel": "entropy (nats)", "title": "router entropy per token",
         "hlines": [(log_e, f"log E = {log_e:.2f} (uniform)")]},
        {"keys": ["cv"], "ylabel": "CV of expert load", "title": "load imbalance (0 = balanced)"},
    ], out / "balance.png", "Routing entropy and load balance").name]
    files["redundancy"] = [plots.layer_curves(runs, [
        {"keys": ["cosine"], "ylabel": "mean pairwise cosine", "title": "expert outputs, same tokens",
         "hlines": [(1.0, "identical"), (0.0, "orthogonal")]},
        {"keys": ["cka"], "ylabel": "mean pairwise linear CKA", "title": "expert output representations",
         "hlines": [(1.0, "identical")]},
    ], out / "redundancy.png", "Redundancy between experts").name]
    if any(r["summary"]["contrastive_loss"] is not None for r in runs):
        files["contrastive"] = [plots.layer_curves(runs, _contrastive_panels(runs), out / "contrastive.png",
                                                   "Contrastive loss and the InfoNCE bound on the MI gap").name]
    files["projection"] = _projection_figures(runs, projections, out)
    return files


def _contrastive_panels(runs: list[dict]) -> list[dict]:
    run = runs[0]
    chance = math.log((run["positives"] + run["negatives"]) / max(run["positives"], 1))
    return [
        {"keys": ["contrastive_loss"], "ylabel": "L_con", "title": "contrastive loss (eval)",
         "hlines": [(chance, f"chance = log((P+M)/P) = {chance:.2f}")]},
        {"keys": ["infonce_bound"], "ylabel": "log N − L_con (nats)", "title": "InfoNCE bound on ΔI",
         "hlines": [(0.0, "chance"), (chance, "max = log N")]},
        {"keys": ["pos_cos", "neg_cos"], "ylabel": "cosine", "title": "anchor–positive (solid) / –negative (dashed)"},
    ]


def _projection_figures(runs: list[dict], projections: list[dict | None], out: Path) -> list[str]:
    from comoe import plots

    pairs = [(r, p) for r, p in zip(runs, projections, strict=True) if p is not None]
    if not pairs:
        return []
    module = pairs[0][0]["projection"]["module"]
    files = []
    for method in ("pca", "tsne"):
        panels = []
        for run, proj in pairs:
            if proj[method] is None:
                continue
            xlabel, ylabel = _axis_labels(method, run["projection"]["explained_variance"])
            panels.append({"title": f"{run['label']} — {run['projection']['tokens']} tokens", "points": proj[method],
                           "experts": proj["experts"], "active": proj["active"], "xlabel": xlabel, "ylabel": ylabel})
        if panels:
            name = f"projection_{method}_{_slug(module)}.png"
            plots.projection(panels, out / name, f"Expert outputs of {module} ({method.upper()}), coloured by expert")
            files.append(name)
    return files


def _axis_labels(method: str, variance: list[float]) -> tuple[str, str]:
    if method == "pca":
        return tuple(f"PC{i + 1} ({100 * v:.0f}% of variance)" for i, v in enumerate(variance))
    return "t-SNE 1", "t-SNE 2"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


SUMMARY_COLUMNS = (("accuracy", "accuracy"), ("nmi", "NMI"), ("nmi_sets", "NMI (sets)"), ("entropy", "entropy"),
                   ("cv", "load CV"), ("cosine", "cosine"), ("cka", "CKA"), ("contrastive_loss", "L_con"),
                   ("infonce_bound", "log N − L_con"))


def report_markdown(payload: dict, files: dict[str, list[str]]) -> str:
    """report.md: the comparison table, every figure inline, the per-layer table and the definitions."""
    runs = payload["runs"]
    lines = ["# Expert specialisation report", ""]
    lines += [f"Runs analysed on up to {payload['options']['test_per_task']} test examples per task, in "
              f"{payload['seconds']:.0f} s ({payload['threads']} CPU thread(s) where on the CPU). Values are means over adapted modules (per layer: over the modules "
              "of that layer). Definitions at the end; every number is in `metrics.json`.", "",
              "Specialised experts show as a high NMI (routing depends on the task), low redundancy (cosine and "
              "CKA between experts' outputs on the same tokens) and a positive InfoNCE bound (activated experts "
              "agree more with each other than with the inactive ones).", ""]
    lines += _runs_table(runs) + _summary_table(runs) + _skipped(payload["skipped"])
    sections = [
        ("load", "Per-task expert load (paper Fig. 4)",
         "Share of each task's tokens that activate each expert, summed over layers (per module type and "
         "over all modules). Expert ids only mean something within one module, so this aggregate can hide "
         "specialisation that the per-module NMI below shows."),
        ("load_by_layer", "Per-task expert load by layer",
         "Per run, one heatmap per module type: layers × experts, one block of expert columns per task and a "
         "last block for all tasks together."),
        ("nmi", "Specialisation: NMI between task and routing", DEFINITIONS["nmi"] + "."),
        ("balance", "Routing entropy and load balance", ""),
        ("redundancy", "Redundancy between experts", "Cosine and linear CKA of expert outputs on the same tokens."),
        ("contrastive", "Contrastive loss and the InfoNCE bound", DEFINITIONS["infonce_bound"] + "."),
        ("projection", "2-D projection of expert outputs (paper Fig. 5)", ""),
    ]
    for key, title, text in sections:
        if files.get(key):
            lines += [f"## {title}", ""] + ([text, ""] if text else [])
            lines += [f"![{title}]({name})" for name in files[key]] + [""]
    lines += _layer_table(runs)
    lines += ["## Definitions", ""] + [f"- **{key}**: {text}" for key, text in DEFINITIONS.items()] + [""]
    return "\n".join(lines)


def _runs_table(runs: list[dict]) -> list[str]:
    lines = ["## Runs", "", "| run | directory | experts | top-k | tasks | test examples | tokens |", "|---" * 7 + "|"]
    for r in runs:
        lines.append(f"| {r['label']} | `{r['run_dir']}` | {r['num_experts']} | {r['top_k']} | {len(r['tasks'])} | "
                     f"{sum(r['examples_per_task'].values())} | {int(sum(r['tokens_per_task']))} |")
    return [*lines, ""]


def _summary_table(runs: list[dict]) -> list[str]:
    header = "| run | " + " | ".join(title for _, title in SUMMARY_COLUMNS) + " |"
    lines = ["## Comparison", "", header, "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"]
    for r in runs:
        cells = [_fmt(r["accuracy"]) if key == "accuracy" else _fmt(r["summary"][key]) for key, _ in SUMMARY_COLUMNS]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _skipped(skipped: list[dict]) -> list[str]:
    if not skipped:
        return []
    return ["## Not analysed", ""] + [f"- `{s['run_dir']}`: {s['reason']}" for s in skipped] + [""]


def _layer_table(runs: list[dict]) -> list[str]:
    keys = (("nmi", "NMI"), ("cosine", "cos"), ("infonce_bound", "bound"))
    header = "| layer | " + " | ".join(f"{r['label']} {title}" for _, title in keys for r in runs) + " |"
    lines = ["## Per layer", "", header, "|---" * (1 + len(keys) * len(runs)) + "|"]
    layers = sorted({row["layer"] for r in runs for row in r["layers"]})
    rows = [{row["layer"]: row for row in r["layers"]} for r in runs]
    for layer in layers:
        cells = [_fmt(by_layer.get(layer, {}).get(key)) for key, _ in keys for by_layer in rows]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return [*lines, ""]


# --- the command --------------------------------------------------------------------------------------
def _unique_labels(runs: list[dict]) -> None:
    """Disambiguate equal labels with the run directory's name, then with a number."""
    for key in (lambda r: Path(r["run_dir"]).name, lambda r: str(runs.index(r) + 1)):
        counts = defaultdict(int)
        for r in runs:
            counts[r["label"]] += 1
        for r in runs:
            if counts[r["label"]] > 1:
                r["label"] = f"{r['label']} ({key(r)})"


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "analysis"
    return Path(f"analysis-compare-{time.strftime('%Y%m%d-%H%M%S')}")


def analyze(run_dirs: Sequence[str | Path], out: str | Path | None = None,
            options: AnalyzeOptions | None = None) -> dict:
    """Analyse each run, write the PNGs, ``report.md`` and ``metrics.json`` to ``out``; returns the payload.

    Runs without routers are skipped with their reason (in the report too); if none is left this raises
    ``NotAnalysable``.
    """
    options = options or AnalyzeOptions()
    started = time.time()
    with analysis_threads(options.threads) as threads:
        runs, projections, skipped = _analyse_all([Path(d) for d in run_dirs], options)
    out = Path(out) if out is not None else default_out_dir([Path(d) for d in run_dirs])
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing figures to {out}/", flush=True)
    files = make_figures(runs, projections, out)
    payload = {"runs": runs, "skipped": skipped, "options": asdict(options), "threads": threads,
               "definitions": DEFINITIONS, "figures": files, "seconds": time.time() - started}
    (out / METRICS_NAME).write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    (out / REPORT_NAME).write_text(report_markdown(payload, files))
    print(f"analysis written to {out}/ ({REPORT_NAME}, {METRICS_NAME}, {sum(map(len, files.values()))} figures) "
          f"in {payload['seconds']:.0f} s")
    return payload


def _analyse_all(run_dirs: list[Path], options: AnalyzeOptions) -> tuple[list[dict], list[dict | None], list[dict]]:
    """(metrics per analysed run, their projection data, skipped runs with reasons)."""
    runs, projections, skipped = [], [], []
    for run_dir in run_dirs:
        reason = skip_reason(run_dir)
        if reason is None:
            try:
                metrics, projection = analyse_run(run_dir, options)
            except NotAnalysable as err:
                reason = str(err)
        if reason is not None:
            print(f"comoe analyze: skipping {run_dir}: {reason}")
            skipped.append({"run_dir": str(run_dir), "reason": reason})
            continue
        runs.append(metrics)
        projections.append(projection)
    if not runs:
        raise NotAnalysable("nothing to analyse: " + "; ".join(f"{s['run_dir']}: {s['reason']}" for s in skipped))
    _unique_labels(runs)
    return runs, projections, skipped


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `comoe analyze`."""
    defaults = AnalyzeOptions()
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="directories written by `comoe train` (e.g. CoMoE and the same run with λ = 0)")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/analysis for one run, "
                                      "analysis-compare-<time> for several)")
    parser.add_argument("--test-per-task", type=_optional_int, default=defaults.test_per_task,
                        help=f"test examples per task, 'none' for all (default: {defaults.test_per_task})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=None, help="token limit per example (default: the run's)")
    parser.add_argument("--samples", type=int, default=defaults.samples,
                        help=f"tokens per module whose expert outputs are kept for redundancy (default: {defaults.samples})")
    parser.add_argument("--projection-samples", type=int, default=defaults.projection_samples,
                        help=f"tokens kept for the 2-D projection (default: {defaults.projection_samples})")
    parser.add_argument("--layer", type=int, default=None, help="layer of the 2-D projection (default: the middle one)")
    parser.add_argument("--module", default=defaults.module, help=f"module of the 2-D projection (default: {defaults.module})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's, or 1 when the machine is already busy)")
    parser.add_argument("--no-tsne", action="store_true", help="skip t-SNE even when scikit-learn is installed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def run_analyze(args: argparse.Namespace) -> int:
    """Entry point of `comoe analyze`; returns the exit status."""
    options = AnalyzeOptions(
        test_per_task=args.test_per_task, batch_size=args.batch_size, max_length=args.max_length,
        samples=args.samples, projection_samples=args.projection_samples, layer=args.layer, module=args.module,
        seed=args.seed, progress=not args.no_progress, tsne=not args.no_tsne, threads=args.threads,
    )
    for name in ("batch_size", "samples", "projection_samples", "threads"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    analyze(args.run_dirs, args.out, options)
    return 0
