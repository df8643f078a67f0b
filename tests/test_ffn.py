"""Whole-FFN experts (placement='ffn', MixLoRA's design) against a loop over copies of the FFN, on the MLPs
of four model families; the clear errors on MLPs they do not fit; save/reload; parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn
from torch.func import functional_call

from comoe.config import CoMoEConfig
from comoe.ffn import CoMoEFFNLayer, is_gated_mlp
from comoe.layer import CoMoELayer
from comoe.losses import contrastive_loss_materialized, draw_anchors, draw_negatives
from comoe.model import AdapterLoadError, CoMoEModel, get_comoe_model
from comoe.placement import adapter_parameter_count
from comoe.trace import ForwardContext
from comoe.training.job import check_adapter_fits
from comoe.training.run_config import RunConfig
from tests.references import reference_route
from tests.tiny_models import batch, build, contrastive_of_call

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = {"rtol": 1e-5, "atol": 1e-5}
PROJECTIONS = ("gate", "up", "down")


FAMILIES = ["llama", "qwen2", "mistral", "gemma"]  # gated MLPs; Gemma's is GELU-tanh, its own class


def ffn_config(**overrides) -> CoMoEConfig:
    kwargs = dict(
        placement="ffn", r=4, lora_alpha=9.0, num_experts=4, top_k=2, lora_dropout=0.0, contrastive_weight=0.0
    )
    return CoMoEConfig(**{**kwargs, **overrides})


def ffn_layer(mlp: nn.Module, seed: int = 0, **overrides) -> CoMoEFFNLayer:
    for p in mlp.parameters():
        p.requires_grad_(False)
    layer = CoMoEFFNLayer(mlp, ffn_config(**overrides), ForwardContext(), name="mlp")
    randomise(layer, seed)
    return layer


@torch.no_grad()
def randomise(layer: CoMoEFFNLayer, seed: int) -> None:
    """B = 0 at init makes every expert the frozen FFN: give B (and a decisive router) random values."""
    gen = torch.Generator().manual_seed(seed)
    for proj in PROJECTIONS:
        b = getattr(layer.experts, f"comoe_{proj}_B")
        b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
    if layer.router is not None:
        layer.router.comoe_router.copy_(torch.randn(layer.router.comoe_router.shape, generator=gen))


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def expert_copy_forward(mlp, tensors: dict, i: int, r: int, scaling: float, x):
    """Expert i as a copy of the FFN whose gate/up/down weights are W + s B_i A_i, run by the MLP's own forward."""
    merged = {}
    for proj in PROJECTIONS:
        a = tensors[f"{proj}_A"][i * r : (i + 1) * r]
        b = tensors[f"{proj}_B"][:, i * r : (i + 1) * r]
        merged[f"{proj}_proj.weight"] = getattr(mlp, f"{proj}_proj").weight + scaling * b @ a
    return functional_call(copy.deepcopy(mlp), merged, (x,))


def adapter_leaves(layer: CoMoEFFNLayer) -> dict:
    tensors = {
        f"{p}_{ab}": leaf(getattr(layer.experts, f"comoe_{p}_{ab}")) for p in PROJECTIONS for ab in "AB"
    }
    tensors["router"] = leaf(layer.router.comoe_router)
    return tensors


def reference_forward(mlp, tensors, x, *, num_experts, top_k, r, scaling, routing="topk"):
    rows = []
    for n in range(x.shape[0]):
        chosen, weights = reference_route(
            tensors["router"], x[n], num_experts=num_experts, top_k=top_k, routing=routing
        )
        outs = [expert_copy_forward(mlp, tensors, i, r, scaling, x[n : n + 1])[0] for i in chosen]
        rows.append(sum(w * o for w, o in zip(weights, outs, strict=True)))
    return torch.stack(rows)


