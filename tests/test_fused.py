"""A routed linear's training forward as one autograd node (``comoe.fused``) and a group's contrastive
loss as one node (``comoe.gram_loss``): the same outputs and every gradient as the plain ops they replace,
float64 gradients checked by finite differences, and fewer operators per module."""

from __future__ import annotations

import pytest
import torch

import comoe.layer
from comoe.fused import dropout_mask, routed_lora, spread_matrix
from comoe.gram_loss import gram_group_loss
from comoe.losses import stacked_cosines, stacked_info_nce
from comoe.model import get_comoe_model
from comoe.tools.bench.op_count import OpCounter
from tests.tiny_models import batch, build, randomize_adapters, tiny_comoe_config

N, D_IN, D_OUT, E, R, K = 9, 6, 5, 4, 2, 2


def _inputs(dtype=torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(N, D_IN, generator=gen, dtype=dtype),
        "base_out": torch.randn(N, D_OUT, generator=gen, dtype=dtype),
        "router": torch.randn(E, D_IN, generator=gen, dtype=dtype),
        "lora_A": torch.randn(E * R, D_IN, generator=gen, dtype=dtype),
        "lora_B": torch.randn(D_OUT, E * R, generator=gen, dtype=dtype),
    }


@pytest.mark.parametrize("contrastive", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_the_node_passes_gradcheck_in_float64(contrastive, dropout):
    """Every input's gradient (x, the base output, router, A, B) through every differentiable output (the
    layer output, the router's softmax, the codes and G) by finite differences."""
    leaves = {k: v.requires_grad_() for k, v in _inputs().items()}
    torch.manual_seed(2)
    keep = dropout_mask(leaves["x"], 0.3) if dropout else None
    keep_scale = 1 / 0.7 if dropout and contrastive else 1.0
    scale = 1.5 * (1 / 0.7 if dropout and not contrastive else 1.0)
    spread = spread_matrix(E, R, scale, "cpu", torch.float64)

    def fn(x, base_out, router, lora_A, lora_B):
        res = routed_lora(
            x, base_out, router, lora_A, lora_B, keep, spread, spread.t().contiguous(), K, keep_scale,
            torch.float64, "grad", contrastive,
        )  # fmt: skip
        return tuple(t for t in (res.out, res.probs, res.codes, res.gram) if t is not None)

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-7)


def _layer_step(fused: bool, monkeypatch, dtype=torch.float32, **overrides) -> tuple:
    """One training step of a tiny adapted Llama, the routing inside the experts' node or not."""
    if not fused:
        monkeypatch.setattr(comoe.layer.CoMoELayer, "_routes_in_experts", lambda self: False)
    config = tiny_comoe_config("llama", lora_dropout=0.1, **overrides)
    model = get_comoe_model(build("llama"), config).to(dtype)
    randomize_adapters(model)
    model.train()
    inputs = batch("llama")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    monkeypatch.undo()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    aux = {k: out[k].detach() for k in ("loss", "aux_loss", "contrastive_loss", "balance_loss") if k in out}
    return out.logits.detach(), aux, grads


