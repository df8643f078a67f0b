"""The targets of `comoe bench`: each threshold, and judging a result against them (each measured figure
once, where the threshold applies)."""

from __future__ import annotations

# Targets: thresholds and where each is judged. Each measured figure is judged against one threshold.
TARGET_NAIVE = 0.5  # ours / naive step time, tiny model, CPU
TARGET_LORA = 1.3  # ours / LoRA step time, CPU, hidden >= 1024
TARGET_GPU_LORA = 1.05  # ours / LoRA step time on a GPU (LLaMA-2-7B-shaped layers)
TARGET_MEM = 1.3  # ours / LoRA activation memory (saved tensors; peak allocated on a GPU)
TARGET_MEM_CON = 1.2  # ours + contrastive / LoRA activation memory (saved tensors), every size
TARGET_CON = 0.05  # extra step time of the contrastive loss, SmolLM2 shape and hidden >= 1024
TARGET_CON_TINY = 0.15  # the same at the tiny shape
TARGET_GEN = 0.9  # ours / LoRA generate tokens/s (at least), SmolLM2 shape
WIDE_HIDDEN = 1024


def _target(
    name: str,
    where: str,
    value: float | None,
    threshold: float,
    met: bool | None,
    note: str = "",
    unit: str = "x",
    at_least: bool = False,
) -> dict:
    """One judged target; ``unit`` "x" (a ratio) or "%" (an overhead), ``at_least`` for a lower bound."""
    return {
        "target": name,
        "where": where,
        "value": value,
        "threshold": threshold,
        "met": met,
        "note": note,
        "unit": unit,
        "at_least": at_least,
    }


def evaluate_targets(result: dict) -> list[dict]:
    """The targets this run can judge, each measured figure once: step time against the naive loop (tiny,
    CPU) and against PEFT LoRA (hidden ≥ 1024, CPU and GPU), the contrastive term's step overhead (≤ 15 %
    tiny, ≤ 5 % at the SmolLM2 shape and hidden ≥ 1024), activation memory (ours ≤ 1.3× LoRA, with the
    contrastive term ≤ 1.2×; peak allocated ≤ 1.3× on a GPU), generation (≥ 0.9× LoRA's tokens/s at the
    SmolLM2 shape), and the torch.compile check."""
    spec, device = result["spec"], result["settings"]["device"]
    wide = spec["hidden"] >= WIDE_HIDDEN
    tiny = result["size"] == "tiny"
    out = []
    for case in result["cases"]:
        rows = case.get("variants", {})
        where = f"{result['name']}, E={case['experts']}, r={case['rank']}"
        ours = {"dense": "ours-dense", "grouped": "ours-grouped"}.get(case["auto_path"])
        if "naive" in rows and tiny and device == "cpu":
            for name in ("ours-dense", "ours-grouped"):
                if name in rows:
                    v = rows[name]["x_naive"]
                    label = f"{where} ({name}{', the auto path' if name == ours else ''})"
                    out.append(
                        _target(
                            "step time ≤ 0.5× the naive per-expert loop (tiny, CPU)",
                            label,
                            v,
                            TARGET_NAIVE,
                            v <= TARGET_NAIVE,
                        )
                    )
        if ours in rows and "lora" in rows and wide:
            v = rows[ours]["x_lora"]
            gpu = device == "cuda"
            limit = TARGET_GPU_LORA if gpu else TARGET_LORA
            name = f"step time ≤ {limit}× PEFT LoRA ({'GPU' if gpu else 'CPU'}, hidden ≥ 1024)"
            out.append(_target(name, f"{where} ({ours})", v, limit, v <= limit))
        con = rows.get("ours-con-gram", {})
        if (tiny or result["size"] == "smollm2" or wide) and con.get("x_ours_same_path") is not None:
            limit = TARGET_CON_TINY if tiny else TARGET_CON
            v = con["x_ours_same_path"] - 1.0
            name = f"contrastive term (Gram form) adds ≤ {100 * limit:.0f} % to our step"
            out.append(_target(name, where, v, limit, v <= limit, unit="%"))
        for name, limit, what in (
            (ours, TARGET_MEM, "activation memory"),
            ("ours-con-gram", TARGET_MEM_CON, "activation memory with the contrastive term"),
        ):
            row = rows.get(name, {})
            if row.get("mem_x_lora") is not None:
                v = row["mem_x_lora"]
                label = f"{what} ≤ {limit}× PEFT LoRA (saved tensors)"
                out.append(_target(label, f"{where} ({name})", v, limit, v <= limit))
            if row.get("peak_x_lora") is not None:
                v = row["peak_x_lora"]
                label = f"{what} ≤ {TARGET_MEM}× PEFT LoRA (peak allocated)"
                out.append(_target(label, f"{where} ({name})", v, TARGET_MEM, v <= TARGET_MEM))
        generated = case.get("generate", {}).get("variants", {}).get("ours-dense", {})
        if result["size"] == "smollm2" and generated.get("tps_x_lora") is not None:
            v = generated["tps_x_lora"]
            name = "generate ≥ 0.9× PEFT LoRA's tokens/s (SmolLM2 shape)"
            out.append(_target(name, where, v, TARGET_GEN, v >= TARGET_GEN, at_least=True))
    check = result.get("checks", {}).get("compile")
    if check:
        for path, e in check["paths"].items():
            note = "" if e.get("works") else e.get("error", "")[:160].rstrip("')\"")
            out.append(
                _target(
                    "torch.compile runs the adapted model and matches eager",
                    f"{result['name']}, {path} path, backend {check['backend']}",
                    None,
                    0,
                    bool(e.get("works") and e.get("matched")),
                    note,
                )
            )
            if e.get("compiled_x_naive") is not None and device == "cpu":
                v = e["compiled_x_naive"]
                out.append(
                    _target(
                        "compiled step ≤ 0.5× the naive per-expert loop's eager step (tiny, CPU)",
                        f"{result['name']}, {path} path, torch.compile vs the naive loop in eager, dropout 0",
                        v,
                        TARGET_NAIVE,
                        v <= TARGET_NAIVE,
                    )
                )
    return out
