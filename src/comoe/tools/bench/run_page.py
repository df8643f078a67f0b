"""One `comoe bench` result as Markdown: its command, settings, each case's timing and memory table,
generation, the same-function and compile checks, and the targets it judges."""

from __future__ import annotations

from comoe.tools.bench.cells import number, ratio_band, ratio_cell, target_table
from comoe.tools.bench.thresholds import evaluate_targets


def render_result(result: dict) -> str:
    """One run as markdown: command, settings, the timing/memory table, generation, checks, targets."""
    s, spec, m = result["settings"], result["spec"], result["machine"]
    lines = [f"### `{result['name']}`: {spec['description'] or result['size']}", ""]
    lines += ["```", result["command"], "```", ""]
    lines.append(
        f"Model: hidden {spec['hidden']}, intermediate {spec['intermediate']}, {spec['layers']} layers, "
        f"{spec['heads']}/{spec['kv_heads']} heads, vocab {spec['vocab']} ({result['weights']}). "
        f"Batch {s['batch']}×{s['seq']} = {s['tokens_per_step']} tokens/step, {s['dtype']} on {s['device']}"
        + (f" under {s['autocast']} autocast (adapters in float32), " if s.get("autocast") else ", ")
        + ("every variant's decoder layers compiled (`--compile`), " if s.get("compiled") else "")
        + f"adapters on {', '.join(s['target_modules'])}, top-{s['top_k']}, dropout {s['lora_dropout']}, "
        f"α = 2r, AdamW step included. {s['warmup']} warm-up + {s['steps']} timed rounds, variants alternated "
        f"round-robin, {s.get('threads', '?')} torch thread(s). Ratios are medians of the per-round ratios, in "
        f"brackets their quartiles. Run took {result.get('elapsed_s', '?')} s wall, "
        f"{result.get('cpu_s', '?')} s CPU; load average at start {m.get('load_avg_start', '?')}."
    )
    if result.get("partial"):
        lines.append(
            f"**Stopped early**: this result holds the first {result['partial']} it was asked for (a time "
            "limit ended the run)."
        )
    lines.append("")
    for case in result["cases"]:
        lines += _render_case(case, s["device"])
    check = result.get("checks", {}).get("compile")
    if check:
        lines += [
            "",
            f"**torch.compile check** ({check['config']}; backend `{check['backend']}`; loss and every "
            f"adapter gradient vs eager; then {check['warmup']} warm-up + {check['steps']} alternated rounds "
            "of compiled, the same model eager, and the naive loop with λ = 0 and dropout 0):",
            "",
            "| path | compiles and runs | matches eager | loss abs. diff | max grad abs. diff (grad scale) "
            "| first call s |",
            "|---|---|---|---|---|---|",
        ]
        timed = {}
        for path, e in check["paths"].items():
            if e.get("works"):
                lines.append(
                    f"| {path} | yes | {'yes' if e['matched'] else 'NO'} | {e['loss_abs_diff']:.1e} | "
                    f"{e['grad_max_abs_diff']:.1e} ({e['grad_scale']:.1e}) | {e['compile_s']} |"
                )
                if e.get("timing"):
                    timed[path] = e
            else:
                lines.append(
                    f"| {path} | **NO**: {e.get('error', '')[:200].rstrip(chr(39) + ')')} | – | – | – | – |"
                )
        for path, e in timed.items():
            t = e["timing"]
            lines += [
                "",
                f"Training step on the {path} path, compiled vs eager vs the naive loop (λ = 0):",
                "",
                "| | naive | ours eager | ours compiled | ours + Gram loss eager | ours + Gram loss compiled |",
                "|---|---|---|---|---|---|",
                "| step ms (median) | "
                + " | ".join(
                    number(t[n]["median_ms"], 1)
                    for n in ("naive", "eager", "compiled", "eager+con", "compiled+con")
                )
                + " |",
                f"| × naive | 1.00× | {number(e['eager_x_naive'], 2, '×')} | {number(e['compiled_x_naive'], 2, '×')} | – "
                f"| {number(e['compiled_con_x_naive'], 2, '×')} |",
                f"| compiled × eager | | | {number(e['compiled_x_eager'], 2, '×')} | | "
                f"{number(e['compiled_con_x_eager_con'], 2, '×')} |",
            ]
    result["targets"] = evaluate_targets(result)  # re-judged at render time, so old results follow the rules
    if result["targets"]:
        lines += ["", "Targets judged by this run:", "", *target_table(result["targets"])]
    return "\n".join(lines) + "\n"


