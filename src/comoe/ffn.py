"""Whole-FFN experts (MixLoRA's design): one router per MLP block, expert i the block's frozen FFN with
its own LoRA on gate, up and down.

    FFN_i(x) = W_d,i h_i,   h_i = act(W_g,i x) ⊙ (W_u,i x),   W_p,i = W_p + s B_p,i A_p,i
    y = Σ_{i ∈ top-k(x)} g_i(x) FFN_i(x)

The frozen weights are shared, never copied. The frozen gate and up projections run once per token and
each selected expert adds its LoRA update to them; as the gates sum to 1 and the down projection is
linear, the frozen down projection also runs once, on Σ g_i h_i, and only the down LoRA runs per expert.
So a block costs one frozen FFN plus k experts' activations and LoRA updates, with fixed shapes: one pass
per top-k slot, dense codes as in ``CoMoELayer`` (no sort, no host sync).

The contrastive loss compares E_i(x) = FFN_i(x) − FFN(x), each expert's update of the block's output (as
a LoRA expert's E_i is its update B_i A_i x; the whole FFN_i(x) would be dominated by the shared FFN(x)).
It is materialised for every expert (the nonlinearity leaves no Gram form): E FFN passes per token.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comoe.config import CoMoEConfig
from comoe.frozen import base_weight
from comoe.mixture import MixtureLayer
from comoe.targets import find_targets, layer_index, matching_modules, num_hidden_layers, resolve_layers
from comoe.trace import ContrastiveInputs, ForwardContext, Samples

PROJECTIONS = ("gate", "up", "down")
SUPPORTED = (
    "MLP blocks with gate_proj, up_proj and down_proj linears and an act_fn, computing "
    "down_proj(act_fn(gate_proj(x)) * up_proj(x)): Llama, Qwen2/3, Mistral, Gemma 1-3, OLMo 2, Granite, SmolLM"
)
_MLP_NAMES = ("mlp", "feed_forward", "ffn")  # what a block's MLP is called, to name the ones not recognised


def is_gated_mlp(module: nn.Module) -> bool:
    """Whether ``module`` looks like a gated MLP (gate/up/down linears and an activation)."""
    linears = all(isinstance(getattr(module, f"{p}_proj", None), nn.Linear) for p in PROJECTIONS)
    return linears and callable(getattr(module, "act_fn", None))


def find_mlp_blocks(model: nn.Module, config: CoMoEConfig) -> list[str]:
    """Names of the MLP blocks that ``config`` (placement='ffn') turns into mixtures of FFN experts, in the
    layers it selects; a clear error when a selected block is not a gated MLP, or none is found."""
    blocks = [name for name, m in model.named_modules() if name and is_gated_mlp(m)]
    others = [
        (name, type(m).__name__)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in _MLP_NAMES and not is_gated_mlp(m)
    ]
    allowed = resolve_layers(config.layers, num_hidden_layers(model, [n for n, _ in others] + blocks))
    if allowed is not None:
        blocks = [name for name in blocks if layer_index(name) in allowed]
        others = [(name, kind) for name, kind in others if layer_index(name) in allowed]
    if others:
        name, kind = others[0]
        raise ValueError(
            f"placement='ffn' cannot make experts of {name} ({kind}): it supports {SUPPORTED}. "
            f"Use placement='linear' (experts on individual linears) for {type(model).__name__}"
        )
    if not blocks:
        raise ValueError(
            f"placement='ffn' found no MLP block in {type(model).__name__}: it supports {SUPPORTED}. "
            "Use placement='linear'"
        )
    return blocks


def ffn_targets(model: nn.Module, config: CoMoEConfig) -> tuple[list[str], list[str]]:
    """(MLP blocks for FFN experts, other target linears for one shared LoRA each) under placement='ffn'.

    Target linears inside a block (e.g. gate_proj under 'all-linear') are part of its FFN experts; a name
    that matches no linear at all is the same error as under placement='linear'."""
    blocks = find_mlp_blocks(model, config)
    inside = tuple(f"{block}." for block in blocks)
    matched = matching_modules(model, config.target_modules)
    if not matched:
        find_targets(model, config)  # raises its error, naming the model's adaptable modules
    allowed = resolve_layers(config.layers, num_hidden_layers(model, matched))
    in_layers = [name for name in matched if allowed is None or layer_index(name) in allowed]
    return blocks, [name for name in in_layers if not name.startswith(inside)]


def shared_lora_config(config: CoMoEConfig) -> CoMoEConfig:
    """The config of the plain LoRA that placement='ffn' puts on the other target linears: one expert."""
    return dataclasses.replace(
        config,
        num_experts=1,
        top_k=1,
        routing="topk",
        contrastive_weight=0.0,
        balance_weight=0.0,
        num_negatives=None,
        placement="linear",
        expert_path="dense",
    )


class CoMoEFFNLayer(MixtureLayer):
    """Wraps a gated MLP block (``base_layer``) as a routed mixture of whole-FFN experts.

    Adapter tensors: ``comoe_router`` (E, d_model) and, for p in gate/up/down, ``comoe_{p}_A`` (E·r, d_in)
    and ``comoe_{p}_B`` (d_out, E·r), the experts stacked as in ``CoMoELayer``.
    """

    adapter_layer_names = tuple(f"comoe_{p}_{ab}" for p in PROJECTIONS for ab in "AB") + ("comoe_router",)

    def __init__(
        self,
        base_layer: nn.Module,
        config: CoMoEConfig,
        context: ForwardContext,
        name: str = "",
        adapter_name: str = "default",
    ):
        super().__init__()
        if not is_gated_mlp(base_layer):
            raise TypeError(
                f"cannot make FFN experts of {type(base_layer).__name__}: it supports {SUPPORTED}"
            )
        self._init_tuner_layer(base_layer, config, context, name, adapter_name)
        self.hidden_size = base_layer.gate_proj.in_features
        self.intermediate_size = base_layer.gate_proj.out_features
        device = base_layer.gate_proj.weight.device
        n_codes = self.num_experts * self.r
        for proj in PROJECTIONS:
            linear = getattr(base_layer, f"{proj}_proj")
            a = torch.empty(n_codes, linear.in_features, device=device, dtype=torch.float32)
            b = torch.zeros(linear.out_features, n_codes, device=device, dtype=torch.float32)
            self.register_parameter(f"comoe_{proj}_A", nn.Parameter(a))
            self.register_parameter(f"comoe_{proj}_B", nn.Parameter(b))
        self._make_router(self.hidden_size, device)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_parameters()
        _check_computes_gated_mlp(base_layer, name)

    def adapter_parameters(self) -> list[nn.Parameter]:
        tensors = [getattr(self, f"comoe_{p}_{ab}") for p in PROJECTIONS for ab in "AB"]
        return tensors + ([self.comoe_router] if self.comoe_router is not None else [])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA init per expert and projection (A: Kaiming-uniform, B: 0); router: small normal."""
        for proj in PROJECTIONS:
            a = getattr(self, f"comoe_{proj}_A")
            for a_expert in a.view(self.num_experts, self.r, -1):
                nn.init.kaiming_uniform_(a_expert, a=math.sqrt(5))
            getattr(self, f"comoe_{proj}_B").zero_()
        if self.comoe_router is not None:
            nn.init.normal_(self.comoe_router, std=self.config.router_init_std)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        mlp = self.base_layer
        if self.disabled:
            return mlp(x, *args, **kwargs)
        lead_shape = x.shape[:-1]
        x_flat = x.reshape(-1, self.hidden_size)
        dtype = self.comoe_gate_A.dtype
        routing = self.route(x_flat)
        gates = routing.gates
        slots = routing.selected if routing.selected is not None else _every_expert(gates)
        x_drop = self.dropout(x_flat.to(dtype))
        gate_base = mlp.gate_proj(x_flat).to(dtype)  # the frozen projections, once per token
        up_base = mlp.up_proj(x_flat).to(dtype)
        gate_codes = x_drop @ self.comoe_gate_A.t()  # (N, E·r): every expert's code
        up_codes = x_drop @ self.comoe_up_A.t()
        mixed = torch.zeros_like(gate_base)  # Σ_i g_i h_i
        down_codes = torch.zeros_like(gate_codes)  # Σ_i g_i A_down,i h̃_i, in expert i's slot
        for slot in range(slots.shape[1]):
            expert = slots[:, slot]
            select = F.one_hot(expert, self.num_experts).to(dtype)[:, :, None]  # (N, E, 1)
            weight = gates.gather(1, expert[:, None]).to(dtype)  # (N, 1)
            gate = self._with_update("gate", gate_base, gate_codes, select)
            hidden = mlp.act_fn(gate) * self._with_update("up", up_base, up_codes, select)
            mixed = mixed + weight * hidden
            codes = (self.dropout(hidden) @ self.comoe_down_A.t()).view(-1, self.num_experts, self.r)
            down_codes = down_codes + (codes * select * weight[:, :, None]).view_as(down_codes)
        out = mlp.down_proj(mixed.to(x.dtype)).to(dtype) + self.scaling * (down_codes @ self.comoe_down_B.t())
        contrastive = None
        if self._contrastive_in_training():  # formed here, while the weights are whole
            contrastive = self._contrastive_inputs(x_flat, x_drop)
        if self._wants_aux() and not self._recomputing():
            idx = self._sample_tokens(x_flat.shape[0])
            with torch.no_grad():
                if contrastive is None and self._wants_contrastive_record():
                    contrastive = self._contrastive_inputs(x_flat, x_drop).compact(self.config.norm_eps)
                samples = None
                if idx is not None:
                    if contrastive is not None and contrastive.outputs is not None:
                        outputs = contrastive.outputs[idx]
                    else:
                        outputs = self._outputs(x_flat[idx], x_drop[idx])
                    samples = Samples(idx, outputs.detach().float())
            self._leave_trace(routing, contrastive, samples)
        return out.view(*lead_shape, -1).to(x.dtype)

    def _contrastive_inputs(self, x: Tensor, x_drop: Tensor) -> ContrastiveInputs:
        """Every expert's output update (materialised: the nonlinearity leaves no Gram form)."""
        return ContrastiveInputs(outputs=self._outputs(x, x_drop))

    def _outputs(self, x: Tensor, x_drop: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the loss is fp32 under autocast too
            return self.expert_outputs(x, x_drop)

    def _with_update(self, proj: str, base_out: Tensor, codes: Tensor, select: Tensor) -> Tensor:
        """W_p x + s B_p,i A_p,i x̃ for the expert i that ``select`` (N, E, 1) picks for each token."""
        n_tokens = base_out.shape[0]
        picked = (codes.view(n_tokens, self.num_experts, -1) * select).view(n_tokens, -1)
        return base_out + self.scaling * (picked @ getattr(self, f"comoe_{proj}_B").t())

    # --- the experts' outputs: contrastive loss and analysis ---------------------------------------
    def expert_outputs(self, x: Tensor, x_drop: Tensor) -> Tensor:
        """E_i(x) = FFN_i(x) − FFN(x) for every expert i, (N, E, d_model): the frozen projections see the
        block input x (N, d_model), the LoRA A's its dropped-out copy x̃, as in the forward.

        The down LoRA sees h_i without dropout, and the frozen gate and up run again here (cheaper to
        recompute than to keep for every forward)."""
        mlp = self.base_layer
        n_tokens, n_exp = x_drop.shape[0], self.num_experts
        gate_base = mlp.gate_proj(x).to(x_drop.dtype)
        up_base = mlp.up_proj(x).to(x_drop.dtype)

        def per_expert(proj: str, base_out: Tensor) -> Tensor:  # (E, N, d_ff): W_p x + s B_p,i A_p,i x
            codes = (x_drop @ getattr(self, f"comoe_{proj}_A").t()).view(n_tokens, n_exp, self.r)
            return base_out + self.scaling * torch.bmm(codes.transpose(0, 1), self._stacked_B(proj))

        # expert-major (E, N, ·) layout throughout: every product is one plain bmm or mm
        hidden = mlp.act_fn(per_expert("gate", gate_base)) * per_expert("up", up_base)
        shared = mlp.act_fn(gate_base) * up_base  # the frozen FFN's hidden state
        down_w = base_weight(mlp.down_proj).to(x_drop.dtype)
        down_a = self.comoe_down_A.view(n_exp, self.r, -1).transpose(1, 2)  # (E, d_ff, r)
        lora = self.scaling * torch.bmm(torch.bmm(hidden, down_a), self._stacked_B("down"))
        return ((hidden - shared) @ down_w.t() + lora).transpose(0, 1)  # (N, E, d_model)

    def _stacked_B(self, proj: str) -> Tensor:
        """comoe_{proj}_B as one (r, d_out) matrix per expert: (E, r, d_out)."""
        b = getattr(self, f"comoe_{proj}_B")
        return b.view(b.shape[0], self.num_experts, self.r).permute(1, 2, 0)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, experts={self.num_experts}, "
            f"top_k={self.top_k}, r={self.r}, routing={self.config.routing}"
        )


def _every_expert(gates: Tensor) -> Tensor:
    """(N, E) expert ids 0..E-1 for every token: the slots of soft routing."""
    n_tokens, n_exp = gates.shape
    return torch.arange(n_exp, device=gates.device).expand(n_tokens, n_exp)


@torch.no_grad()
def _check_computes_gated_mlp(mlp: nn.Module, name: str) -> None:
    """Refuse an MLP whose own forward is not down(act(gate(x)) * up(x)): FFN experts would change it.

    Checked on two random tokens; skipped for weights on the meta device (nothing to compute with)."""
    weight = mlp.gate_proj.weight
    if weight.is_meta:
        return
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    probe = torch.randn(2, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=weight.device, dtype=dtype)
    expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(probe)) * mlp.up_proj(probe))
    actual = mlp(probe)
    if actual.shape != expected.shape or not torch.allclose(
        actual.float(), expected.float(), atol=1e-3, rtol=1e-3
    ):
        raise ValueError(
            f"placement='ffn' cannot make experts of {name or type(mlp).__name__} ({type(mlp).__name__}): it has "
            f"gate/up/down projections but its forward computes something else. It supports {SUPPORTED}; use "
            "placement='linear'"
        )
