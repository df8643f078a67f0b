"""CoMoELayer against a slow per-token, per-expert reference loop: outputs and every gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import comoe.grouped as grouped_mod
from comoe.config import CoMoEConfig
from comoe.layer import CoMoELayer
from comoe.trace import ForwardContext
from tests.references import reference_route

pytestmark = pytest.mark.usefixtures("single_thread")

D_IN = 16
TOL = {"rtol": 1e-5, "atol": 1e-5}


# --- the reference: obviously correct, one token and one expert at a time ---------------------------
def reference_forward(x, base, A, B, router, *, num_experts, r, top_k, scaling, routing="topk", x_drop=None):
    """y_n = base(x_n) + Σ_i g_i(x_n) · B_i A_i x̃_n · α/r, with g from an fp32 softmax → top-k → renormalise.

    ``x`` (N, d_in); ``x_drop`` the dropped-out adapter input (default: ``x``). Returns (N, d_out).
    """
    x_drop = x if x_drop is None else x_drop
    rows = []
    for n in range(x.shape[0]):
        xn = x[n]
        if isinstance(base, Conv1D):  # GPT-2 layout: weight (in, out)
            y = xn @ base.weight + base.bias
        else:
            y = base.weight @ xn
            if base.bias is not None:
                y = y + base.bias
        chosen, weights = reference_route(router, xn, num_experts=num_experts, top_k=top_k, routing=routing)
        for slot, i in enumerate(chosen):
            A_i = A[i * r : (i + 1) * r]  # (r, d_in)
            B_i = B[:, i * r : (i + 1) * r]  # (d_out, r)
            y = y + weights[slot] * (B_i @ (A_i @ x_drop[n])) * scaling
        rows.append(y)
    return torch.stack(rows)


def make_layer(base, *, num_experts, top_k, r, path="dense", routing="topk", dropout=0.0, seed=0):
    cfg = CoMoEConfig(
        r=r,
        lora_alpha=2.0 * r + 1.0,
        lora_dropout=dropout,
        num_experts=num_experts,
        top_k=top_k,
        routing=routing,
        expert_path=path,
        contrastive_weight=0.0,
    )
    layer = CoMoELayer(base, cfg, ForwardContext(), name="probe")
    for p in base.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B is zero at init: give it (and a decisive router) random values
        layer.experts.comoe_B.copy_(torch.randn(layer.experts.comoe_B.shape, generator=gen) * 0.3)
        if layer.router is not None:  # one expert has no router
            layer.router.comoe_router.copy_(torch.randn(layer.router.comoe_router.shape, generator=gen))
    return layer


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def check_against_reference(layer, base, x, routing="topk"):
    """Forward and backward of ``layer`` vs the reference: output and grads of A, B, router and x."""
    n_exp, r, k = layer.num_experts, layer.r, layer.top_k
    x_layer = leaf(x)
    y = layer(x_layer)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * weights).sum().backward()

    routed = layer.router is not None
    router = leaf(layer.router.comoe_router if routed else torch.zeros(1, x.shape[-1]))  # one expert: gate 1
    x_ref, A, B = leaf(x), leaf(layer.experts.comoe_A), leaf(layer.experts.comoe_B)
    flat = x_ref.reshape(-1, x.shape[-1])
    y_ref = reference_forward(
        flat, base, A, B, router, num_experts=n_exp, r=r, top_k=k, scaling=layer.scaling, routing=routing
    )
    (y_ref.view(y.shape) * weights).sum().backward()

    torch.testing.assert_close(y, y_ref.view(y.shape), **TOL)
    torch.testing.assert_close(layer.experts.comoe_A.grad, A.grad, **TOL)
    torch.testing.assert_close(layer.experts.comoe_B.grad, B.grad, **TOL)
    if routed:
        torch.testing.assert_close(layer.router.comoe_router.grad, router.grad, **TOL)
    torch.testing.assert_close(x_layer.grad, x_ref.grad, **TOL)
    # the base stays frozen, and every adapter tensor really gets a gradient
    assert all(p.grad is None for p in base.parameters())
    assert layer.experts.comoe_A.grad.abs().sum() > 0 and layer.experts.comoe_B.grad.abs().sum() > 0
    if (routing == "soft" and n_exp > 1) or (routing == "topk" and k > 1):
        assert layer.router.comoe_router.grad.abs().sum() > 0
    elif routed:  # one renormalised gate is always 1: the router gets no gradient
        assert layer.router.comoe_router.grad.abs().max() < 1e-6


EKR = [(4, 1, 4), (4, 2, 2), (4, 2, 4), (4, 4, 4), (6, 3, 8), (3, 2, 1), (5, 5, 2)]


@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize(("num_experts", "top_k", "r"), EKR)
def test_linear_topk_matches_reference(path, num_experts, top_k, r):
    base = nn.Linear(D_IN, 12, bias=True)
    layer = make_layer(base, num_experts=num_experts, top_k=top_k, r=r, path=path)
    # k = E activates every expert: nothing to skip, the layer always takes the dense path
    assert layer.expert_path == ("dense" if top_k == num_experts else path)
    check_against_reference(layer, base, torch.randn(2, 5, D_IN))


@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize(("num_experts", "top_k", "r"), [(4, 1, 4), (4, 2, 2), (4, 4, 4), (6, 3, 8)])
def test_conv1d_topk_matches_reference(path, num_experts, top_k, r):
    base = Conv1D(24, D_IN)  # transformers' GPT-2 linear: weight (in=16, out=24)
    nn.init.normal_(base.bias)
    assert base.weight.shape == (D_IN, 24)
    layer = make_layer(base, num_experts=num_experts, top_k=top_k, r=r, path=path)
    assert (layer.in_features, layer.out_features) == (D_IN, 24)
    check_against_reference(layer, base, torch.randn(3, 4, D_IN))


def test_linear_without_bias_matches_reference():
    base = nn.Linear(D_IN, 8, bias=False)
    layer = make_layer(base, num_experts=4, top_k=2, r=4, path="dense")
    check_against_reference(layer, base, torch.randn(9, D_IN))


@pytest.mark.parametrize(("num_experts", "r"), [(1, 4), (4, 2), (6, 4)])
@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
def test_soft_routing_matches_reference(num_experts, r, base_kind):
    base = nn.Linear(D_IN, 12) if base_kind == "linear" else Conv1D(12, D_IN)
    layer = make_layer(base, num_experts=num_experts, top_k=1, r=r, routing="soft", path="grouped")
    assert layer.expert_path == "dense"  # soft routing activates every expert
    check_against_reference(layer, base, torch.randn(2, 6, D_IN), routing="soft")


def test_grouped_path_uses_grouped_mm_when_aligned_and_falls_back_otherwise(monkeypatch):
    """Both the grouped_mm kernel and the loop fallback (r = 2: rows of 8 bytes, which grouped_mm rejects)
    are exercised and exact."""
    if grouped_mod._GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    calls = []
    real = grouped_mod._GROUPED_MM

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(grouped_mod, "_GROUPED_MM", counting)
    base = nn.Linear(D_IN, 12)
    check_against_reference(
        make_layer(base, num_experts=4, top_k=2, r=4, path="grouped"), base, torch.randn(10, D_IN)
    )
    assert len(calls) == 2  # A then B, in one kernel call each
    calls.clear()
    check_against_reference(
        make_layer(base, num_experts=4, top_k=2, r=2, path="grouped"), base, torch.randn(10, D_IN)
    )
    assert calls == []


@pytest.mark.parametrize("with_codes", [False, True])
def test_grouped_path_runs_its_products_in_the_autocast_dtype(monkeypatch, with_codes):
    """`--bf16` on the grouped path: grouped_mm is not on autocast's lists, so the layer casts its operands
    as autocast casts the dense path's; output and gradients match the dense path's under autocast."""
    if grouped_mod._GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    dtypes = []
    real = grouped_mod._GROUPED_MM

    def recording(x, weights, **kwargs):
        dtypes.append((x.dtype, weights.dtype))
        return real(x, weights, **kwargs)

    monkeypatch.setattr(grouped_mod, "_GROUPED_MM", recording)
    base = nn.Linear(64, 32).to(torch.bfloat16)
    dense = make_layer(base, num_experts=4, top_k=2, r=8, path="dense")
    grouped = make_layer(base, num_experts=4, top_k=2, r=8, path="grouped")
    grouped.load_state_dict(dense.state_dict())
    if with_codes:  # the contrastive term's codes are computed first and shared (sorted, not recomputed)
        for layer in (dense, grouped):
            layer.config.contrastive_weight = 0.1
    x = torch.randn(24, 64).to(torch.bfloat16)
    outs = []
    for layer in (dense, grouped):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        outs.append((y, {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}))
    assert dtypes and all(d == (torch.bfloat16, torch.bfloat16) for d in dtypes)
    assert len(dtypes) == (1 if with_codes else 2)
    (y_dense, g_dense), (y_grouped, g_grouped) = outs
    assert y_grouped.dtype == torch.bfloat16
    torch.testing.assert_close(y_grouped.float(), y_dense.float(), rtol=2e-2, atol=2e-2)
    for name, grad in g_dense.items():
        assert g_grouped[name].dtype == torch.float32
        torch.testing.assert_close(g_grouped[name], grad, rtol=5e-2, atol=5e-2 * grad.abs().max().item())


@pytest.mark.parametrize("precision", ["fp32", "bf16 autocast", "bf16 base, no autocast"])
def test_inference_adds_the_update_in_one_addmm_and_computes_what_the_graph_path_does(monkeypatch, precision):
    """Generation's path (eval, no autograd): the scaling and the residual add fused into one addmm, the
    same outputs as the path autograd takes; a bf16 base without autocast (fp32 adapters) keeps that path."""
    import comoe.experts

    calls = []
    fused = comoe.experts.dense_experts_added
    monkeypatch.setattr(
        comoe.experts, "dense_experts_added", lambda *a, **k: calls.append(1) or fused(*a, **k)
    )
    base = nn.Linear(D_IN, 12)
    layer = make_layer(base, num_experts=4, top_k=2, r=4, dropout=0.1).eval()
    x = torch.randn(3, 5, D_IN)
    if precision != "fp32":
        layer.to(torch.bfloat16)
        layer.experts.comoe_A.data, layer.experts.comoe_B.data = (
            layer.experts.comoe_A.float(),
            layer.experts.comoe_B.float(),
        )
        layer.router.comoe_router.data = layer.router.comoe_router.float()
        x = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
        graph_path = layer(x)  # autograd on: the training path's ops, in eval mode
        with torch.no_grad():
            fused_path = layer(x)
    assert len(calls) == (0 if precision == "bf16 base, no autocast" else 1)
    assert fused_path.dtype == graph_path.dtype == x.dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(fused_path, graph_path.detach(), **tol)


class _Fp32OutputLinear(nn.Linear):
    """A base whose output comes back in fp32 under autocast (as bitsandbytes' 4/8-bit layers return their
    input's dtype)."""

    def forward(self, x):
        return super().forward(x).float()


@pytest.mark.parametrize("case", ["fp32 base output under autocast", "fp64 adapters under autocast"])
def test_inference_keeps_the_graph_path_where_addmm_would_change_the_output_dtype(case):
    """The fused addmm computes in autocast's dtype: a base output in another dtype (fp32 from a quantized
    layer, or fp64 adapters on an fp32 base) takes the ordinary path, with its dtype and values."""
    base = _Fp32OutputLinear(D_IN, 12) if case.startswith("fp32") else nn.Linear(D_IN, 12)
    layer = make_layer(base, num_experts=4, top_k=2, r=4).eval()
    if case.startswith("fp64"):
        layer.to(torch.float64)
        base.to(torch.float32)
    x = torch.randn(3, 5, D_IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        graph_path = layer(x)
        with torch.no_grad():
            inference = layer(x)
    assert inference.dtype == graph_path.dtype
    torch.testing.assert_close(inference, graph_path.detach(), rtol=0, atol=0)


def test_grouped_path_with_an_expert_no_token_chooses():
    """Empty groups (an expert without tokens) give that expert exactly zero gradient."""
    base = nn.Linear(D_IN, 12)
    layer = make_layer(base, num_experts=4, top_k=1, r=4, path="grouped")
    with torch.no_grad():
        layer.router.comoe_router.zero_()
        layer.router.comoe_router[2] += 5.0 * torch.ones(D_IN) / D_IN**0.5  # x·w > 0 for these inputs
    x = torch.rand(6, D_IN) + 0.5  # positive, so expert 2 wins everywhere
    check_against_reference(layer, base, x)
    grad_a = layer.experts.comoe_A.grad.view(4, 4, D_IN)
    assert grad_a[2].abs().sum() > 0
    assert grad_a[[0, 1, 3]].abs().sum() == 0


@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_dense_and_grouped_paths_agree_on_the_same_weights(path):
    base = nn.Linear(D_IN, 12)
    dense = make_layer(base, num_experts=6, top_k=2, r=4, path="dense")
    other = make_layer(base, num_experts=6, top_k=2, r=4, path=path)
    other.load_state_dict(dense.state_dict())
    x = torch.randn(4, 7, D_IN)
    torch.testing.assert_close(other(x), dense(x), **TOL)


def test_auto_path_is_dense_and_grouped_is_taken_when_asked():
    """`auto` is dense: the grouped path was slower in every measured setting (BENCHMARKS.md)."""
    cfg = dict(num_experts=64, top_k=2, r=64, lora_dropout=0.0, contrastive_weight=0.0)
    auto = CoMoELayer(nn.Linear(16, 8), CoMoEConfig(**cfg, expert_path="auto"), ForwardContext())
    grouped = CoMoELayer(nn.Linear(16, 8), CoMoEConfig(**cfg, expert_path="grouped"), ForwardContext())
    assert auto.expert_path == "dense"  # E·r = 4096 codes for d_in = 16: the most grouped could ever save
    assert grouped.expert_path == "grouped"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert auto.to(torch.bfloat16).expert_path == "dense"


@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_dropout_one_mask_shared_by_all_experts(path):
    """In training, the adapter input is dropped out with ONE mask for every expert (base and router see x)."""
    base = nn.Linear(D_IN, 12)
    layer = make_layer(base, num_experts=4, top_k=2, r=4, path=path, dropout=0.5)
    layer.train()
    x = torch.randn(10, D_IN)
    torch.manual_seed(1234)
    y = layer(x)
    torch.manual_seed(1234)
    mask = nn.functional.dropout(torch.ones_like(x), p=0.5, training=True)  # same draw as the layer's
    assert 0 < (mask == 0).sum() < mask.numel()
    y_ref = reference_forward(
        x,
        base,
        layer.experts.comoe_A,
        layer.experts.comoe_B,
        layer.router.comoe_router,
        num_experts=4,
        r=4,
        top_k=2,
        scaling=layer.scaling,
        x_drop=x * mask,
    )
    torch.testing.assert_close(y, y_ref, **TOL)
    # and in eval mode there is no dropout at all
    layer.eval()
    y_eval = reference_forward(
        x,
        base,
        layer.experts.comoe_A,
        layer.experts.comoe_B,
        layer.router.comoe_router,
        num_experts=4,
        r=4,
        top_k=2,
        scaling=layer.scaling,
    )
    torch.testing.assert_close(layer(x), y_eval, **TOL)
    assert not torch.allclose(y_eval, y_ref, atol=1e-3)


@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_float64_layer_is_exact(path):
    """The whole layer in float64 (router included) matches the reference to 1e-12."""
    base = nn.Linear(D_IN, 12).double()
    layer = make_layer(base, num_experts=4, top_k=2, r=4, path=path).double()
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    x_ref = leaf(x)
    y = layer(x)
    assert y.dtype == torch.float64
    y_ref = reference_forward(
        x_ref.view(-1, D_IN),
        base,
        layer.experts.comoe_A,
        layer.experts.comoe_B,
        layer.router.comoe_router,
        num_experts=4,
        r=4,
        top_k=2,
        scaling=layer.scaling,
    )
    torch.testing.assert_close(y.view(-1, 12), y_ref, rtol=1e-12, atol=1e-12)


def test_bf16_base_keeps_fp32_adapter_and_base_dtype():
    base = nn.Linear(D_IN, 16).to(torch.bfloat16)
    layer = make_layer(base, num_experts=4, top_k=2, r=4, path="dense")
    assert (
        layer.experts.comoe_A.dtype
        == layer.experts.comoe_B.dtype
        == layer.router.comoe_router.dtype
        == torch.float32
    )
    x = torch.randn(6, D_IN).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y_ref = reference_forward(
        x.float(),
        copy.deepcopy(base).float(),
        layer.experts.comoe_A,
        layer.experts.comoe_B,
        layer.router.comoe_router,
        num_experts=4,
        r=4,
        top_k=2,
        scaling=layer.scaling,
    )
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=5e-2)


def test_fresh_layer_is_the_base_layer_and_disabled_is_exact():
    base = nn.Linear(D_IN, 12)
    layer = CoMoELayer(base, CoMoEConfig(lora_dropout=0.0), ForwardContext())
    x = torch.randn(5, D_IN)
    assert torch.equal(layer.experts.comoe_B, torch.zeros_like(layer.experts.comoe_B))
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    nn.init.normal_(layer.experts.comoe_B)
    assert not torch.allclose(layer(x), base(x))
    layer.disabled = True
    assert torch.equal(layer(x), base(x))


def test_unsupported_base_layer_is_rejected():
    with pytest.raises(TypeError, match="only nn.Linear and transformers Conv1D"):
        CoMoELayer(nn.Conv2d(3, 3, 1), CoMoEConfig(), ForwardContext())
