"""Markdown of `comoe bench` results, and reading/writing their JSON."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from comoe.tools.bench.measure import paired_ratio
from comoe.tools.bench.run import SCHEMA_VERSION, evaluate_targets
from comoe.tools.bench.sizes import SIZES
from comoe.tools.bench.variants import VARIANT_HELP
from comoe.utils.files import write_json_atomic


# --- markdown ---------------------------------------------------------------------------------------------
def _fmt(x, digits: int = 2, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return f"{x:.{digits}f}{suffix}"


def _met(met: bool | None) -> str:
    return "–" if met is None else ("**met**" if met else "**MISSED**")


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
                    _fmt(t[n]["median_ms"], 1)
                    for n in ("naive", "eager", "compiled", "eager+con", "compiled+con")
                )
                + " |",
                f"| × naive | 1.00× | {_fmt(e['eager_x_naive'], 2, '×')} | {_fmt(e['compiled_x_naive'], 2, '×')} | – "
                f"| {_fmt(e['compiled_con_x_naive'], 2, '×')} |",
                f"| compiled × eager | | | {_fmt(e['compiled_x_eager'], 2, '×')} | | "
                f"{_fmt(e['compiled_con_x_eager_con'], 2, '×')} |",
            ]
    result["targets"] = evaluate_targets(result)  # re-judged at render time, so old results follow the rules
    if result["targets"]:
        lines += [
            "",
            "Targets judged by this run:",
            "",
            "| target | where | measured | threshold | result |",
            "|---|---|---|---|---|",
        ]
        for t in result["targets"]:
            lines.append(
                f"| {t['target']} | {t['where']} | {_target_value(t)} | {_target_threshold(t)} | {_met(t['met'])} |"
            )
    return "\n".join(lines) + "\n"


def _target_value(t: dict) -> str:
    v = t["value"]
    if v is None:
        note = t.get("note") or ""
        return ("fails: " + note[:110] + ("…" if len(note) > 110 else "")) if note else "–"
    text = f"{100 * v:+.1f} %" if _unit(t) == "%" else f"{v:.2f}×"
    return text + (f" ({t['note']})" if t.get("note") else "")


def _target_threshold(t: dict) -> str:
    if not t["threshold"]:
        return "works, matches"
    sign = "≥" if t.get("at_least") else "≤"
    return f"{sign} {100 * t['threshold']:.0f} %" if _unit(t) == "%" else f"{sign} {t['threshold']}×"


def _unit(t: dict) -> str:
    """ "%" or "x"; results written before targets carried a unit name theirs in the target's text."""
    return t.get("unit") or ("%" if "10 %" in t["target"] else "x")


def _band(rows: dict, name: str, ref: str | None) -> tuple[float, float] | None:
    """Quartiles of the per-round time ratios name/ref (the rounds are paired by position)."""
    if ref not in rows or name == ref:
        return None
    ratios = [a / b for a, b in zip(rows[name]["times_ms"], rows[ref]["times_ms"], strict=True)]
    if len(ratios) < 4:
        return None
    q = statistics.quantiles(ratios, n=4)
    return q[0], q[2]


