"""MoE-PEFT's MoLA, LoRAMoE and MixLoRA against PEFT LoRA, timed round-robin in ONE process.

Runs in the peer environment that `setup.sh` builds (MoE-PEFT needs transformers < 4.47); imports nothing
from comoe. The method mirrors `comoe bench` (src/comoe/tools/bench/measure.py), copied in short:

- one random-init LlamaForCausalLM of the size's shape (seed 0); every variant runs its weights on the same
  token batch; fp32, one torch thread;
- a training step = zero_grad, forward with labels (+ the adapter's own router loss), backward, AdamW step
  over the trainable tensors;
- variants round-robin: one step each per round, order rotated by one each round, RNG reseeded per round;
  `--warmup` rounds dropped, `--steps` rounds timed; medians, ratios = medians of per-round ratios,
  drift = median of the second half over the first half;
- saved activations: bytes of the unique storages autograd saves during one training forward
  (`torch.autograd.graph.saved_tensors_hooks`), parameter and buffer storages excluded.

    benchmarks/peers/moe_peft/.venv/bin/python benchmarks/peers/moe_peft/bench.py --size tiny
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from importlib.metadata import distributions, version
from pathlib import Path

import torch

# the shapes of `comoe bench --size ...` (src/comoe/tools/bench/sizes.py)
SIZES = {
    "tiny": dict(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=512, batch=4, seq=64),
    "smollm2": dict(
        hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, batch=1, seq=128, tie=True
    ),
    "wide": dict(
        hidden=1024, intermediate=2816, layers=2, heads=16, kv_heads=16, vocab=2048, batch=2, seq=128
    ),
}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]
EXPERTS, TOP_K, RANK, DROPOUT = 4, 2, 16, 0.05
ALPHA = 2 * RANK

# name: (framework, what it adapts, its like-for-like PEFT LoRA reference)
VARIANTS = {
    "peft-lora": ("peft", "PEFT LoRA on q,k,v,o; HF LLaMA, SDPA attention (comoe bench's `lora`)", None),
    "peft-lora-eager": ("peft", "PEFT LoRA on q,k,v,o; HF LLaMA, eager attention", "peft-lora"),
    "peft-lora-ffn": ("peft", "PEFT LoRA on gate,up,down; SDPA", None),
    "peft-lora-all": ("peft", "PEFT LoRA on q,k,v,o,gate,up,down; SDPA", None),
    "moe-peft-lora": ("moe-peft", "MoE-PEFT's own LoRA on q,k,v,o (no experts)", "peft-lora"),
    "mola": (
        "moe-peft",
        f"MoLA: {EXPERTS} LoRA experts on each of q,k,v,o, top-{TOP_K} router per linear",
        "peft-lora",
    ),
    "loramoe": (
        "moe-peft",
        f"LoRAMoE: {EXPERTS} LoRA experts on each of gate,up,down, soft (dense softmax) router per linear",
        "peft-lora-ffn",
    ),
    "mixlora": (
        "moe-peft",
        f"MixLoRA: {EXPERTS} FFN experts (LoRA on gate,up,down each, shared frozen FFN), top-{TOP_K} router per "
        "MLP block, + LoRA on q,k,v,o; Mixtral load-balancing loss 0.001",
        "peft-lora-all",
    ),
}
PEFT_TARGETS = {"peft-lora": ATTN, "peft-lora-eager": ATTN, "peft-lora-ffn": FFN, "peft-lora-all": ATTN + FFN}
MOE_PEFT_CONFIG = {  # moe_peft.adapter_factory(peft_type, name, **kwargs); MoE-PEFT's defaults otherwise
    "moe-peft-lora": ("LORA", dict(target_modules=ATTN)),
    "mola": ("MOLA", dict(target_modules=ATTN, num_experts=EXPERTS, top_k=TOP_K)),
    "loramoe": ("LORAMOE", dict(target_modules=FFN, num_experts=EXPERTS)),
    "mixlora": (
        "MIXLORA",
        dict(target_modules=ATTN + FFN, routing_strategy="mixlora", num_experts=EXPERTS, top_k=TOP_K),
    ),
}


# --- building -------------------------------------------------------------------------------------------
def build_llama(spec: dict, seed: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=max(2048, 2 * spec["seq"]),
        tie_word_embeddings=spec.get("tie", False),
        attention_dropout=0.0,
        attn_implementation=attn,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    model.requires_grad_(False)
    return model


class Variant:
    """A built variant: ``forward()`` returns the training loss; ``step()`` is one optimizer step."""

    def __init__(self, name: str, params: list, forward, exclude: set[int]):
        self.name, self.params, self.forward = name, params, forward
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.exclude = exclude

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward().backward()
        self.optimizer.step()


def shared_copy(base):
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def build_peft(name: str, base, ids, mask, seed: int) -> Variant:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=PEFT_TARGETS[name], bias="none"
    )
    model = get_peft_model(shared_copy(base), cfg)
    model.train()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).detach()

    def forward(aux: bool = True):
        return model(inputs_embeds=embeds, attention_mask=mask, labels=ids).loss

    params = [p for p in model.parameters() if p.requires_grad]
    return Variant(name, params, forward, storages(list(model.parameters()) + list(model.buffers())))


def build_moe_peft(name: str, base, ids, mask, seed: int) -> Variant:
    import moe_peft
    from moe_peft.models import from_pretrained

    torch.manual_seed(seed)
    peft_type, extra = MOE_PEFT_CONFIG[name]
    # a fresh MoE-PEFT model over the same HF modules (its Linear wrappers hold this adapter only)
    llm = moe_peft.LLMModel(from_pretrained(base, attn_impl="eager", device="cpu"))
    config = moe_peft.adapter_factory(
        peft_type, name, task_name="casual", r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, **extra
    )
    llm.init_adapter(config)
    weights = llm.get_adapter_weight_dict(name)
    params = list({id(t): t for t in weights.values() if t.requires_grad}.values())
    batch = ids.shape[0]

    def forward(aux: bool = True):
        inputs = moe_peft.LLMModelInput(
            batch_configs_=[
                moe_peft.LLMBatchConfig(adapter_name_=name, batch_start_idx_=0, batch_end_idx_=batch)
            ],
            batch_tokens_=ids,
            batch_labels_=ids,
            batch_masks_=mask,
        )
        out = llm.forward(inputs)[0]
        return out.loss + out.aux_loss if aux and out.aux_loss is not None else out.loss

    frozen = [llm.model_.lm_head_.weight, *llm.model_.rotary_emb_.buffers()]
    exclude = storages(list(base.parameters()) + list(base.buffers()) + frozen + params)
    return Variant(name, params, forward, exclude)


# --- measuring ------------------------------------------------------------------------------------------
def time_round_robin(
    variants: dict[str, Variant], rounds: int, warmup: int, seed: int
) -> dict[str, list[float]]:
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    for i in range(warmup + rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            torch.manual_seed(seed + i)
            t0 = time.perf_counter()
            variants[name].step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def saved_activation_bytes(v: Variant, seed: int) -> tuple[int, int]:
    """(bytes of unique non-parameter storages saved for backward, number of saved tensors): one forward."""
    seen: dict[int, int] = {}
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        if s.data_ptr() and s.data_ptr() not in v.exclude:
            seen[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(seed)
    v.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = v.forward()
    loss.backward()
    v.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values()), count


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(a, b):
    return median([x / y for x, y in zip(a, b, strict=True)])


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg, dist in (
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("peft", "peft"),
        ("moe-peft", "moe_peft"),
    ):
        out[pkg] = version(dist)
    return out


def differences(size: str, vers: dict, comoe: dict | None) -> list[str]:
    theirs = comoe["machine"] if comoe else {}
    tf = f"transformers {vers['transformers']} here"
    tf += f", {theirs['transformers']} in comoe bench's process" if theirs.get("transformers") else ""
    pf = f"PEFT {vers['peft']} here" + (f", {theirs['peft']} there" if theirs.get("peft") else "")
    out = [
        f"{tf} (MoE-PEFT 2.0.2 requires transformers >= 4.44, < 4.47); {pf}; torch {vers['torch']} "
        + (f"here, {theirs['torch']} there" if theirs.get("torch") else "")
        + " (MoE-PEFT declares torch < 2.6; it was installed with --no-deps against this torch).",
        "MoE-PEFT runs its own re-implementation of the LLaMA forward (moe_peft.models.modeling_llama) over the "
        "same HF weights, with EAGER attention (explicit 4-D additive causal mask, matmul-softmax-matmul; its "
        "only other attention is flash_attn, CUDA-only). PEFT LoRA, here and in comoe bench, runs HF's "
        "LlamaForCausalLM with SDPA; `peft-lora-eager` is the same PEFT LoRA with HF's eager attention, and "
        "`moe-peft-lora` is MoE-PEFT's own plain LoRA: together they separate attention and framework costs "
        "from the experts'.",
        "Inputs: the PEFT variants get inputs_embeds (as in comoe bench); the MoE-PEFT variants get token ids "
        "in MoE-PEFT's LLMModelInput (batch_tokens_, batch_labels_, batch_masks_, one LLMBatchConfig spanning "
        "the batch; a fresh one per step, since its forward clears them) and embed them themselves (no grad).",
        "Loss: MoE-PEFT's CasualOutputLayer (logits cast to fp32, shifted cross-entropy, mean) plus the "
        "adapter's aux loss as MoE-PEFT's trainer adds it (MixLoRA: Mixtral load balancing x 0.001; MoLA's is "
        "off by MoE-PEFT's default; LoRAMoE has none in MoE-PEFT); HF's causal-LM loss for PEFT. At init every "
        "variant gives the same cross-entropy (see same_function).",
        "MoE-PEFT's plain LoRA (and MixLoRA's attention LoRA) runs through its fused autograd Function "
        "(LoraFunction, hand-written backward); its MoE adapters loop over experts in Python with torch.where + "
        "index_add_ (MoLA, MixLoRA) or sum all experts densely (LoRAMoE), like comoe bench's `naive` variant.",
        "Routers: MoE-PEFT's defaults (MoLA and LoRAMoE: kaiming-uniform, router_init_range 5.0; MixLoRA: normal "
        "std 0.02, no jitter); LoRA dropout 0.05 on each expert's input, alpha = 2r as in comoe bench.",
        "Separate processes and runs: comoe's ratios come from its own `comoe bench` run (its result file); only "
        "the ratios to PEFT LoRA measured inside each process are comparable, not the milliseconds.",
    ]
    if size == "smollm2":
        w = comoe.get("weights", "?") if comoe else "?"
        out.append(
            "Weights: random init of the SmolLM2-135M shape here (seed 0, built by this transformers); comoe "
            f"bench's smollm2 run used: {w} (no SmolLM2 weights in the peer environment). Same shapes and "
            "FLOPs; the weights change only which experts the tokens pick (per-expert token counts of the "
            "top-2 loops of MoLA and MixLoRA)."
        )
    else:
        out.append(
            "Weights: random init (seed 0) in both processes, but built by different transformers versions, so "
            "not the same values; same shapes and FLOPs."
        )
    return out


# --- main -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--steps", type=int, default=20, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list out of " + ", ".join(VARIANTS))
    p.add_argument("--out", default="benchmarks/results", help="writes OUT/peer-moe-peft-<size>.json")
    p.add_argument("--note", default="", help="a note recorded in the result (e.g. why fewer rounds)")
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "peft-lora" not in names:
        p.error(
            f"variants must include peft-lora and come from {', '.join(VARIANTS)}; got {unknown or names}"
        )
    t_start, cpu_start = time.perf_counter(), time.process_time()
    torch.set_num_threads(args.threads)
    spec = SIZES[args.size]
    command = "python benchmarks/peers/moe_peft/bench.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    print(f"peer moe-peft: size={args.size} variants={','.join(names)}", flush=True)

    base = build_llama(spec, args.seed, "sdpa")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, spec["vocab"], (spec["batch"], spec["seq"]), generator=gen)
    mask = torch.ones_like(ids)
    eager = None
    variants: dict[str, Variant] = {}
    # MoE-PEFT first: it wraps the HF modules in place (PEFT variants work on deep copies)
    for name in names:
        if VARIANTS[name][0] == "moe-peft":
            variants[name] = build_moe_peft(name, base, ids, mask, args.seed)
    for name in names:
        if VARIANTS[name][0] == "peft":
            if name == "peft-lora-eager":
                eager = build_llama(spec, args.seed, "eager")
                eager.load_state_dict(base.state_dict())
                variants[name] = build_peft(name, eager, ids, mask, args.seed)
            else:
                variants[name] = build_peft(name, base, ids, mask, args.seed)
    variants = {n: variants[n] for n in names}

    # same function at init (LoRA B = 0 everywhere: every variant's cross-entropy is the base model's)
    init_loss = {}
    with torch.no_grad():
        for name, v in variants.items():
            torch.manual_seed(args.seed)
            init_loss[name] = v.forward(aux=False).item()
    diffs = {n: abs(x - init_loss["peft-lora"]) for n, x in init_loss.items()}
    same = {"cross_entropy_at_init": init_loss, "max_abs_diff_to_peft_lora": max(diffs.values())}
    same["ok"] = same["max_abs_diff_to_peft_lora"] <= 1e-4 * max(1.0, abs(init_loss["peft-lora"]))
    print(
        f"  same function at init: max |loss - peft-lora| = {same['max_abs_diff_to_peft_lora']:.2e}",
        flush=True,
    )

    print(f"  timing ({args.warmup} warm-up + {args.steps} rounds)", flush=True)
    times = time_round_robin(variants, args.steps, args.warmup, args.seed)
    tokens = ids.numel()
    rows: dict[str, dict] = {}
    for name, ts in times.items():
        framework, adapts, like = VARIANTS[name]
        half = len(ts) // 2
        q = statistics.quantiles(ts, n=4) if len(ts) >= 4 else None
        rows[name] = {
            "framework": framework,
            "adapts": adapts,
            "like_for_like": like or name,
            "trainable_params": sum(t.numel() for t in variants[name].params),
            "median_ms": 1e3 * median(ts),
            "iqr_ms": 1e3 * (q[2] - q[0]) if q else None,
            "tokens_per_s": tokens / median(ts),
            "drift": median(ts[half:]) / median(ts[:half]) if half else None,
            "x_lora": paired_ratio(ts, times["peft-lora"]),
            "x_like": paired_ratio(ts, times[like]) if like in times else None,
            "times_ms": [round(1e3 * t, 3) for t in ts],
        }
    print("  memory", flush=True)
    for name, v in variants.items():
        saved, count = saved_activation_bytes(v, args.seed)
        rows[name].update(saved_bytes=saved, saved_tensors=count)
    for r in rows.values():
        r["mem_x_lora"] = r["saved_bytes"] / max(1, rows["peft-lora"]["saved_bytes"])
        like = r["like_for_like"]
        r["mem_x_like"] = r["saved_bytes"] / max(1, rows[like]["saved_bytes"]) if like in rows else None

    comoe_path = Path(args.out) / f"{args.size}.json"
    comoe = json.loads(comoe_path.read_text()) if comoe_path.exists() else None
    vers = versions()
    result = {
        "schema": "peer-1",
        "peer": "moe-peft",
        "name": f"peer-moe-peft-{args.size}",
        "size": args.size,
        "command": command,
        "setup": "bash benchmarks/peers/moe_peft/setup.sh",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "versions": vers,
        "environment": sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions()),
        "machine": machine(),
        "spec": spec,
        "weights": f"random init (seed {args.seed}), transformers {vers['transformers']}",
        "settings": {
            "dtype": "float32",
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "batch": spec["batch"],
            "seq": spec["seq"],
            "tokens_per_step": tokens,
            "experts": EXPERTS,
            "top_k": TOP_K,
            "rank": RANK,
            "lora_alpha": ALPHA,
            "lora_dropout": DROPOUT,
            "optimizer": "AdamW (trainable tensors), lr 1e-4",
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
            "reference": "peft-lora",
            "note": args.note,
        },
        "variants": rows,
        "same_function": same,
        "differences": differences(args.size, vers, comoe),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        "cpu_s": round(time.process_time() - cpu_start, 1),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"{result['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    for name, r in rows.items():
        print(
            f"  {name:16s} {r['median_ms']:9.1f} ms  x peft-lora {r['x_lora']:.2f}  saved x lora "
            f"{r['mem_x_lora']:.2f}  trainable {r['trainable_params']}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
