"""The figures of `comoe analyze`: every PNG, named by run and section."""

from __future__ import annotations

import math
import re
from pathlib import Path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text.replace("λ", "lambda")).strip("_")


def make_figures(runs: list[dict], projections: list[dict | None], out: Path) -> dict[str, list[str]]:
    """Write every PNG; returns section name -> file names (relative to ``out``)."""
    from comoe.analysis import plots

    files: dict[str, list[str]] = {}
    files["load"] = [plots.load_overview(runs, out / "load_overview.png").name]
    files["load_by_layer"] = [
        plots.load_by_layer(r, out / f"load_by_layer_{_slug(r['label'])}.png").name for r in runs
    ]
    nmi_ref = [(1.0, "task ↔ expert fully determined")]
    files["nmi"] = [
        plots.layer_curves(
            runs,
            [
                {
                    "keys": ["nmi"],
                    "ylabel": "NMI",
                    "title": "task vs chosen expert",
                    "ylim": (0, 1.05),
                    "hlines": nmi_ref,
                },
                {
                    "keys": ["nmi_sets"],
                    "ylabel": "NMI",
                    "title": "task vs chosen top-k expert set",
                    "ylim": (0, 1.05),
                    "hlines": nmi_ref,
                },
            ],
            out / "nmi.png",
            "Specialisation: normalised mutual information between task and routing",
        ).name
    ]
    log_e = math.log(runs[0]["num_experts"])
    files["balance"] = [
        plots.layer_curves(
            runs,
            [
                {
                    "keys": ["entropy"],
                    "ylabel": "entropy (nats)",
                    "title": "router entropy per token",
                    "hlines": [(log_e, f"log E = {log_e:.2f} (uniform)")],
                },
                {"keys": ["cv"], "ylabel": "CV of expert load", "title": "load imbalance (0 = balanced)"},
            ],
            out / "balance.png",
            "Routing entropy and load balance",
        ).name
    ]
    files["redundancy"] = [
        plots.layer_curves(
            runs,
            [
                {
                    "keys": ["cosine"],
                    "ylabel": "mean pairwise cosine",
                    "title": "expert outputs, same tokens",
                    "hlines": [(1.0, "identical"), (0.0, "orthogonal")],
                },
                {
                    "keys": ["cka"],
                    "ylabel": "mean pairwise linear CKA",
                    "title": "expert output representations",
                    "hlines": [(1.0, "identical")],
                },
            ],
            out / "redundancy.png",
            "Redundancy between experts",
        ).name
    ]
    if any(r["summary"]["contrastive_loss"] is not None for r in runs):
        files["contrastive"] = [
            plots.layer_curves(
                runs,
                _contrastive_panels(runs),
                out / "contrastive.png",
                "Contrastive loss and the InfoNCE bound on the MI gap",
            ).name
        ]
    files["projection"] = _projection_figures(runs, projections, out)
    return files


def _contrastive_panels(runs: list[dict]) -> list[dict]:
    run = runs[0]
    chance = math.log((run["positives"] + run["negatives"]) / max(run["positives"], 1))
    return [
        {
            "keys": ["contrastive_loss"],
            "ylabel": "L_con",
            "title": "contrastive loss (eval)",
            "hlines": [(chance, f"chance = log((P+M)/P) = {chance:.2f}")],
        },
        {
            "keys": ["infonce_bound"],
            "ylabel": "log N − L_con (nats)",
            "title": "InfoNCE bound on ΔI",
            "hlines": [(0.0, "chance"), (chance, "max = log N")],
        },
        {
            "keys": ["pos_cos", "neg_cos"],
            "ylabel": "cosine",
            "title": "anchor–positive (solid) / –negative (dashed)",
        },
    ]


def _projection_figures(runs: list[dict], projections: list[dict | None], out: Path) -> list[str]:
    from comoe.analysis import plots

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
            panels.append(
                {
                    "title": f"{run['label']} — {run['projection']['tokens']} tokens",
                    "points": proj[method],
                    "experts": proj["experts"],
                    "active": proj["active"],
                    "xlabel": xlabel,
                    "ylabel": ylabel,
                }
            )
        if panels:
            name = f"projection_{method}_{_slug(module)}.png"
            plots.projection(
                panels, out / name, f"Expert outputs of {module} ({method.upper()}), coloured by expert"
            )
            files.append(name)
    return files


def _axis_labels(method: str, variance: list[float]) -> tuple[str, str]:
    if method == "pca":
        return tuple(f"PC{i + 1} ({100 * v:.0f}% of variance)" for i, v in enumerate(variance))
    return "t-SNE 1", "t-SNE 2"