@pytest.mark.parametrize(
    "overrides",
    [
        {"contrastive_weight": 0.0},
        {"contrastive_weight": 0.5},
        {"contrastive_weight": 0.5, "balance_weight": 0.1},
        {"contrastive_weight": 0.0, "balance_weight": 0.1, "anchor": "all"},
        {"contrastive_weight": 0.5, "contrastive_form": "materialized", "num_negatives": 1},
    ],
)
def test_the_model_step_equals_the_plain_ops(overrides, monkeypatch):
    """Logits, every loss and every adapter gradient of a training step: float64 to 1e-10 (the same
    function), float32 to float rounding."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-6)):
        fused = _layer_step(True, monkeypatch, dtype, **overrides)
        plain = _layer_step(False, monkeypatch, dtype, **overrides)
        torch.testing.assert_close(fused[0], plain[0], rtol=tol, atol=tol)
        assert fused[1].keys() == plain[1].keys()
        for key in fused[1]:
            torch.testing.assert_close(fused[1][key], plain[1][key], rtol=tol, atol=tol)
        assert all(g is not None for g in fused[2].values())
        for name in plain[2]:
            torch.testing.assert_close(fused[2][name], plain[2][name], rtol=tol, atol=tol, msg=name)


def test_the_node_is_taken_in_training_only_and_not_with_router_hooks():
    model = get_comoe_model(build("llama"), tiny_comoe_config("llama"))
    layer = next(iter(model.routed_modules.values()))
    model.train()
    assert layer._routes_in_experts()
    handle = layer.router.register_forward_hook(lambda *args: None)  # a hook sees the router's own forward
    assert not layer._routes_in_experts()
    handle.remove()
    with torch.no_grad():
        assert not layer._routes_in_experts()
    model.eval()
    assert not layer._routes_in_experts()


def test_the_node_dispatches_fewer_operators_than_the_plain_ops(monkeypatch):
    """Forward and backward of one adapted layer, counted as `benchmarks/op_count.py` counts them."""
    counts = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(comoe.layer.CoMoELayer, "_routes_in_experts", lambda self: False)
        model = get_comoe_model(build("llama", num_layers=1), tiny_comoe_config("llama", lora_dropout=0.1))
        layer = next(iter(model.routed_modules.values()))
        model.train()
        x = torch.randn(2, 7, 32, requires_grad=True)
        layer(x).sum().backward()  # warm-up
        with OpCounter() as counter:
            layer(x).sum().backward()
        counts[fused] = counter.total
        monkeypatch.undo()
    assert counts[True] <= counts[False] - 25, counts


@pytest.mark.parametrize("anchor", ["random", "all"])
@pytest.mark.parametrize("every_negative", [True, False])
def test_the_group_loss_node_equals_the_stacked_plain_loss_and_passes_gradcheck(anchor, every_negative):
    """``comoe.gram_loss``: the loss and logged cosines of ``stacked_cosines`` + ``stacked_info_nce``
    exactly, their gradients (codes and Gram matrices) to float64 rounding, and finite differences."""
    gen = torch.Generator().manual_seed(0)
    n_mod, n_tok, n_exp, rank = 3, 7, 4, 2
    codes = [torch.randn(n_tok, n_exp * rank, generator=gen, dtype=torch.float64) for _ in range(n_mod)]
    bs = [torch.randn(5, n_exp * rank, generator=gen, dtype=torch.float64) for _ in range(n_mod)]
    grams = [b.t() @ b for b in bs]
    leaves = [t.requires_grad_() for t in codes + grams]
    order = torch.rand(n_mod, n_tok, n_exp, generator=gen).argsort(-1)
    selected = order[..., :2]
    anchors = selected[..., :1] if anchor == "random" else selected
    active = torch.zeros(n_mod, n_tok, n_exp, dtype=torch.bool).scatter_(2, selected, True)
    negatives = ~active if every_negative else (~active).scatter(2, order[..., -1:], False)
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    weights = mask.double() / mask.sum()

    def node(*tensors):
        return gram_group_loss(
            list(tensors[:n_mod]), list(tensors[n_mod:]), anchors, active, negatives, weights, 0.07, 1e-3,
            1e-6, every_negative,
        )  # fmt: skip

    out = node(*leaves)
    cos = stacked_cosines(
        torch.stack(codes).view(n_mod, n_tok, n_exp, rank), None, anchors, 1e-6, gram=torch.stack(grams)
    )
    ref = stacked_info_nce(cos, anchors, active, negatives, 0.07, 1e-3, mask)
    for got, want in zip(out, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(out.loss.sum(), leaves)
    want = torch.autograd.grad(ref.loss.sum(), leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda *t: node(*t).loss, tuple(leaves))
