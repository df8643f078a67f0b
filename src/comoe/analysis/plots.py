"""Figures of `comoe analyze`, drawn from the per-run metric dictionaries that go into ``metrics.json``.

Every function takes plain data (lists and dicts as :mod:`comoe.analysis.metrics` writes them), draws with
matplotlib's Agg backend (no display needed) and writes one PNG. Several runs are overlaid or put side by
side, labelled with their run labels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from comoe.utils.files import atomic_path  # noqa: E402

DPI = 110
RUN_COLORS = plt.get_cmap("tab10").colors
LOAD_CMAP = "viridis"


def _save(fig, path: Path) -> Path:
    # the figures use constrained layout: no second, "tight" draw needed
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def _short(task: str, width: int = 16) -> str:
    return task if len(task) <= width else task[: width - 1] + "…"


def _wrap(name: str, width: int = 13) -> str:
    """A task name over at most two lines, broken after an underscore, so narrow panel titles stay apart."""
    if len(name) <= width:
        return name
    cut = name.rfind("_", 0, width)
    if cut <= 0:
        return _short(name, width)
    return name[: cut + 1] + "\n" + _short(name[cut + 1 :], width)


def _annotate(ax, values: np.ndarray, fmt: str = "{:.2f}", threshold: float = 0.7) -> None:
    """Write each cell's value on a heatmap (dark text on light cells, light text on dark ones)."""
    for (i, j), value in np.ndenumerate(values):
        ax.text(
            j,
            i,
            fmt.format(value),
            ha="center",
            va="center",
            fontsize=8,
            color="black" if value > threshold else "white",
        )


# --- per-task expert load ---------------------------------------------------------------------------
def load_overview(runs: Sequence[dict], path: Path) -> Path:
    """Per-task activation frequency of each expert, summed over layers: one row of heatmaps per run,
    one column per module type and one for all modules (the paper's Fig. 4)."""
    kinds = list(runs[0]["load"])
    n_rows, n_cols = len(runs), len(kinds)
    n_tasks, n_exp = np.asarray(runs[0]["load"][kinds[0]]).shape
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        squeeze=False,
        layout="constrained",
        figsize=(1.0 + n_cols * (0.55 * n_exp + 1.2), 0.6 + n_rows * (0.38 * n_tasks + 1.0)),
    )
    image = None
    for row, run in enumerate(runs):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            values = np.asarray(run["load"].get(kind, np.full((n_tasks, n_exp), np.nan)), dtype=float)
            image = ax.imshow(values, cmap=LOAD_CMAP, vmin=0.0, vmax=1.0, aspect="auto")
            _annotate(ax, values)
            ax.set_xticks(range(values.shape[1]), [f"E{e}" for e in range(values.shape[1])])
            ax.set_yticks(range(values.shape[0]))
            ax.set_yticklabels([_short(t) for t in run["tasks"]] if col == 0 else [])
            ax.set_title(kind if row == 0 else "", fontsize=10)
            if col == 0:
                ax.set_ylabel(run["label"], fontsize=10, fontweight="bold")
            if row == n_rows - 1:
                ax.set_xlabel("expert")
    fig.colorbar(image, ax=axes, shrink=0.9, label="activation frequency")
    fig.suptitle(
        "Per-task expert load summed over layers: share of a task's tokens that activate each expert\n"
        "(expert ids are per module, so this aggregate can hide specialisation: see the NMI plot)",
        fontsize=10,
    )
    return _save(fig, path)


def load_by_layer(run: dict, path: Path) -> Path:
    """Per module type, one heatmap of layers × (task, expert) activation frequencies: a block of E columns
    per task and a last block for all tasks together. One axes per module type keeps this fast to draw."""
    kinds = [k for k in run["load"] if k != "all"]
    columns = [*run["tasks"], "all tasks"]
    grids = {kind: _layer_grid(run, kind) for kind in kinds}
    n_layers = max(len(layers) for layers, _ in grids.values())
    n_exp = next(iter(grids.values()))[1].shape[2]
    n_cols = 1 if len(kinds) == 1 else 2
    n_rows = math.ceil(len(kinds) / n_cols)
    width = len(columns) * n_exp
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        squeeze=False,
        layout="constrained",
        figsize=(1.5 + n_cols * (0.17 * width + 1.0), 0.8 + n_rows * (0.13 * n_layers + 1.6)),
    )
    image = None
    for ax, kind in zip(axes.flat, kinds, strict=False):
        layers, freq = grids[kind]  # (L, T+1, E)
        image = ax.imshow(
            freq.reshape(len(layers), -1),
            cmap=LOAD_CMAP,
            vmin=0.0,
            vmax=1.0,
            aspect="auto",
            interpolation="nearest",
        )
        for boundary in range(n_exp, width, n_exp):
            ax.axvline(boundary - 0.5, color="white", linewidth=2)
        ax.set_xticks(range(width), [str(e) for _ in columns for e in range(n_exp)], fontsize=6)
        step = max(1, math.ceil(len(layers) / 10))
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
        ax.set_ylabel("layer")
        ax.set_xlabel("expert, grouped by task")
        top = ax.secondary_xaxis("top")
        top.set_xticks(
            [i * n_exp + (n_exp - 1) / 2 for i in range(len(columns))],
            [_wrap(c) for c in columns],
            fontsize=7,
        )
        top.tick_params(length=0)
        ax.set_title(kind, fontsize=10, fontweight="bold")
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="activation frequency")
    fig.suptitle(f"{run['label']}: expert activation frequency per layer and task")
    return _save(fig, path)


