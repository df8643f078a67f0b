"""The "Peers" section of BENCHMARKS.md: other MoE-LoRA implementations' results, with comoe's own
ratios for the same size beside them."""

from __future__ import annotations

from comoe.tools.bench.cells import number, ratio_band, ratio_cell, times
from comoe.tools.bench.sizes import SIZES
from comoe.tools.bench.variants import VARIANT_HELP

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
                f"{times(p['variants'][n]['x_lora'])} ({times(p['variants'][n].get('mem_x_lora'))})"
                if n in p["variants"]
                else "–"
                for n in cols
            ]
            beside = {n: row for n, _, row, same_ref, _ in _comoe_beside(p, results) if same_ref}
            cells += [
                f"{times(beside[n].get('x_lora'))} ({times(beside[n].get('mem_x_lora'))})"
                if n in beside
                else "–"
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
                    number(r["median_ms"], 1),
                    ratio_cell(r.get("x_lora"), ratio_band(p["variants"], name, "peft-lora")),
                    (times(r.get("x_like")) + f" ({like})") if like != name else "–",
                    number(r["saved_bytes"] / 2**20 if r.get("saved_bytes") is not None else None, 1),
                    times(r.get("mem_x_lora")),
                    times(r.get("mem_x_like")) if like != name else "–",
                    f"{r['trainable_params']:,}",
                    number(r.get("drift"), 2),
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
            number(r["median_ms"], 1),
            times(r.get("x_lora")) if same_ref else "–",
            times(r.get("x_lora")),
            number(r["saved_bytes"] / 2**20 if r.get("saved_bytes") is not None else None, 1),
            times(r.get("mem_x_lora")) if same_ref else "–",
            times(r.get("mem_x_lora")),
            f"{r['trainable_params']:,}",
            number(r.get("drift"), 2),
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