def check_against_copies(layer: CoMoEFFNLayer, x: torch.Tensor, routing: str = "topk") -> None:
    """Output and the gradients of every adapter tensor and of x, against the loop over FFN copies."""
    x_layer = leaf(x)
    y = layer(x_layer)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * weights).sum().backward()

    tensors, x_ref = adapter_leaves(layer), leaf(x)
    flat = x_ref.reshape(-1, x.shape[-1])
    kwargs = dict(num_experts=layer.num_experts, top_k=layer.top_k, r=layer.r, scaling=layer.scaling)
    y_ref = reference_forward(layer.base_layer, tensors, flat, routing=routing, **kwargs).view(y.shape)
    (y_ref * weights).sum().backward()

    torch.testing.assert_close(y, y_ref, **TOL)
    for name, ref in tensors.items():
        holder = layer.router if name == "router" else layer.experts
        mine = getattr(holder, f"comoe_{name}")
        torch.testing.assert_close(mine.grad, ref.grad, **TOL, msg=lambda m, name=name: f"comoe_{name}: {m}")
        assert ref.grad.abs().sum() > 0, name
    torch.testing.assert_close(x_layer.grad, x_ref.grad, **TOL)
    assert all(p.grad is None for p in layer.base_layer.parameters())  # the shared FFN stays frozen


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_experts_equal_a_loop_over_copies_of_each_family_mlp(family):
    model = build(family)
    mlp = model.model.layers[0].mlp
    layer = ffn_layer(mlp, num_experts=4, top_k=2)
    check_against_copies(layer, torch.randn(2, 5, mlp.gate_proj.in_features))


@pytest.mark.parametrize(
    ("num_experts", "top_k", "routing"), [(3, 1, "topk"), (5, 3, "topk"), (3, 3, "soft")]
)
def test_ffn_experts_equal_the_loop_for_other_routings_and_a_biased_mlp(num_experts, top_k, routing):
    torch.manual_seed(0)
    mlp = copy.deepcopy(build("llama").model.layers[1].mlp)
    for proj in PROJECTIONS:  # Llama with mlp_bias=True: biases in every projection
        linear = getattr(mlp, f"{proj}_proj")
        linear.bias = nn.Parameter(torch.randn(linear.out_features) * 0.1)
    layer = ffn_layer(mlp, num_experts=num_experts, top_k=top_k, routing=routing, seed=3)
    x = torch.randn(7, 32)
    if top_k == 1:  # one renormalised gate is 1: the router gets no gradient, nothing else changes
        y = layer(leaf(x))
        tensors = adapter_leaves(layer)
        kwargs = dict(num_experts=num_experts, top_k=top_k, r=layer.r, scaling=layer.scaling)
        torch.testing.assert_close(y, reference_forward(mlp, tensors, x, **kwargs), **TOL)
        return
    check_against_copies(layer, x, routing=routing)


def test_contrastive_loss_of_ffn_experts_compares_their_updates_of_the_block_output():
    """E_i(x) = FFN_i(x) − FFN(x) from the copies, through the same InfoNCE; gradients reach every expert."""
    mlp = build("llama").model.layers[0].mlp
    layer = ffn_layer(mlp, num_experts=5, top_k=2, contrastive_weight=0.1, anchor="all")
    x = torch.randn(9, 32)
    routing = layer.route(x)
    top_idx = routing.selected
    mine = contrastive_of_call(layer, routing, layer.experts._contrastive_inputs(layer.base_layer, x, x))
    mine.loss.backward()

    tensors = adapter_leaves(layer)
    frozen = mlp(x)
    outputs = torch.stack(
        [expert_copy_forward(mlp, tensors, i, layer.r, layer.scaling, x) - frozen for i in range(5)], dim=1
    )
    kwargs = dict(temperature=0.1, epsilon=1e-3, norm_eps=1e-6)
    anchors, negatives = draw_anchors(top_idx, "all"), draw_negatives(top_idx, 5, None)
    ref = contrastive_loss_materialized(outputs, top_idx, anchors=anchors, negatives=negatives, **kwargs)
    ref.loss.backward()
    torch.testing.assert_close(mine.loss, ref.loss, **TOL)
    for name in ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B"):
        torch.testing.assert_close(getattr(layer.experts, f"comoe_{name}").grad, tensors[name].grad, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_placement_ffn_wraps_each_mlp_block_and_plain_lora_on_attention(family, tmp_path):
    """Each MLP block a mixture of FFN experts, each attention target one plain LoRA (no router); the
    adapted model equals the base at init, trains with both auxiliary losses, and reloads exactly
    (CoMoE's loader and PEFT's)."""
    base = build(family)
    inputs = batch("llama")
    with torch.no_grad():
        before = base(**inputs).logits
    config = ffn_config(contrastive_weight=0.1, balance_weight=0.01, target_modules=["q_proj", "v_proj"])
    model = get_comoe_model(base, config)
    kinds = {name: type(m).__name__ for name, m in model.adapted_modules.items()}
    assert kinds == {
        **{f"model.layers.{i}.mlp": "CoMoEFFNLayer" for i in range(2)},
        **{f"model.layers.{i}.self_attn.{p}": "CoMoELayer" for i in range(2) for p in ("q_proj", "v_proj")},
    }
    assert sorted(model.routed_modules) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(m.router is None for n, m in model.adapted_modules.items() if "self_attn" in n)
    assert model.get_nb_trainable_parameters()[0] == adapter_parameter_count(build(family), config)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, **TOL)  # B = 0: every expert is the FFN

    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = model(**inputs, labels=inputs["input_ids"])
        assert out.contrastive_loss > 0 and out.balance_loss > 0
        out.loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
    assert not torch.allclose(trained, before)
    model.save_pretrained(tmp_path)
    for loader in (CoMoEModel.from_pretrained, PeftModel.from_pretrained):
        reloaded = loader(build(family), tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=0, atol=0)