def _ratio_cell(value: float | None, band: tuple[float, float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}× ({band[0]:.2f}–{band[1]:.2f})" if band else f"{value:.2f}×"


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
            _fmt(r["median_ms"], 1),
            _fmt(r["iqr_ms"], 1),
            _fmt(r["tokens_per_s"], 0),
        ]
        cells += [_ratio_cell(r.get(f"x_{ref}"), _band(rows, name, ref)) for ref in refs]
        cells += [
            _fmt(1 / r[f"x_{ref}"] if r.get(f"x_{ref}") else None, 2, "×") for ref in refs if ref != "naive"
        ]
        if con:
            o = r.get("x_ours_same_path")
            same = {"dense": "ours-dense", "grouped": "ours-grouped"}.get(r["path"])
            band = _band(rows, name, same) if o else None
            cells.append(
                f"{100 * (o - 1):+.1f} % ({100 * (band[0] - 1):+.0f}…{100 * (band[1] - 1):+.0f})"
                if o and band
                else (f"{100 * (o - 1):+.1f} %" if o else "–")
            )
        cells.append(_fmt(r["drift"], 2))
        if mem:
            cells += [_fmt(r["saved_bytes"] / 2**20, 1), _fmt(r.get("mem_x_lora"), 2, "×")]
        if peak:
            cells += [
                _fmt(r["peak_bytes"] / 2**20 if r.get("peak_bytes") is not None else None, 1),
                _fmt(r.get("peak_x_lora"), 2, "×"),
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
            f"{gen['new_tokens']} new tokens, KV cache, median of {gen['rounds']} alternated rounds):",
            "",
            "| variant | ms | new tokens/s | ÷ base | ÷ LoRA |",
            "|---|---|---|---|---|",
        ]
        for name, g in gen["variants"].items():
            lines.append(
                f"| {name} | {_fmt(g['median_ms'], 1)} | {_fmt(g['tokens_per_s'], 1)} | "
                f"{_fmt(g.get('tps_x_base'), 2, '×')} | {_fmt(g.get('tps_x_lora'), 2, '×')} |"
            )
    par = case.get("parity")
    if par:
        diffs = ", ".join(
            f"{k.replace('_max_abs_diff', '')} {v:.1e}" for k, v in par.items() if k.endswith("diff")
        )
        lines += [
            "",
            f"Same function check (eval mode, experts randomised and copied from ours-dense): max |Δ logits| "
            f"{diffs} (logit scale {par['logit_scale']:.1f}"
            + (f", tolerance {par['tolerance']:.1e}" if "tolerance" in par else "")
            + f"): {'ok' if par['ok'] else 'MISMATCH'}.",
        ]
    lines.append("")
    return lines


