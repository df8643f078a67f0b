"""The inference math of a mixture layer, in torch alone: routing, each expert kind's output, and the
inference-only modules an exported model holds.

The library's layers call these functions on their inference path (the routers' selection, the LoRA
update fused into one ``addmm`` or added as plain ops, DoRA's scales and update, the whole-FFN experts'
block output), and ``comoe export`` (``comoe.training.export``) writes this file, unchanged, into the
exported model folder, where ``MixtureLinear`` and ``MixtureFFN`` compose the same functions the same
way. So an exported model computes what the adapted model computes, with no second copy of the math.

This module imports torch and the standard library only: the exported folder loads without comoe (and
without PEFT). Keep it so (``tests/training/test_export.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INFERENCE_ROUTINGS = ("topk", "soft", "topp")  # the routings ``select_gates`` computes
INFERENCE_KINDS = ("lora", "dora", "ffn")  # the expert kinds the modules below compute
FFN_PROJECTIONS = ("gate", "up", "down")


# --- routing ---------------------------------------------------------------------------------------
def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """The router's logits (N, E) of tokens ``x`` (N, d_in) in fp32 (fp64 for an fp64 weight), with
    autocast off: bf16 would round them."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), weight.to(dtype))


def topk_gates(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """(gates (N, E), selected (N, k)): the softmax of the top-k logits scattered into zeros, the same
    function as the renormalised top-k of the softmax with fewer ops forward and backward."""
    top_logits, top_idx = logits.topk(top_k, dim=-1)
    gates = torch.zeros_like(logits).scatter(1, top_idx, top_logits.softmax(dim=-1))
    return gates, top_idx


def soft_gates(logits: Tensor) -> Tensor:
    """Every expert gated by its probability, (N, E)."""
    return logits.softmax(dim=-1)


def topp_gates(logits: Tensor, top_k: int, top_p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(gates, probs, selected (N, k), slot_mask (N, k)): per token the fewest experts, best first, whose
    probabilities reach ``top_p``, at least one and at most ``top_k``, their probabilities renormalised."""
    probs = logits.softmax(dim=-1)
    top_logits, top_idx = logits.topk(top_k, dim=-1)
    top_probs = probs.gather(1, top_idx)
    slot_mask = (top_probs.cumsum(-1) - top_probs) < top_p  # the mass before each slot; slot 0 kept
    kept = top_logits.masked_fill(~slot_mask, float("-inf")).softmax(dim=-1)
    gates = torch.zeros_like(logits).scatter(1, top_idx, kept)
    return gates, probs, top_idx, slot_mask


def select_gates(logits: Tensor, routing: str, top_k: int, top_p: float) -> tuple[Tensor, Tensor | None]:
    """(gates (N, E), selected (N, k) or None when every expert is used) under ``routing``."""
    if routing == "topk":
        return topk_gates(logits, top_k)
    if routing == "soft":
        return soft_gates(logits), None
    if routing == "topp":
        gates, _, selected, _ = topp_gates(logits, top_k, top_p)
        return gates, selected
    raise ValueError(f"routing must be one of {INFERENCE_ROUTINGS}, got {routing!r}")


def single_expert_gates(n_tokens: int, device: torch.device) -> Tensor:
    """The gates of a layer with one expert (plain LoRA, no router): 1 for every token, (N, 1) fp32."""
    return torch.ones(n_tokens, 1, device=device, dtype=torch.float32)


# --- LoRA experts ----------------------------------------------------------------------------------
def product_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast runs a product of ``t`` in: autocast's when it is on, else (and for float64,
    which autocast leaves alone) ``t``'s own."""
    device = t.device.type
    if torch.is_autocast_enabled(device) and t.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return t.dtype


def adapter_input(x: Tensor, adapter_dtype: torch.dtype) -> Tensor:
    """``x`` in the dtype the adapter takes it in: the adapter's, except under autocast for an input already
    in autocast's dtype, which stays in it. Every product would cast it there anyway, and the dropped input
    formed in bf16 equals the one formed in fp32 and then cast (one rounding either way): no full-width fp32
    copy is made, and none is kept for backward."""
    autocast = adapter_dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)
    return x if autocast and product_dtype(x) == x.dtype else x.to(adapter_dtype)


def gated_codes(codes: Tensor, gates: Tensor, rank: int) -> Tensor:
    """Each expert's code times its gate, (N, E·r)."""
    n_tokens = codes.shape[0]
    return (codes.view(n_tokens, -1, rank) * gates.to(codes.dtype)[..., None]).view(n_tokens, -1)


def lora_delta(
    x: Tensor, lora_A: Tensor, lora_B: Tensor, gates: Tensor, rank: int, scaling: float
) -> tuple[Tensor, Tensor]:
    """(delta (N, d_out), codes (N, E·r)) as plain ops: codes = x A_catᵀ, delta = s ((codes ⊙ gates) B_catᵀ).
    x (N, d_in), already dropped out where dropout applies; lora_A (E·r, d_in); lora_B (d_out, E·r)."""
    codes = x @ lora_A.t()
    delta = gated_codes(codes, gates, rank) @ lora_B.t()
    return (delta * scaling if scaling != 1.0 else delta), codes


def adds_in_one_addmm(result: Tensor, x: Tensor) -> bool:
    """Whether the update can be added to the base output ``result`` in one ``addmm``: ``result`` is in the
    dtype the products of ``x`` run in (addmm keeps it), outside torch.compile."""
    return result.dtype == product_dtype(x) and not torch.compiler.is_compiling()


def dense_experts_added(
    result: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, gates: Tensor, rank: int, scaling: float
) -> Tensor:
    """Inference (no dropout, no autograd): ``result + s · ((x A_catᵀ) ⊙ gates) B_catᵀ`` with the scaling and
    the residual add fused into one ``addmm``: two fewer ops per module per decoded token. result (N, d_out)
    in the dtype of the product (or under autocast)."""
    return torch.addmm(result, gated_codes(x @ lora_A.t(), gates, rank), lora_B.t(), alpha=scaling)


# --- DoRA experts ----------------------------------------------------------------------------------
def dora_row_norms(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, num_experts: int
) -> Tensor:
    """||W0 + s B_i A_i|| per output row for every expert i, (E, d_out), from rank-r products only.

    Row j: ||w_j||² + 2s b_ijᵀ (A_i w_j) + s² b_ijᵀ (A_i A_iᵀ) b_ij. weight (d_out, d_in); lora_A (E·r, d_in);
    lora_B (d_out, E·r).
    """
    d_out, d_in = weight.shape
    rank = lora_A.shape[0] // num_experts
    a = lora_A.to(weight.dtype).view(num_experts, rank, d_in)
    b = lora_B.to(weight.dtype).view(d_out, num_experts, rank)
    projected = (weight @ lora_A.to(weight.dtype).t()).view(d_out, num_experts, rank)  # A_i w_j
    gram = a @ a.transpose(1, 2)  # (E, r, r)
    cross = (b * projected).sum(-1)  # (d_out, E)
    quadratic = torch.einsum("der,ers,des->de", b, gram, b)
    squared = weight.pow(2).sum(1, keepdim=True) + 2 * scaling * cross + scaling**2 * quadratic
    return squared.clamp_min(0).sqrt().t()


def dora_scale(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float, num_experts: int
) -> Tensor:
    """c_i = m_i / ||W0 + s B_i A_i|| per expert and output feature, (E, d_out). The norm is computed without
    autograd and in fp32 whatever the autocast: DoRA (§4.3) treats it as a constant in backward."""
    with torch.no_grad(), torch.autocast(lora_A.device.type, enabled=False):
        norms = dora_row_norms(weight, lora_A, lora_B, scaling, num_experts)
    return magnitude / norms


def scaled_B(lora_B: Tensor, scale: Tensor, num_experts: int) -> Tensor:
    """B with expert i's columns scaled per output feature by c_i (scale (E, d_out)): (d_out, E·r)."""
    d_out = lora_B.shape[0]
    b = lora_B.view(d_out, num_experts, -1)
    return (b * scale.t()[:, :, None]).view(d_out, -1)


def output_without_bias(result: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """W0 x: the frozen layer's output ``result`` without its bias, in ``dtype``."""
    out = result.to(dtype)
    return out - bias.to(out.dtype) if bias is not None else out


def dora_update(delta: Tensor, gates: Tensor, scale: Tensor, base_out: Tensor) -> Tensor:
    """Σ_i g_i [s c_i ⊙ B_i A_i x̃ + (c_i − 1) ⊙ W0 x̃] from ``delta`` (the first terms, B scaled by c) and
    W0 x̃ (``base_out``, without bias): the second term is one (N, E) @ (E, d_out) product."""
    return delta + (gates.to(scale.dtype) @ (scale - 1)) * base_out


# --- whole-FFN experts -----------------------------------------------------------------------------
def every_expert(gates: Tensor) -> Tensor:
    """(N, E) expert ids 0..E-1 for every token: the slots of soft routing."""
    n_tokens, n_exp = gates.shape
    return torch.arange(n_exp, device=gates.device).expand(n_tokens, n_exp)


def ffn_output(
    experts: nn.Module,
    mlp: nn.Module,
    x: Tensor,
    x_drop: Tensor,
    gates: Tensor,
    selected: Tensor | None,
    dropout: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The output (N, d_model) of a gated MLP block ``mlp`` as a mixture of whole-FFN experts, in the
    adapter's dtype: Σ_i g_i FFN_i(x), FFN_i(x) = W_d,i (act(W_g,i x) ⊙ W_u,i x), W_p,i = W_p + s B_p,i A_p,i.

    ``experts`` holds ``comoe_{gate,up,down}_{A,B}`` (stacked as LoRA experts') and ``num_experts``, ``r``,
    ``scaling``; x (N, d_model) is the block input, x_drop its dropped-out copy in the adapter's dtype
    (the LoRA A's read it), ``dropout`` the dropout of each expert's hidden state before its down LoRA
    (None: none, as in inference).
    The frozen gate and up projections run once per token, the frozen down projection once on Σ g_i h_i
    (the gates sum to 1), each selected expert's LoRA updates once per top-k slot."""
    n_exp, rank, scaling = experts.num_experts, experts.r, experts.scaling
    slots = selected if selected is not None else every_expert(gates)
    dtype = experts.comoe_gate_A.dtype
    gate_base = mlp.gate_proj(x).to(dtype)  # the frozen projections, once per token
    up_base = mlp.up_proj(x).to(dtype)
    gate_codes = x_drop @ experts.comoe_gate_A.t()  # (N, E·r): every expert's code
    up_codes = x_drop @ experts.comoe_up_A.t()
    mixed = torch.zeros_like(gate_base)  # Σ_i g_i h_i
    down_codes = torch.zeros_like(gate_codes)  # Σ_i g_i A_down,i h̃_i, in expert i's slot

    def with_update(lora_B: Tensor, base_out: Tensor, codes: Tensor, select: Tensor) -> Tensor:
        """W_p x + s B_p,i A_p,i x̃ for the expert i that ``select`` (N, E, 1) picks for each token."""
        n_tokens = base_out.shape[0]
        picked = (codes.view(n_tokens, n_exp, -1) * select).view(n_tokens, -1)
        return base_out + scaling * (picked @ lora_B.t())

    for slot in range(slots.shape[1]):
        expert = slots[:, slot]
        select = F.one_hot(expert, n_exp).to(dtype)[:, :, None]  # (N, E, 1)
        weight = gates.gather(1, expert[:, None]).to(dtype)  # (N, 1)
        gate = with_update(experts.comoe_gate_B, gate_base, gate_codes, select)
        hidden = mlp.act_fn(gate) * with_update(experts.comoe_up_B, up_base, up_codes, select)
        mixed = mixed + weight * hidden
        dropped = hidden if dropout is None else dropout(hidden)
        codes = (dropped @ experts.comoe_down_A.t()).view(-1, n_exp, rank)
        down_codes = down_codes + (codes * select * weight[:, :, None]).view_as(down_codes)
    return mlp.down_proj(mixed.to(x.dtype)).to(dtype) + scaling * (down_codes @ experts.comoe_down_B.t())


# --- the inference modules of an exported model ----------------------------------------------------
class MixtureRouter(nn.Module):
    """A router's weight ``comoe_router`` (E, d_in), fp32, and its selection: tokens → (gates, selected)."""

    def __init__(self, num_experts: int, d_in: int, routing: str, top_k: int, top_p: float) -> None:
        super().__init__()
        self.routing, self.top_k, self.top_p = routing, top_k, top_p
        self.comoe_router = nn.Parameter(torch.empty(num_experts, d_in, dtype=torch.float32))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return select_gates(router_logits(x, self.comoe_router), self.routing, self.top_k, self.top_p)


class ExpertWeights(nn.Module):
    """The expert tensors of one layer, named as comoe saves them (``experts.comoe_A``, ...), fp32."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], num_experts: int, r: int, scaling: float):
        super().__init__()
        self.num_experts, self.r, self.scaling = num_experts, r, scaling
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(*shape, dtype=torch.float32)))


class _Mixture(nn.Module):
    """A frozen module (``base_layer``), its router (None for one expert) and its experts."""

    def __init__(self, base_layer: nn.Module, d_in: int, spec: Mapping[str, Any]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind, self.d_in = spec["kind"], d_in
        n_exp = spec["num_experts"]
        self.router = (
            MixtureRouter(n_exp, d_in, spec["routing"], spec["top_k"], spec["top_p"]) if n_exp > 1 else None
        )
        self.soft = spec["routing"] == "soft"

    def route(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(gates, selected) of the tokens ``x`` (N, d_in); one expert: every gate 1."""
        if self.router is not None:
            return self.router(x)
        gates = single_expert_gates(x.shape[0], x.device)
        return gates, None if self.soft else torch.zeros_like(gates, dtype=torch.long)


class MixtureLinear(_Mixture):
    """A frozen linear (``nn.Linear``, or a GPT-2 style one storing its weight as (in, out):
    ``transposed``) plus a routed mixture of LoRA or DoRA experts."""

    def __init__(self, base_layer: nn.Module, spec: Mapping[str, Any], transposed: bool = False) -> None:
        d_in, d_out = base_layer.weight.shape if transposed else base_layer.weight.shape[::-1]
        super().__init__(base_layer, d_in, spec)
        self.d_out, self.transposed = d_out, transposed
        n_codes = spec["num_experts"] * spec["r"]
        shapes = {"comoe_A": (n_codes, d_in), "comoe_B": (d_out, n_codes)}
        if self.kind == "dora":
            shapes["comoe_magnitude"] = (spec["num_experts"], d_out)
        self.experts = ExpertWeights(shapes, spec["num_experts"], spec["r"], spec["scaling"])

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        ex = self.experts
        x_flat = adapter_input(x.reshape(-1, self.d_in), ex.comoe_A.dtype)
        gates, _ = self.route(x_flat)
        base_out = result.reshape(-1, self.d_out)
        if self.kind == "dora":
            out = base_out + self._dora_update(base_out, x_flat, gates).to(base_out.dtype)
        elif adds_in_one_addmm(base_out, x_flat):
            out = dense_experts_added(base_out, x_flat, ex.comoe_A, ex.comoe_B, gates, ex.r, ex.scaling)
        else:
            delta, _ = lora_delta(x_flat, ex.comoe_A, ex.comoe_B, gates, ex.r, ex.scaling)
            out = base_out + delta.to(base_out.dtype)
        return out.view(*x.shape[:-1], self.d_out)

    def _dora_update(self, base_out: Tensor, x: Tensor, gates: Tensor) -> Tensor:
        """The DoRA experts' update of the output (N, d_out), in the adapter's dtype."""
        ex = self.experts
        weight = self.base_layer.weight.detach().float()
        weight = weight.t() if self.transposed else weight  # (d_out, d_in)
        scale = dora_scale(weight, ex.comoe_A, ex.comoe_B, ex.comoe_magnitude, ex.scaling, ex.num_experts)
        delta, _ = lora_delta(
            x, ex.comoe_A, scaled_B(ex.comoe_B, scale, ex.num_experts), gates, ex.r, ex.scaling
        )
        bias = getattr(self.base_layer, "bias", None)
        return dora_update(delta, gates, scale, output_without_bias(base_out, bias, ex.comoe_A.dtype))


class MixtureFFN(_Mixture):
    """A frozen gated MLP block (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``) as a routed mixture of
    whole-FFN experts."""

    def __init__(self, base_layer: nn.Module, spec: Mapping[str, Any]) -> None:
        super().__init__(base_layer, base_layer.gate_proj.in_features, spec)
        n_codes = spec["num_experts"] * spec["r"]
        shapes = {}
        for proj in FFN_PROJECTIONS:
            linear = getattr(base_layer, f"{proj}_proj")
            shapes[f"comoe_{proj}_A"] = (n_codes, linear.in_features)
            shapes[f"comoe_{proj}_B"] = (linear.out_features, n_codes)
        self.experts = ExpertWeights(shapes, spec["num_experts"], spec["r"], spec["scaling"])

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        x_flat = x.reshape(-1, self.d_in)
        gates, selected = self.route(x_flat)
        x_adapter = x_flat.to(self.experts.comoe_gate_A.dtype)
        out = ffn_output(self.experts, self.base_layer, x_flat, x_adapter, gates, selected)
        return out.view(*x.shape[:-1], -1).to(x.dtype)


def attach_mixtures(
    model: nn.Module,
    layers: Mapping[str, Mapping[str, Any]],
    transposed: Callable[[nn.Module], bool] = lambda module: False,
) -> None:
    """Put a ``MixtureLinear`` or ``MixtureFFN`` in place of every module ``layers`` names (dotted paths in
    ``model``), each holding the module it replaces as ``base_layer``. ``layers[name]``: kind (lora, dora,
    ffn), num_experts, r, scaling, routing, top_k, top_p."""
    for name, spec in layers.items():
        if spec["kind"] not in INFERENCE_KINDS:
            raise ValueError(f"{name}: expert kind must be one of {INFERENCE_KINDS}, got {spec['kind']!r}")
        base = model.get_submodule(name)
        mixture = (
            MixtureFFN(base, spec) if spec["kind"] == "ffn" else MixtureLinear(base, spec, transposed(base))
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, mixture)