def _render_case(case: dict, device: str) -> list[str]:
    lines = [
        f"**E = {case['experts']} experts, r = {case['rank']}, top-{case['top_k']}** "
        f"(`expert_path='auto'` picks {case['auto_path']} here)",
        "",
    ]
    if case.get("error"):
        return lines + [f"Failed: {case['error']}", ""]
    rows = case["variants"]
    refs = [r for r in ("base", "lora", "naive") if r in rows]
    mem = any("saved_bytes" in r for r in rows.values())
    peak = any(r.get("peak_bytes") is not None for r in rows.values())
    syncs = any(r.get("host_syncs") is not None for r in rows.values())
    con = any("x_ours_same_path" in r for r in rows.values())
    head = ["variant", "path", "step ms (median)", "IQR ms", "tokens/s"]
    head += [f"time × {r}" for r in refs] + [f"tokens/s ÷ {r}" for r in refs if r != "naive"]
    head += ["con. overhead"] if con else []
    head += ["drift"]
    head += ["saved activations MiB", "× LoRA"] if mem else []
    head += ["peak MiB", "peak × LoRA"] if peak else []
    head += ["host syncs/step"] if syncs else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [
            f"{name}",
            r["path"] or "–",
            number(r["median_ms"], 1),
            number(r["iqr_ms"], 1),
            number(r["tokens_per_s"], 0),
        ]
        cells += [ratio_cell(r.get(f"x_{ref}"), ratio_band(rows, name, ref)) for ref in refs]
        cells += [
            number(1 / r[f"x_{ref}"] if r.get(f"x_{ref}") else None, 2, "×") for ref in refs if ref != "naive"
        ]
        if con:
            o = r.get("x_ours_same_path")
            same = {"dense": "ours-dense", "grouped": "ours-grouped"}.get(r["path"])
            band = ratio_band(rows, name, same) if o else None
            cells.append(
                f"{100 * (o - 1):+.1f} % ({100 * (band[0] - 1):+.0f}…{100 * (band[1] - 1):+.0f})"
                if o and band
                else (f"{100 * (o - 1):+.1f} %" if o else "–")
            )
        cells.append(number(r["drift"], 2))
        if mem:
            cells += [number(r["saved_bytes"] / 2**20, 1), number(r.get("mem_x_lora"), 2, "×")]
        if peak:
            cells += [
                number(r["peak_bytes"] / 2**20 if r.get("peak_bytes") is not None else None, 1),
                number(r.get("peak_x_lora"), 2, "×"),
            ]
        if syncs:
            cells.append(str(r.get("host_syncs", "–")))
        lines.append("| " + " | ".join(cells) + " |")
    if case.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in case["skipped"].items())]
    gen = case.get("generate")
    if gen:
        lines += [
            "",
            f"`generate` (greedy, batch {gen['batch']}, prompt {gen['prompt_len']}, "
            f"{gen['new_tokens']} new tokens, {gen.get('cache', 'dynamic')} KV cache, median of "
            f"{gen['rounds']} alternated rounds):",
            "",
            "| variant | ms | new tokens/s | ÷ base | ÷ LoRA |",
            "|---|---|---|---|---|",
        ]
        for name, g in gen["variants"].items():
            lines.append(
                f"| {name} | {number(g['median_ms'], 1)} | {number(g['tokens_per_s'], 1)} | "
                f"{number(g.get('tps_x_base'), 2, '×')} | {number(g.get('tps_x_lora'), 2, '×')} |"
            )
    par = case.get("parity")
    if par:
        diffs = ", ".join(
            f"{k.replace('_max_abs_diff', '')} {v:.1e}" for k, v in par.items() if k.endswith("diff")
        )
        line = (
            f"Same function check (eval mode, experts randomised and copied from ours-dense): max |Δ logits| "
            f"{diffs} (logit scale {par['logit_scale']:.1f}"
            + (f", tolerance {par['tolerance']:.1e}" if "tolerance" in par else "")
            + ")"
        )
        if "error_bound" in par:  # below fp32: each path judged by its error against an fp32 copy
            errors = ", ".join(
                f"{k.replace('_error_vs_fp32', '')} {v:.1e}" for k, v in par.items() if k.endswith("_vs_fp32")
            )
            free = ", ".join(
                f"{k.replace('_error_free_routing', '')} {v:.1e}"
                for k, v in par.items()
                if k.endswith("_free_routing")
            )
            line += (
                f"; max |error| against an fp32 copy routing as each path routed: {errors} (bound 1.5 × "
                f"LoRA's: {par['error_bound']:.1e}); against an fp32 copy routing on its own: {free} "
                "(tokens whose routing flips)"
            )
        lines += ["", f"{line}: {'ok' if par['ok'] else 'MISMATCH'}."]
    lines.append("")
    return lines
