"""The figures and ``report.md`` of `comoe analyze`."""

from __future__ import annotations

import math
import re
from pathlib import Path

from comoe.analysis.metrics import DEFINITIONS


# --- figures and report ------------------------------------------------------------------------------
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


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


SUMMARY_COLUMNS = (
    ("accuracy", "accuracy"),
    ("nmi", "NMI"),
    ("nmi_sets", "NMI (sets)"),
    ("entropy", "entropy"),
    ("cv", "load CV"),
    ("cosine", "cosine"),
    ("cka", "CKA"),
    ("contrastive_loss", "L_con"),
    ("infonce_bound", "log N − L_con"),
)


def report_markdown(payload: dict, files: dict[str, list[str]]) -> str:
    """report.md: the comparison table, every figure inline, the per-layer table and the definitions."""
    runs = payload["runs"]
    lines = ["# Expert specialisation report", ""]
    lines += [
        f"Runs analysed on up to {payload['options']['test_per_task']} test examples per task, in "
        f"{payload['seconds']:.0f} s ({payload['threads']} CPU thread(s) where on the CPU). Values are means over adapted modules (per layer: over the modules "
        "of that layer). Definitions at the end; every number is in `metrics.json`.",
        "",
        "Specialised experts show as a high NMI (routing depends on the task), low redundancy (cosine and "
        "CKA between experts' outputs on the same tokens) and a positive InfoNCE bound (activated experts "
        "agree more with each other than with the inactive ones).",
        "",
    ]
    lines += _runs_table(runs) + _summary_table(runs) + _skipped(payload["skipped"])
    sections = [
        (
            "load",
            "Per-task expert load (paper Fig. 4)",
            "Share of each task's tokens that activate each expert, summed over layers (per module type and "
            "over all modules). Expert ids only mean something within one module, so this aggregate can hide "
            "specialisation that the per-module NMI below shows.",
        ),
        (
            "load_by_layer",
            "Per-task expert load by layer",
            "Per run, one heatmap per module type: layers × experts, one block of expert columns per task and a "
            "last block for all tasks together.",
        ),
        ("nmi", "Specialisation: NMI between task and routing", DEFINITIONS["nmi"] + "."),
        ("balance", "Routing entropy and load balance", ""),
        (
            "redundancy",
            "Redundancy between experts",
            "Cosine and linear CKA of expert outputs on the same tokens.",
        ),
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
    lines = [
        "## Runs",
        "",
        "| run | directory | experts | top-k | tasks | test examples | tokens |",
        "|---" * 7 + "|",
    ]
    for r in runs:
        lines.append(
            f"| {r['label']} | `{r['run_dir']}` | {r['num_experts']} | {r['top_k']} | {len(r['tasks'])} | "
            f"{sum(r['examples_per_task'].values())} | {int(sum(r['tokens_per_task']))} |"
        )
    return [*lines, ""]


def _summary_table(runs: list[dict]) -> list[str]:
    header = "| run | " + " | ".join(title for _, title in SUMMARY_COLUMNS) + " |"
    lines = ["## Comparison", "", header, "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"]
    for r in runs:
        cells = [
            _fmt(r["accuracy"]) if key == "accuracy" else _fmt(r["summary"][key])
            for key, _ in SUMMARY_COLUMNS
        ]
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
