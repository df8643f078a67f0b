"""The summary of a grid's finished runs: per-variant tables, paired differences, and its Markdown."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from comoe.experiments.stats import correct_vectors, mean_std, paired_bootstrap

SPECIALISATION = {
    "nmi": "NMI",
    "nmi_sets": "NMI of top-k sets",
    "cosine": "expert cosine",
    "cka": "CKA",
    "contrastive_loss": "L_con",
    "infonce_bound": "log N − L_con",
}
MAJORITY = "majority class"


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
    per_seed = [
        x["adapter"]["macro"]["accuracy"] - y["adapter"]["macro"]["accuracy"]
        for x, y in zip(a, b, strict=True)
    ]
    point, low, high = paired_bootstrap(
        [correct_vectors(m, tasks) for m in a], [correct_vectors(m, tasks) for m in b]
    )
    return {
        "seeds": seeds,
        "per_seed": per_seed,
        "mean": point,
        "ci95": [low, high],
        "significant": not (low <= 0.0 <= high),
    }


def summarise_grid(finished: list[dict[str, Any]], reference: str | list[str] | None) -> dict[str, Any]:
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
        row = {
            "variant": variant,
            "setting": setting,
            "seeds": [m["seed"] for m in runs],
            "tasks": {},
            "trainable": runs[0].get("trainable"),
            "trainable_pct": 100 * runs[0]["trainable"] / runs[0]["total_params"],
            "train_minutes": mean_std([training_seconds(m) / 60 for m in runs]),
            "run_minutes": mean_std([m["train_seconds"] / 60 for m in runs]),
        }
        for t in tasks:
            row["tasks"][t] = mean_std([m["adapter"]["tasks"][t]["accuracy"] for m in runs])
        row["average"] = mean_std([m["adapter"]["macro"]["accuracy"] for m in runs])
        row["modal_share"] = mean_std([modal_share(m) for m in runs])
        base = [m["base"]["macro"]["accuracy"] for m in runs if "base" in m]
        row["base_average"] = float(np.mean(base)) if base else None
        # the majority class comes from each seed's training sample, so it can differ between seeds
        row["majority_average"] = mean_std([m["majority"]["macro"]["accuracy"] for m in runs])
        analysed = [m["specialisation"] for m in runs if m.get("specialisation")]
        row["specialisation"] = {
            key: mean_std([a[key] for a in analysed])
            for key in SPECIALISATION
            if analysed and all(a.get(key) is not None for a in analysed)
        }
        rows.append(row)
    differences = []
    for ref in references(reference):
        for (variant, setting), runs in by_variant.items():
            ref_runs = by_variant.get((ref, setting))
            mirrored = any(
                d["variant"] == ref and d["reference"] == variant and d["setting"] == setting
                for d in differences
            )
            if ref_runs and variant != ref and not mirrored:
                difference = paired_difference(runs, ref_runs)
                if difference is not None:
                    differences.append(
                        {"variant": variant, "reference": ref, "setting": setting, **difference}
                    )
    for (variant, setting), runs in by_variant.items():  # the paper's MT-vs-ST question, per variant
        multi = by_variant.get((variant, "multi"))
        if setting == "single" and multi:
            difference = paired_difference(runs, multi)
            if difference is not None:
                differences.append(
                    {"variant": variant, "reference": f"{variant} (multi)", "setting": setting, **difference}
                )
    for (variant, setting), runs in by_variant.items():
        majority = [majority_run(m) for m in runs]
        if all(majority):
            difference = paired_difference(runs, majority)
            if difference is not None:
                differences.append(
                    {"variant": variant, "reference": MAJORITY, "setting": setting, **difference}
                )
    return {"rows": rows, "differences": differences}


def to_markdown(summary: dict[str, Any], command: str, machine: str) -> str:
    rows = summary["rows"]
    if not rows:
        return "No finished runs.\n"
    tasks = list(rows[0]["tasks"])
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {machine}",
        "",
        "Accuracy (%) on the test sets, mean ± std over seeds:",
        "",
        "| variant | setting | seeds | "
        + " | ".join(tasks)
        + " | average | modal answer | trainable | train min | train + eval min |",
        "|" + "---|" * (len(tasks) + 8),
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['setting']} | {len(r['seeds'])} | "
            + " | ".join(pct(r["tasks"][t]) for t in tasks)
            + f" | **{pct(r['average'])}** | {pct(r['modal_share'])} | {r['trainable']:,} ({r['trainable_pct']:.2f}%) "
            f"| {r['train_minutes'][0]:.1f} | {r['run_minutes'][0]:.1f} |"
        )
    lines += [
        "",
        "*modal answer*: share of each task's test predictions that are its most frequent prediction "
        "(100 = one constant answer per task), averaged over tasks.",
    ]
    base = next((r["base_average"] for r in rows if r["base_average"] is not None), None)
    majority = rows[0]["majority_average"]
    lines += [
        "",
        (f"Zero-shot base average: {100 * base:.1f}; " if base is not None else "")
        + f"majority class average (the training sample's most frequent answer per task): {pct(majority)}.",
    ]
    analysed = [r for r in rows if r.get("specialisation")]
    if analysed:
        lines += [
            "",
            "Specialisation (`comoe analyze`: means over adapted modules, then mean ± std over seeds; "
            "runs without routers are left out):",
            "",
            "| variant | setting | " + " | ".join(SPECIALISATION.values()) + " |",
            "|" + "---|" * (len(SPECIALISATION) + 2),
        ]
        for r in analysed:
            cells = [
                f"{r['specialisation'][k][0]:.3f} ± {r['specialisation'][k][1]:.3f}"
                if k in r["specialisation"]
                else "—"
                for k in SPECIALISATION
            ]
            lines.append(f"| {r['variant']} | {r['setting']} | " + " | ".join(cells) + " |")
    if summary["differences"]:
        lines += [
            "",
            "Paired differences in average accuracy (points; 95% CI: bootstrap over test examples and seeds):",
            "",
            "| variant − reference | setting | per seed | mean | 95% CI | significant |",
            "|---|---|---|---|---|---|",
        ]
        for d in summary["differences"]:
            seeds = ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"])
            lines.append(
                f"| {d['variant']} − {d['reference']} | {d['setting']} | {seeds} | {100 * d['mean']:+.2f} | "
                f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] | {'yes' if d['significant'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"