def _layer_grid(run: dict, kind: str) -> tuple[list[int], np.ndarray]:
    """(layer ids, (L, T+1, E) activation frequencies) of the modules of one type; the last column
    pools all tasks."""
    rows = sorted((m["layer"], m) for m in run["modules"].values() if m["type"] == kind)
    layers = [layer for layer, _ in rows]
    grid = []
    for _, module in rows:
        per_task = np.asarray(module["activation"], dtype=float)
        grid.append(np.vstack([per_task, np.asarray(module["activation_all"], dtype=float)[None]]))
    return layers, np.stack(grid)


# --- per-layer curves ----------------------------------------------------------------------------------
def layer_curves(runs: Sequence[dict], panels: Sequence[dict], path: Path, title: str) -> Path:
    """Per-layer metrics, one panel each, every run overlaid.

    ``panels``: dicts with ``keys`` (metric names in each run's ``layers`` rows, drawn solid, dashed,
    dotted), ``ylabel``, ``title`` and optionally ``ylim`` and ``hlines`` ([(y, label)]).
    """
    fig, axes = plt.subplots(
        1, len(panels), squeeze=False, figsize=(1.0 + 4.6 * len(panels), 3.8), layout="constrained"
    )
    styles = ("-", "--", ":", "-.")
    for ax, panel in zip(axes[0], panels, strict=True):
        for color, run in zip(itertools.cycle(RUN_COLORS), runs, strict=False):
            layers = [row["layer"] for row in run["layers"]]
            for style, key in zip(styles, panel["keys"], strict=False):
                values = [np.nan if row.get(key) is None else row[key] for row in run["layers"]]
                if all(np.isnan(values)):
                    continue
                label = run["label"] if len(panel["keys"]) == 1 else f"{run['label']} · {key}"
                ax.plot(layers, values, style, color=color, marker="o", markersize=3, label=label)
        for y, text in panel.get("hlines", []):
            ax.axhline(y, color="grey", linewidth=0.8, linestyle=":")
            ax.annotate(
                text, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, color="grey", va="bottom"
            )
        if panel.get("ylim"):
            ax.set_ylim(*panel["ylim"])
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


# --- 2-D projection of expert outputs ------------------------------------------------------------------
def projection(panels: Sequence[dict], path: Path, title: str) -> Path:
    """Scatter of 2-D projected expert outputs coloured by expert; one panel per (run, method).

    ``panels``: dicts with ``title``, ``points`` (M, 2), ``experts`` (M,) expert id of each point,
    ``active`` (M,) bool (the expert was among the token's top-k), ``xlabel``, ``ylabel``.
    """
    n_cols = min(len(panels), 3)
    n_rows = math.ceil(len(panels) / n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, squeeze=False, figsize=(0.5 + 4.6 * n_cols, 0.6 + 4.3 * n_rows), layout="constrained"
    )
    for ax, panel in zip(axes.flat, panels, strict=False):
        points, experts = np.asarray(panel["points"]), np.asarray(panel["experts"])
        active = np.asarray(panel["active"], dtype=bool)
        for expert in sorted(set(experts.tolist())):
            color = RUN_COLORS[expert % len(RUN_COLORS)]
            on = (experts == expert) & active
            off = (experts == expert) & ~active
            ax.scatter(points[off, 0], points[off, 1], s=7, color=color, alpha=0.18, linewidths=0)
            ax.scatter(
                points[on, 0],
                points[on, 1],
                s=9,
                color=color,
                alpha=0.85,
                linewidths=0,
                label=f"expert {expert}",
            )
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel.get("xlabel", "component 1"))
        ax.set_ylabel(panel.get("ylabel", "component 2"))
        ax.legend(fontsize=7, markerscale=2, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        title + "\n(strong colour: the expert was activated for that token; faint: inactive)", fontsize=10
    )
    return _save(fig, path)