def test_target_modules_inside_the_blocks_are_part_of_the_ffn_experts():
    """'all-linear' under placement='ffn': gate/up/down belong to the FFN experts, the rest get plain LoRA."""
    model = get_comoe_model(build("llama"), ffn_config(target_modules="all-linear", layers=[1]))
    assert sorted(model.adapted_modules) == ["model.layers.1.mlp"] + [
        f"model.layers.1.self_attn.{p}" for p in ("k_proj", "o_proj", "q_proj", "v_proj")
    ]


class ReluSquaredMLP(nn.Module):
    """gate/up/down and an act_fn, but its forward is not down(act(gate(x)) * up(x))."""

    def __init__(self, d: int = 32, d_ff: int = 48):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, d_ff), nn.Linear(d, d_ff)
        self.down_proj, self.act_fn = nn.Linear(d_ff, d), nn.ReLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) ** 2 + self.up_proj(x))


def test_mlps_that_ffn_experts_do_not_fit_are_refused_with_the_block_named():
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp \(GPT2MLP\).*placement='linear'"):
        get_comoe_model(build("gpt2"), ffn_config(target_modules=["c_attn"]))
    phi3 = build("phi3")  # gate and up fused in one gate_up_proj
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(Phi3MLP\)"):
        get_comoe_model(phi3, ffn_config(target_modules=["qkv_proj"]))
    assert all(not isinstance(m, (CoMoELayer, CoMoEFFNLayer)) for m in phi3.modules())  # left as given
    odd = ReluSquaredMLP()
    assert is_gated_mlp(odd)
    with pytest.raises(ValueError, match="its forward computes something else"):
        CoMoEFFNLayer(odd, ffn_config(), ForwardContext(), name="odd")
    with pytest.raises(ValueError, match="DoRA FFN experts"):
        ffn_config(use_dora=True)


def test_unload_and_a_refused_load_give_the_base_model_back(tmp_path):
    """unload() puts every MLP block and linear back; a load onto a base of another shape is refused with
    nothing changed in the caller's model."""
    base = build("llama")
    inputs = batch("llama")
    with torch.no_grad():
        before = base(**inputs).logits
    model = get_comoe_model(base, ffn_config(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    unloaded = model.base_model.unload()
    assert not any(isinstance(m, (CoMoELayer, CoMoEFFNLayer)) for m in unloaded.modules())
    assert type(unloaded.model.layers[0].mlp).__name__ == "LlamaMLP"
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**inputs).logits, before, rtol=0, atol=0)
    wider = build("llama", hidden=64)
    with pytest.raises(AdapterLoadError, match="shape"):
        CoMoEModel.from_pretrained(wider, tmp_path)
    assert not any(isinstance(m, (CoMoELayer, CoMoEFFNLayer)) for m in wider.modules())
    assert not any("comoe_" in name for name, _ in wider.named_parameters())


def test_a_misspelled_target_and_an_mlp_that_does_not_fit_fail_before_training():
    with pytest.raises(ValueError, match="matched no"):
        get_comoe_model(build("llama"), ffn_config(target_modules=["q_prj"]))
    mixlora = RunConfig(method="mixlora")
    with pytest.raises(ValueError, match=r"GPT2MLP"):
        check_adapter_fits(build("gpt2"), mixlora)  # what `comoe train` checks before any evaluation


def test_one_expert_per_block_counts_no_router():
    config = ffn_config(num_experts=1, top_k=1, target_modules=["q_proj"])
    model = get_comoe_model(build("llama"), config)
    assert model.get_nb_trainable_parameters()[0] == adapter_parameter_count(build("llama"), config)
