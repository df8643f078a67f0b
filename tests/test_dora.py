"""DoRA experts (CoMoE-DoRA) against a slow per-expert DoRA loop and against PEFT's own DoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from comoe.config import CoMoEConfig
from comoe.dense import dropout_keep
from comoe.dora import DoraState, dora_row_norms
from comoe.layer import CoMoELayer
from comoe.losses import contrastive_loss_materialized, draw_anchors, draw_negatives
from comoe.model import get_comoe_model
from comoe.trace import ForwardContext
from tests.references import reference_route
from tests.tiny_models import build, contrastive_of_call, tiny_comoe_config

pytestmark = pytest.mark.usefixtures("single_thread")

D_IN, D_OUT = 16, 12
TOL = {"rtol": 1e-5, "atol": 1e-5}


def dora_layer(base, *, num_experts, top_k, r=4, path="dense", routing="topk", seed=0) -> CoMoELayer:
    cfg = CoMoEConfig(
        r=r,
        lora_alpha=2.0 * r + 1.0,
        lora_dropout=0.0,
        num_experts=num_experts,
        top_k=top_k,
        routing=routing,
        expert_path=path,
        contrastive_weight=0.0,
        use_dora=True,
    )
    for p in base.parameters():
        p.requires_grad_(False)
    layer = CoMoELayer(base, cfg, ForwardContext(), name="probe")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 and m = ||W0|| at init make every expert the identity: move them off it
        layer.experts.comoe_B.copy_(torch.randn(layer.experts.comoe_B.shape, generator=gen) * 0.3)
        if layer.router is not None:  # one expert has no router
            layer.router.comoe_router.copy_(torch.randn(layer.router.comoe_router.shape, generator=gen))
        layer.experts.comoe_magnitude.mul_(
            1 + 0.2 * torch.randn(layer.experts.comoe_magnitude.shape, generator=gen)
        )
    return layer


def weight_of(base) -> torch.Tensor:
    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def reference(x, x_drop, base, A, B, router, magnitude, *, num_experts, r, top_k, scaling, routing="topk"):
    """One token, one expert at a time: expert i's DoRA update c_i ⊙ (W0 + s B_i A_i) x̃ − W0 x̃ with
    c_i = m_i / ||W0 + s B_i A_i|| (the norm detached), materialising each expert's full weight."""
    w0 = weight_of(base)
    bias = base.bias if base.bias is not None else torch.zeros(w0.shape[0])
    scales = []
    for i in range(num_experts):
        merged = w0 + scaling * B[:, i * r : (i + 1) * r] @ A[i * r : (i + 1) * r]
        scales.append(magnitude[i] / merged.detach().norm(dim=1))
    rows = []
    for n in range(x.shape[0]):
        y = w0 @ x[n] + bias
        chosen, weights = reference_route(router, x[n], num_experts=num_experts, top_k=top_k, routing=routing)
        for slot, i in enumerate(chosen):
            merged = w0 + scaling * B[:, i * r : (i + 1) * r] @ A[i * r : (i + 1) * r]
            update = scales[i] * (merged @ x_drop[n]) - w0 @ x_drop[n]
            y = y + weights[slot] * update
        rows.append(y)
    return torch.stack(rows)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize(
    ("num_experts", "top_k", "path", "routing", "kind", "dropped"),
    [
        (4, 2, "dense", "topk", "linear", False),
        (4, 2, "grouped", "topk", "linear", False),
        (6, 3, "dense", "topk", "conv1d", False),
        (4, 4, "dense", "soft", "linear", False),
        (4, 2, "dense", "topk", "linear", True),  # dropout on: W0 x̃ is computed, not taken from the base
        (4, 2, "grouped", "topk", "linear", True),
    ],
)
def test_dora_experts_match_a_per_expert_dora_loop(num_experts, top_k, path, routing, kind, dropped):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT) if kind == "linear" else Conv1D(D_OUT, D_IN)
    layer = dora_layer(base, num_experts=num_experts, top_k=top_k, path=path, routing=routing)
    x = torch.randn(2, 5, D_IN)
    if dropped:  # the layer draws its mask as dropout_keep does: the same seed gives the reference the same
        layer.experts.dropout = nn.Dropout(0.3)
    layer.train()
    x_layer = leaf(x)
    torch.manual_seed(3)
    y = layer(x_layer)
    torch.manual_seed(3)
    mask = dropout_keep(torch.empty(10, D_IN), 0.3).float()
    assert 0 < mask.sum() < mask.numel()
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * weights).sum().backward()

    x_ref = leaf(x)
    A, B, router, m = (
        leaf(t)
        for t in (
            layer.experts.comoe_A,
            layer.experts.comoe_B,
            layer.router.comoe_router,
            layer.experts.comoe_magnitude,
        )
    )
    flat = x_ref.reshape(-1, D_IN)
    flat_drop = flat * mask / 0.7 if dropped else flat
    kwargs = dict(num_experts=num_experts, r=layer.r, top_k=top_k, scaling=layer.scaling, routing=routing)
    y_ref = reference(flat, flat_drop, base, A, B, router, m, **kwargs)
    (y_ref.view(y.shape) * weights).sum().backward()

    torch.testing.assert_close(y, y_ref.view(y.shape), **TOL)
    for mine, theirs in [
        (layer.experts.comoe_A, A),
        (layer.experts.comoe_B, B),
        (layer.router.comoe_router, router),
        (layer.experts.comoe_magnitude, m),
    ]:
        torch.testing.assert_close(mine.grad, theirs.grad, **TOL)
        assert theirs.grad.abs().sum() > 0
    torch.testing.assert_close(x_layer.grad, x_ref.grad, **TOL)


def test_row_norms_from_rank_r_products_equal_the_materialised_norms():
    gen = torch.Generator().manual_seed(1)
    weight, a, b = (
        torch.randn(12, 16, generator=gen),
        torch.randn(15, 16, generator=gen),
        torch.randn(12, 15, generator=gen),
    )
    norms = dora_row_norms(weight, a, b, scaling=0.7, num_experts=3)
    for i in range(3):
        merged = weight + 0.7 * b[:, i * 5 : (i + 1) * 5] @ a[i * 5 : (i + 1) * 5]
        torch.testing.assert_close(norms[i], merged.norm(dim=1), **TOL)


def test_one_dora_expert_is_peft_dora():
    """E = 1, top-1: the gate is 1, so the layer is exactly PEFT's DoRA on the same weights (and gradients)."""
    torch.manual_seed(0)
    theirs = get_peft_model(
        nn.Sequential(nn.Linear(D_IN, D_OUT)),
        LoraConfig(r=4, lora_alpha=9, target_modules=["0"], use_dora=True),
    )
    peft_layer = theirs.base_model.model[0]
    layer = dora_layer(peft_layer.base_layer, num_experts=1, top_k=1)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.experts.comoe_A)
        peft_layer.lora_B["default"].weight.copy_(layer.experts.comoe_B)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.experts.comoe_magnitude[0])
    x = torch.randn(6, D_IN)
    theirs.train(), layer.train()
    y_theirs, y_mine = theirs(x), layer(x)
    torch.testing.assert_close(y_mine, y_theirs, **TOL)
    (y_theirs.square().sum() + y_mine.square().sum()).backward()
    torch.testing.assert_close(layer.experts.comoe_B.grad, peft_layer.lora_B["default"].weight.grad, **TOL)
    torch.testing.assert_close(layer.experts.comoe_A.grad, peft_layer.lora_A["default"].weight.grad, **TOL)
    torch.testing.assert_close(
        layer.experts.comoe_magnitude.grad[0], peft_layer.lora_magnitude_vector["default"].weight.grad, **TOL
    )


def test_at_initialisation_dora_experts_change_nothing():
    base = build("llama", seed=0)
    x = torch.randint(0, base.config.vocab_size, (2, 7))
    with torch.no_grad():
        before = base(x).logits
    model = get_comoe_model(base, tiny_comoe_config("llama", use_dora=True))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, **TOL)


def test_the_contrastive_loss_of_dora_experts_is_that_of_their_materialised_outputs():
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = dora_layer(base, num_experts=5, top_k=2)
    layer.config.anchor = "all"  # deterministic: every activated expert is an anchor
    x = torch.randn(9, D_IN)
    codes = leaf(x @ layer.experts.comoe_A.t()).view(9, 5, layer.r)
    routing = layer.route(x)
    top_idx = routing.selected
    scale = layer.experts.dora_scale(layer.base_layer)
    w0x = x @ base.weight.t()
    mine = contrastive_of_call(
        layer, routing, layer.experts._contrastive_inputs(codes, DoraState(scale, w0x))
    )
    # the outputs the reference loop adds up, one expert at a time, without the layer's code
    outputs = torch.stack(
        [
            torch.stack(
                [
                    layer.scaling * scale[i] * (layer.experts.comoe_B[:, i * 4 : (i + 1) * 4] @ codes[n, i])
                    + (scale[i] - 1) * w0x[n]
                    for i in range(5)
                ]
            )
            for n in range(9)
        ]
    )
    kwargs = dict(temperature=0.1, epsilon=1e-3, token_mask=None, norm_eps=layer.config.norm_eps)
    anchors = draw_anchors(top_idx, "all")
    negatives = draw_negatives(top_idx, 5, None)
    reference_loss = contrastive_loss_materialized(
        outputs, top_idx, anchors=anchors, negatives=negatives, **kwargs
    )
    torch.testing.assert_close(mine.loss, reference_loss.loss, **TOL)
    assert torch.isfinite(mine.loss) and mine.loss > 0


def test_the_parameter_count_includes_the_magnitudes():
    from comoe.placement import adapter_parameter_count

    config = tiny_comoe_config("llama", use_dora=True)
    expected = adapter_parameter_count(build("llama"), config)
    model = get_comoe_model(build("llama"), config)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    lora_only = adapter_parameter_count(build("llama"), tiny_comoe_config("llama"))
    assert expected - lora_only == sum(p.numel() for n, p in model.named_parameters() if "magnitude" in n)


def test_method_lora_with_use_dora_is_peft_dora_and_reloads_exactly(tmp_path):
    """`comoe train --method lora --use-dora`: PEFT's DoRA on the modules CoMoE would adapt; saved and loaded
    back by the same path `comoe eval` takes."""
    from comoe.training.adapters import build_adapted_model, load_adapted_model, save_adapter
    from comoe.training.run_config import RunConfig

    run = RunConfig.from_dict({"method": "lora", "target_modules": "q_proj,v_proj", "use_dora": True, "r": 4})
    model = build_adapted_model(build("llama", seed=0), run)
    magnitudes = [n for n, p in model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert len(magnitudes) == 2 * 2  # q and v of both layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    x = torch.randint(0, 100, (2, 7))
    model.eval()
    with torch.no_grad():
        expected = model(x).logits
    save_adapter(model, tmp_path / "adapter")
    again = load_adapted_model(build("llama", seed=0), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, expected, rtol=0, atol=0)


def test_dora_experts_under_bf16_autocast_keep_fp32_norms_and_train():
    """`--bf16`: the frozen base in bf16 and autocast on; the DoRA scales stay fp32 and every adapter tensor
    gets a finite gradient."""
    base = nn.Linear(D_IN, D_OUT).to(torch.bfloat16)
    layer = dora_layer(base, num_experts=4, top_k=2)
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scale = layer.experts.dora_scale(layer.base_layer)
        y = layer(torch.randn(6, D_IN, dtype=torch.bfloat16))
    # the row norms are computed in fp32 under autocast too: the same scales as outside it, bit for bit
    torch.testing.assert_close(scale, layer.experts.dora_scale(layer.base_layer), rtol=0, atol=0)
    assert scale.dtype == torch.float32 and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    for p in (
        layer.experts.comoe_A,
        layer.experts.comoe_B,
        layer.experts.comoe_magnitude,
        layer.router.comoe_router,
    ):
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