# --- the summary ---------------------------------------------------------------------------------------------
NOTES_SPLIT = "<!-- targets -->"  # in NOTES.md: what comes before it is printed above the target list


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
    return f"hidden {spec['hidden']}, {where}" + (f", {s['autocast']} autocast" if s.get("autocast") else "")


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
                _x(rows.get(ours, {}).get("x_lora")),
                _x(rows.get(ours, {}).get("mem_x_lora")),
                "–" if o is None else f"{100 * o:+.1f} %",
                _x(rows.get(con, {}).get("mem_x_lora")),
                _x(gen.get("tps_x_lora")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- peers ---------------------------------------------------------------------------------------------------
PEER_TITLES = {"moe-peft": "MoE-PEFT"}
PEER_HEADLINE = {
    "mola": "MoLA",
    "loramoe": "LoRAMoE",
    "mixlora": "MixLoRA",
    "moe-peft-lora": "LoRA (no experts)",
}
# comoe's own rows beside a peer's: from the comoe result named like the size, and from its "-ffn" run
COMOE_BESIDE_PEERS = {"": ("naive", "ours-dense", "ours-con-gram"), "-ffn": ("ours-ffn", "ours-ffn-con")}
REFERENCE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _modules(targets: list[str]) -> str:
    return ",".join(t.removesuffix("_proj") for t in targets)


def _comoe_beside(peer: dict, results: list[dict]) -> list[tuple[str, str, dict, bool, str]]:
    """comoe's rows for a peer result's size, E and r: (variant, what, row, ratios to the q,k,v,o LoRA?, file)."""
    by_name = {r["name"]: r for r in results}
    s = peer["settings"]
    out = []
    for suffix, names in COMOE_BESIDE_PEERS.items():
        result = by_name.get(peer["size"] + suffix)
        if result is None:
            continue
        case = next(
            (
                c
                for c in result["cases"]
                if c["experts"] == s["experts"] and c["rank"] == s["rank"] and c["top_k"] == s["top_k"]
            ),
            None,
        )
        if not case or "variants" not in case:
            continue
        targets = result["settings"]["target_modules"]
        same_ref = targets == REFERENCE_TARGETS
        for name in names:
            if name in case["variants"]:
                what = f"{VARIANT_HELP.get(name, name)}; on {_modules(targets)}"
                out.append((name, what, case["variants"][name], same_ref, f"{result['name']}.json"))
    return out


def _x(value) -> str:
    return _fmt(value, 2, "×")


def render_peers(peers: list[dict], results: list[dict]) -> list[str]:
    """The "Peers" section: each peer result's table, with comoe's own ratios for the same size beside it."""
    peers = sorted(
        peers, key=lambda p: (p["peer"], list(SIZES).index(p["size"]) if p["size"] in SIZES else 99)
    )
    lines = [
        "## Peers",
        "",
        "Other MoE-LoRA implementations, measured by `benchmarks/peers/<peer>/` in an environment of their own "
        "(opt-in, not in CI) by the same method as above: the peer's variants and PEFT LoRA alternated "
        "round-robin in ONE process, fp32, one thread, E and r as in comoe's rows. Milliseconds from different "
        "processes are not comparable; the **ratios to PEFT LoRA** (r, α, dropout the same; q,k,v,o; HF LLaMA "
        "with SDPA attention), each measured inside its own process, are. 'same modules' is the ratio to a PEFT "
        "LoRA on the modules the variant adapts (q,k,v,o,gate,up,down for MixLoRA, gate,up,down for LoRAMoE).",
        "",
    ]
    for peer_name in dict.fromkeys(p["peer"] for p in peers):
        group = [p for p in peers if p["peer"] == peer_name]
        title = PEER_TITLES.get(peer_name, peer_name)
        cols = [n for n in PEER_HEADLINE if any(n in p["variants"] for p in group)]
        ours = ("ours-dense", "ours-con-gram")
        head = [f"{title} {PEER_HEADLINE[n]}" for n in cols] + [f"comoe {n}" for n in ours]
        lines += [
            f"### {title}: step time × PEFT LoRA (saved activations × PEFT LoRA)",
            "",
            "| size | " + " | ".join(head) + " |",
            "|---|" + "---|" * len(head),
        ]
        for p in group:
            cells = [
                f"{_x(p['variants'][n]['x_lora'])} ({_x(p['variants'][n].get('mem_x_lora'))})"
                if n in p["variants"]
                else "–"
                for n in cols
            ]
            beside = {n: row for n, _, row, same_ref, _ in _comoe_beside(p, results) if same_ref}
            cells += [
                f"{_x(beside[n].get('x_lora'))} ({_x(beside[n].get('mem_x_lora'))})" if n in beside else "–"
                for n in ours
            ]
            lines.append(f"| {p['size']} | " + " | ".join(cells) + " |")
        lines.append("")
        shown: set[str] = set()
        for p in group:
            lines += _render_peer(p, results, shown)
    return lines


def _render_peer(p: dict, results: list[dict], shown: set[str]) -> list[str]:
    title = PEER_TITLES.get(p["peer"], p["peer"])
    s, spec, v = p["settings"], p["spec"], p["versions"]
    lines = [f"#### {title}, `{p['size']}`", "", "```", p.get("setup", ""), p["command"], "```", ""]
    lines.append(
        f"Model: random-init LLaMA, hidden {spec['hidden']}, intermediate {spec['intermediate']}, "
        f"{spec['layers']} layers, {spec['heads']}/{spec['kv_heads']} heads, vocab {spec['vocab']} "
        f"({p['weights']}). Batch {s['batch']}×{s['seq']}, {s['dtype']}, {s['threads']} thread(s); "
        f"E = {s['experts']}, top-{s['top_k']}, r = {s['rank']}, α = {s['lora_alpha']}, dropout "
        f"{s['lora_dropout']}; {s['warmup']} warm-up + {s['steps']} timed rounds"
        + (f" ({s['note']})" if s.get("note") else "")
        + f". Peer process: Python {v.get('python')}, torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}, peft {v.get('peft')}, {p['peer']} {v.get(p['peer'])}; "
        f"{p['machine'].get('cpu_model')}. Run took {p.get('elapsed_s', '?')} s."
    )
    same = p.get("same_function")
    if same:
        lines += [
            "",
            "Same function: with every LoRA B = 0 at init, all variants' cross-entropy on the batch agrees with "
            f"PEFT LoRA's to {same['max_abs_diff_to_peft_lora']:.1e}: {'ok' if same['ok'] else 'MISMATCH'}.",
        ]
    head = [
        "process",
        "variant",
        "adapts",
        "step ms",
        "× PEFT LoRA",
        "× PEFT LoRA, same modules",
        "saved activations MiB",
        "× PEFT LoRA",
        "× same modules",
        "trainable params",
        "drift",
    ]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in p["variants"].items():
        like = r.get("like_for_like", name)
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{title} env",
                    name,
                    r.get("adapts", ""),
                    _fmt(r["median_ms"], 1),
                    _ratio_cell(r.get("x_lora"), _band(p["variants"], name, "peft-lora")),
                    (_x(r.get("x_like")) + f" ({like})") if like != name else "–",
                    _fmt(r["saved_bytes"] / 2**20 if r.get("saved_bytes") is not None else None, 1),
                    _x(r.get("mem_x_lora")),
                    _x(r.get("mem_x_like")) if like != name else "–",
                    f"{r['trainable_params']:,}",
                    _fmt(r.get("drift"), 2),
                ]
            )
            + " |"
        )
    beside = _comoe_beside(p, results)
    for name, what, r, same_ref, source in beside:
        cells = [
            f"comoe (`{source}`)",
            name,
            what,
            _fmt(r["median_ms"], 1),
            _x(r.get("x_lora")) if same_ref else "–",
            _x(r.get("x_lora")),
            _fmt(r["saved_bytes"] / 2**20 if r.get("saved_bytes") is not None else None, 1),
            _x(r.get("mem_x_lora")) if same_ref else "–",
            _x(r.get("mem_x_lora")),
            f"{r['trainable_params']:,}",
            _fmt(r.get("drift"), 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    comoe = {r["name"]: r for r in results}.get(p["size"])
    if beside and comoe:
        m = comoe["machine"]
        lines += [
            "",
            f"comoe's rows: its own `comoe bench` process (Python {m.get('python')}, torch {m.get('torch')}, "
            f"transformers {m.get('transformers')}, peft {m.get('peft')}; weights: {comoe.get('weights')}), "
            "ratios to the PEFT LoRA of that process; the '-ffn' run's LoRA is on gate,up,down, so its rows have "
            "only the same-modules ratio.",
        ]
    elif not beside:
        lines += ["", f"No comoe result for `{p['size']}` in this directory to set beside it."]
    new = [d for d in p.get("differences", []) if d not in shown]
    if new:
        lines += ["", "What differs between the two processes" + (" (further)" if shown else "") + ":", ""]
        lines += [f"- {d}" for d in new]
        shown.update(new)
    lines.append("")
    return lines


def render_all(results: list[dict], notes: str | None = None, peers: list[dict] | None = None) -> str:
    """BENCHMARKS.md: the summary table, the notes' reading of it, how the figures are measured (machines, noise
    warning), the targets, the rest of the notes, the peers, then every run."""
    results = sorted(
        results, key=lambda r: (list(SIZES).index(r["size"]), r["name"] != r["size"], r.get("date", ""))
    )
    notes = notes or ""
    before, split, after = notes.partition(NOTES_SPLIT)
    if not split:  # no marker: every note after the targets
        before, after = "", notes
    lines = [
        "# Benchmarks",
        "",
        "Generated by `comoe bench --render` from the JSON results in `benchmarks/results/` "
        "(`benchmarks/run_all.sh` reruns everything); how the figures are measured follows the summary.",
    ]
    if any(c.get("variants") for r in results for c in r["cases"]):
        lines += ["", *render_summary(results)]
    if before.strip():
        lines += ["", before.strip()]
    lines += [
        "",
        "## How the figures are measured",
        "",
        "Every figure is a ratio between variants measured in ONE process, on the same inputs and seed, with "
        "the variants alternated round-robin (one step of each per round, order rotated each round); times "
        "are medians over the timed rounds after warm-up and ratios are medians of the per-round ratios. "
        "`drift` = median of the second half of the rounds over the first half (1.00 = stable).",
        "",
    ]
    machines = {
        json.dumps({k: v for k, v in r["machine"].items() if k not in ("load_avg_start",)}, sort_keys=True)
        for r in results
    }
    for mtext in sorted(machines):
        mach = json.loads(mtext)
        lines.append(
            f"**Machine:** {mach.get('cpu_model')}, {mach.get('logical_cpus')} logical CPUs, "
            f"torch threads {mach.get('torch_threads')}, {mach.get('memory_gib')} GiB RAM"
            f"{', GPU ' + mach['gpu'] if mach.get('gpu') else ''}; {mach.get('platform')}; "
            f"Python {mach.get('python')}, torch {mach.get('torch')}, transformers {mach.get('transformers')}, "
            f"peft {mach.get('peft')}."
        )
    lines.append("")
    for device in ("cpu", "cuda"):
        runs = [r for r in results if r["settings"]["device"] == device]
        if not runs:
            continue
        wall = sum(r.get("elapsed_s") or 0 for r in runs)
        cpu = sum(r.get("cpu_s") or 0 for r in runs)
        what = "CPU" if device == "cpu" else "GPU"
        note = " (one thread: roughly what an idle machine needs)" if device == "cpu" else ""
        lines.append(
            f"The {len(runs)} {what} runs together took {wall / 60:.1f} min wall clock and {cpu / 60:.1f} min "
            f"of CPU time{note}."
        )
    if any(r["settings"]["device"] == "cpu" for r in results):
        lines += [
            "",
            "> The CPU machine is **shared and noisy**: 2 cores, other processes running at the same time. "
            "Absolute times (ms, tokens/s) move from run to run; the ratios, measured round-robin inside one "
            "process, are the numbers to read, and even they carry a few per cent of noise.",
        ]
    all_targets = [(r, t) for r in results for t in evaluate_targets(r)]
    if all_targets:
        lines += [
            "",
            "## Targets",
            "",
            "Each measured figure judged once, against its threshold.",
            "",
            "| target | where | measured | threshold | result |",
            "|---|---|---|---|---|",
        ]
        for _, t in all_targets:
            lines.append(
                f"| {t['target']} | {t['where']} | {_target_value(t)} | {_target_threshold(t)} | {_met(t['met'])} |"
            )
    if after.strip():
        lines += ["", after.strip()]
    if peers:
        lines += ["", *render_peers(peers, results)]
    lines += ["", "## Runs", ""]
    for r in results:
        lines.append(render_result(r))
    lines += ["## Variants", "", "| variant | what |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in VARIANT_HELP.items()]
    return "\n".join(lines).rstrip() + "\n"


def load_results(directory: str | os.PathLike) -> list[dict]:
    """The `comoe bench` results in ``directory`` (peer results, ``peer-*.json``, are not among them)."""
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        if path.name.startswith("peer-"):
            continue
        with open(path) as fh:
            data = json.load(fh)
        if isinstance(data, dict) and data.get("schema") == SCHEMA_VERSION and "cases" in data:
            out.append(data)
    return out


def load_peer_results(directory: str | os.PathLike) -> list[dict]:
    """The peer results (``peer-*.json``, written by ``benchmarks/peers/*/bench.py``) in ``directory``."""
    out = []
    for path in sorted(Path(directory).glob("peer-*.json")):
        with open(path) as fh:
            data = json.load(fh)
        if isinstance(data, dict) and "peer" in data and "variants" in data:
            out.append(data)
    return out


def write_json(result: dict, directory: str | os.PathLike) -> Path:
    return write_json_atomic(Path(directory) / f"{result['name']}.json", result, indent=1)
