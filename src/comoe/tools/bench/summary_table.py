"""The summary table of BENCHMARKS.md: every run and case as ratios to PEFT LoRA."""

from __future__ import annotations

from comoe.tools.bench.cells import times
from comoe.tools.bench.measure import paired_ratio


def _summary_pair(rows: dict, auto_path: str) -> tuple[str, str, str]:
    """(expert kind, our variant, the same with the contrastive term) of one case."""
    if "ours-ffn" in rows:
        return "FFN", "ours-ffn", "ours-ffn-con"
    if "ours-dora" in rows and "ours-con-gram" not in rows:
        return "DoRA", "ours-dora", "ours-dora-con"
    ours = {"dense": "ours-dense", "grouped": "ours-grouped"}.get(auto_path, "ours-dense")
    return "LoRA", ours, "ours-con-gram"


def _overhead(rows: dict, ours: str, con: str) -> float | None:
    """The contrastive term's step overhead: median of the per-round ratios con / ours, minus 1."""
    if rows.get(con, {}).get("x_ours_same_path") is not None:
        return rows[con]["x_ours_same_path"] - 1.0
    if con in rows and ours in rows and rows[con].get("times_ms") and rows[ours].get("times_ms"):
        return paired_ratio(rows[con]["times_ms"], rows[ours]["times_ms"]) - 1.0
    return None


def _setting(result: dict) -> str:
    s, spec = result["settings"], result["spec"]
    where = "GPU" if s["device"] == "cuda" else "CPU"
    autocast = f", {s['autocast']} autocast" if s.get("autocast") else ""
    return f"hidden {spec['hidden']}, {where}{autocast}" + (", compiled" if s.get("compiled") else "")


def render_summary(results: list[dict]) -> list[str]:
    """One table of every run and case: our step time, activation memory, the contrastive term's overhead and
    generation speed, as ratios to PEFT LoRA measured in the same process."""
    head = [
        "run",
        "setting",
        "tokens/step",
        "experts",
        "step × LoRA",
        "saved activations × LoRA",
        "contrastive adds to the step",
        "saved activations with contrastive × LoRA",
        "generate tokens/s × LoRA",
    ]
    lines = [
        "## Summary",
        "",
        "Every run and case below, as ratios to PEFT LoRA of the same rank on the same modules, measured in the "
        "same process (top-2, the default dense path; DoRA and FFN rows compare their own expert kind). "
        "'contrastive adds' is the contrastive term's extra step time over the same layers without it; "
        "'–' where the run did not measure it.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in results:
        for case in r["cases"]:
            rows = case.get("variants")
            if not rows:
                continue
            kind, ours, con = _summary_pair(rows, case.get("auto_path", "dense"))
            o = _overhead(rows, ours, con)
            gen = case.get("generate", {}).get("variants", {}).get(ours, {})
            cells = [
                f"`{r['name']}`",
                _setting(r),
                f"{r['settings']['tokens_per_step']:,}",
                f"{kind}, E = {case['experts']}, r = {case['rank']}",
                times(rows.get(ours, {}).get("x_lora")),
                times(rows.get(ours, {}).get("mem_x_lora")),
                "–" if o is None else f"{100 * o:+.1f} %",
                times(rows.get(con, {}).get("mem_x_lora")),
                times(gen.get("tps_x_lora")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines
