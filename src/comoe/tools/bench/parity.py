"""The same-function check: do the dense path, the grouped path and the per-expert loop compute one function?

With the experts randomised (B = 0 at init would make every path trivially equal), each path's eval-mode
logits are compared with the dense path's; in fp32 they must agree within 1e-3 of the logit scale.

Below fp32, paths that sum in other orders differ by rounding, and routing turns rounding into jumps: a
token whose router logits nearly tie takes other experts in one computation than in another, and its
logits move far more than rounding does. So in bf16/fp16 each path is judged by its error against an fp32
copy of the same model that routes every token as that path routed it (its top-k selections replayed, the
gates recomputed in fp32): the max over tokens of |Δ logit| must be at most ``LORA_ERROR_FACTOR`` × PEFT
LoRA's error in the same dtype against its own fp32 copy. The error against an fp32 copy that routes on
its own is reported too (``*_error_free_routing``): it holds the routing flips. Without a LoRA variant,
the paths are held to 4 rounding steps of the dtype against each other.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn

from comoe.inference import router_logits
from comoe.routers import Router, Routing
from comoe.tools.bench.naive import NaiveMoELoRALinear, copy_comoe_to_naive
from comoe.tools.bench.variants import Variant

PATHS = ("naive", "ours-grouped")  # compared with ours-dense
LORA_ERROR_FACTOR = 1.5


def _logits(model: nn.Module, batch) -> Tensor:
    model.eval()
    try:
        with torch.no_grad():
            return model(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask).logits.float()
    finally:
        model.train()


def _fp32_logits(model: nn.Module, batch, replay: list[Tensor] | None = None) -> Tensor:
    """The logits of an fp32 copy of ``model`` (TF32 off: a reference, not a fast path); with ``replay``,
    its routers select those experts (see ``_replaying``)."""
    twin = copy.deepcopy(model).float()
    if replay is not None:
        _replaying(twin, replay)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _logits(twin, replace(batch, embeds=batch.embeds.float()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        del twin


def _randomise(named: dict[str, Tensor], gen: torch.Generator, up_suffixes: tuple[str, ...]) -> None:
    """Random up-projections (std 0.05) and routers whose logits have a std of about 1 (std 1/√d_in):
    every expert gets tokens, and a gate moves with its logits about as a trained router's does (a steeper
    router turns each rounding of its input into a jump of its gates)."""
    for name, p in sorted(named.items()):
        if name.endswith(up_suffixes) or name.endswith("comoe_router"):
            scale = p.shape[1] ** -0.5 if name.endswith("comoe_router") else 0.05
            p.data.copy_((torch.randn(p.shape, generator=gen) * scale).to(p))


def parity_check(variants: dict[str, Variant], batch, seed: int) -> dict | None:
    """Max |Δ logits| of naive and ours-grouped against ours-dense, and (below fp32) each path's and PEFT
    LoRA's error against an fp32 copy of itself; ``ok`` as the module docstring says."""
    ref = variants.get("ours-dense")
    others = [v for v in PATHS if v in variants]
    if ref is None or not others:
        return None
    gen = torch.Generator().manual_seed(seed)
    _randomise(ref.model.adapter_state_dict(), gen, ("comoe_B",))
    for name in others:
        if name == "naive":
            copy_comoe_to_naive(ref.model, variants[name].naive_layers)
        else:
            variants[name].model.load_state_dict(ref.model.state_dict())
    logits = {name: _logits(variants[name].model, batch) for name in ["ours-dense", *others]}
    scale = logits["ours-dense"].abs().max().item()
    result: dict = {
        f"{n}_max_abs_diff": (logits[n] - logits["ours-dense"]).abs().max().item() for n in others
    }
    result["logit_scale"] = scale
    dtype = ref.model.get_input_embeddings().weight.dtype
    # paths against each other: 1e-3 of the scale, or 4 rounding steps of the dtype (they sum in other orders)
    result["tolerance"] = max(1e-3, 4 * torch.finfo(dtype).eps) * max(1.0, scale)
    lora = variants.get("lora")
    if dtype == torch.float32 or lora is None:
        result["ok"] = all(result[f"{n}_max_abs_diff"] <= result["tolerance"] for n in others)
        return result
    free = _fp32_logits(ref.model, batch)
    for name in ["ours-dense", *others]:
        model = variants[name].model
        with _recorded_routing(model) as selections:
            low = _logits(model, batch)
        exact = _fp32_logits(ref.model, batch, replay=selections)
        result[f"{name}_error_vs_fp32"] = (low - exact).abs().max().item()
        result[f"{name}_error_free_routing"] = (low - free).abs().max().item()
    _randomise(
        {n: p for n, p in lora.model.named_parameters() if "lora_B" in n}, gen, ("lora_B.default.weight",)
    )
    lora_error = (_logits(lora.model, batch) - _fp32_logits(lora.model, batch)).abs().max().item()
    result["lora_error_vs_fp32"] = lora_error
    result["error_bound"] = max(LORA_ERROR_FACTOR * lora_error, 1e-3 * max(1.0, scale))
    result["ok"] = all(result[f"{n}_error_vs_fp32"] <= result["error_bound"] for n in ["ours-dense", *others])
    return result


@contextmanager
def _recorded_routing(model: nn.Module) -> Iterator[list[Tensor]]:
    """The top-k selections (N, k) of each router call of ``model``'s forwards inside the block, in order:
    comoe's routers and the naive layers' ``nn.Linear`` routers alike."""
    selections: list[Tensor] = []
    handles = []
    for module in model.modules():
        if isinstance(module, Router):
            handles.append(module.register_forward_hook(lambda m, a, out: selections.append(out.selected)))
        elif isinstance(module, NaiveMoELoRALinear):
            k = module.top_k
            handles.append(
                module.router.register_forward_hook(
                    lambda m, a, out, k=k: selections.append(out.softmax(-1).topk(k, dim=-1).indices)
                )
            )
    try:
        yield selections
    finally:
        for handle in handles:
            handle.remove()


def _replaying(model: nn.Module, selections: list[Tensor]) -> list:
    """Forward hooks that make ``model``'s routers (in call order) select ``selections``: the top-k gates
    of those experts, from this model's own logits."""
    calls = iter(selections)

    def replay(module: Router, args: tuple, out: Routing) -> Routing:
        selected = next(calls).to(out.gates.device)
        logits = router_logits(args[0], module.comoe_router)
        gates = torch.zeros_like(out.gates).scatter(1, selected, logits.gather(1, selected).softmax(-1))
        return out._replace(gates=gates, selected=selected)

    return [m.register_forward_hook(replay) for m in model.modules() if isinstance(m, Router)]
