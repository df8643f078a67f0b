"""Statistics of a grid: mean ± std over seeds and the paired bootstrap over seeds and test examples."""

from __future__ import annotations

from typing import Any

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def correct_vectors(metrics: dict[str, Any], tasks: list[str]) -> dict[str, np.ndarray]:
    """Per task, 1/0 per test example for the adapter's predictions: the generated tasks' own judgements
    (``hits``: normalised exact match, or numeric match), the multiple-choice predictions against the answers."""
    block = metrics["adapter"]["tasks"]
    return {
        t: np.asarray(block[t]["hits"], dtype=bool)
        if "hits" in block[t]
        else np.asarray(block[t]["predictions"]) == np.asarray(block[t]["answers"])
        for t in tasks
    }


def paired_bootstrap(
    a_runs: list[dict[str, np.ndarray]],
    b_runs: list[dict[str, np.ndarray]],
    samples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Macro-average accuracy difference a − b over paired seeds; 95% CI from resampling test examples
    (within each task, shared by both arms) and seeds.

    Vectorised: a resample of a task's n examples is drawn as its multinomial counts, so one matrix
    product gives every seed's resampled mean for every bootstrap sample at once.
    """
    rng = np.random.default_rng(seed)
    tasks = list(a_runs[0])
    n_seeds = len(a_runs)
    diff = [
        np.stack([a[t].astype(float) - b[t].astype(float) for a, b in zip(a_runs, b_runs, strict=True)])
        for t in tasks
    ]  # per task: (seeds, examples)
    point = float(np.mean([d.mean() for d in diff]))
    seeds = rng.integers(0, n_seeds, (samples, n_seeds))  # the same seed resample for every task
    columns = np.arange(samples)[:, None]
    stats = np.zeros(samples)
    for d in diff:
        n = d.shape[1]
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=samples)  # (samples, examples)
        per_seed = d @ counts.T / n  # (seeds, samples): each seed's mean over each example resample
        stats += per_seed[seeds, columns].mean(axis=1)
    stats /= len(diff)
    low, high = np.percentile(stats, [2.5, 97.5])
    return point, float(low), float(high)
