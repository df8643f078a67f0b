"""``report.md`` of `comoe analyze`: the comparison tables, the figures inline, the per-layer table and the
definitions."""

from __future__ import annotations

from comoe.analysis.metrics import DEFINITIONS


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
