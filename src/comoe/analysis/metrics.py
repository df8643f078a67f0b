"""The specialisation numbers of `comoe analyze`, from routing records and sampled expert outputs.

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

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from comoe.model import layer_index

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
    values = [
        _cka_from_grams(grams[i], grams[j]) for i in range(len(grams)) for j in range(i + 1, len(grams))
    ]
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
def module_metrics(
    name: str, stats: dict, outputs: torch.Tensor | None, positives: int, negatives: int
) -> dict:
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


SCALARS = (
    "nmi",
    "nmi_sets",
    "entropy",
    "entropy_normalized",
    "cv",
    "cosine",
    "cka",
    "contrastive_loss",
    "infonce_bound",
    "pos_cos",
    "neg_cos",
)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def layer_rows(modules: dict[str, dict]) -> list[dict]:
    """Per layer (sorted), the mean of each scalar over the layer's modules."""
    by_layer: dict[int, list[dict]] = defaultdict(list)
    for module in modules.values():
        by_layer[module["layer"] if module["layer"] is not None else -1].append(module)
    return [
        {"layer": layer, "modules": len(group), **{key: _mean([m[key] for m in group]) for key in SCALARS}}
        for layer, group in sorted(by_layer.items())
    ]


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
