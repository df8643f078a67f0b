"""The memory-lean pieces of the training step: the dense expert path as one autograd node
(``comoe.dense``), the recomputed contrastive loss (``comoe.recompute``) and the stacked Gram matrices.
Each equals the plain ops it replaces (outputs and every gradient) and keeps less for backward."""

from __future__ import annotations

import pytest
import torch

from comoe.dense import dense_experts, dropout_keep
from comoe.losses import gram_matrices, stacked_contrastive_loss
from comoe.model import get_comoe_model
from comoe.recompute import recomputed, upcast_linear
from comoe.tools.bench.measure import SavedTensorMeter, parameter_storages
from tests.tiny_models import batch, build, randomize_adapters, tiny_comoe_config

N_TOKENS, D_IN, D_OUT, E, R = 24, 12, 10, 4, 3


def _dense_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(N_TOKENS, E, generator=gen).softmax(-1)
    top_w, top_idx = probs.topk(2, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, top_idx, top_w / top_w.sum(-1, keepdim=True))
    return {
        "x": torch.randn(N_TOKENS, D_IN, generator=gen),
        "lora_A": torch.randn(E * R, D_IN, generator=gen),
        "lora_B": torch.randn(D_OUT, E * R, generator=gen),
        "gates": gates,
    }


def _plain_dense(x, keep, keep_scale, lora_A, lora_B, gates, scaling):
    """The dense path as the plain ops it replaces (what autograd would differentiate step by step)."""
    x_drop = x if keep is None else x * keep * keep_scale
    codes = x_drop @ lora_A.t()
    gated = (codes.view(N_TOKENS, E, R) * gates[..., None].to(codes.dtype)).view(N_TOKENS, -1)
    return gated @ lora_B.t() * scaling, codes


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("codes_used", [True, False])
def test_dense_node_equals_the_plain_ops_in_output_and_every_gradient(dropout, codes_used):
    """Delta and codes, and the gradients of x, A, B and the gates, with the codes also feeding a
    downstream term (as the contrastive loss does) or not."""
    results = []
    for fused in (True, False):
        leaves = {k: v.clone().requires_grad_() for k, v in _dense_inputs().items()}
        torch.manual_seed(1)
        keep = dropout_keep(leaves["x"], dropout) if dropout else None
        scale = 1 / (1 - dropout)
        if fused:
            delta, codes = dense_experts(
                leaves["x"], keep, scale, leaves["lora_A"], leaves["lora_B"], leaves["gates"], R, 2.0
            )
        else:
            delta, codes = _plain_dense(
                leaves["x"], keep, scale, leaves["lora_A"], leaves["lora_B"], leaves["gates"], 2.0
            )
        target = (delta**2).sum() + ((codes**3).sum() if codes_used else 0)
        target.backward()
        results.append([delta, codes] + [leaves[k].grad for k in sorted(leaves)])
    for fused_value, plain_value in zip(*results, strict=True):
        torch.testing.assert_close(fused_value, plain_value, rtol=1e-5, atol=1e-5)


def test_dropout_keep_draws_the_mask_that_nn_dropout_draws():
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    expected = torch.nn.functional.dropout(torch.ones_like(x), p=0.25, training=True) != 0
    torch.manual_seed(3)
    assert torch.equal(dropout_keep(x, 0.25), expected)


def test_dense_node_under_bf16_autocast_equals_the_plain_ops_under_autocast():
    """The products in bf16 as autocast would run them (the dropped input formed in fp32, then cast, as
    the plain ops do), bit for bit, outputs and gradients; the gradients come back in fp32."""
    results = []
    for fused in (True, False):
        leaves = {k: v.clone().requires_grad_() for k, v in _dense_inputs().items()}
        keep = dropout_keep(leaves["x"], 0.2) if fused else results[0][-1]
        args = (leaves["x"], keep, 1.25, leaves["lora_A"], leaves["lora_B"], leaves["gates"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            delta, codes = dense_experts(*args, R, 2.0) if fused else _plain_dense(*args, 2.0)
        assert delta.dtype == codes.dtype == torch.bfloat16
        ((delta.float() ** 2).sum() + (codes.float() ** 3).sum()).backward()
        results.append([delta, codes] + [leaves[k].grad for k in sorted(leaves)] + [keep])
    assert all(g.dtype == torch.float32 for g in results[0][2:6])
    for fused_value, plain_value in zip(*results, strict=True):
        torch.testing.assert_close(fused_value, plain_value, rtol=0, atol=0)


def test_dense_node_keeps_float64_under_autocast_as_autocast_does():
    leaves = {k: v.double().requires_grad_() for k, v in _dense_inputs().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta, codes = dense_experts(
            leaves["x"], None, 1.0, leaves["lora_A"], leaves["lora_B"], leaves["gates"], R, 1.0
        )
    assert delta.dtype == codes.dtype == torch.float64


def test_dense_node_keeps_neither_the_dropped_input_nor_the_gated_codes():
    """Saved for backward: x, the bool mask, A, B, the gates and the codes it returns: nothing else."""
    leaves = {k: v.clone().requires_grad_() for k, v in _dense_inputs().items()}
    keep = dropout_keep(leaves["x"], 0.5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _, codes = dense_experts(
            leaves["x"], keep, 2.0, leaves["lora_A"], leaves["lora_B"], leaves["gates"], R, 1.0
        )
    expected = [leaves["x"], keep, leaves["lora_A"], leaves["lora_B"], leaves["gates"], codes]
    assert {t.data_ptr() for t in saved} == {t.data_ptr() for t in expected}
    assert keep.dtype == torch.bool


def test_recomputed_equals_the_direct_call_and_keeps_only_its_inputs():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 8, generator=gen, requires_grad=True)
    b = torch.randn(8, 8, generator=gen, requires_grad=True)
    idx = torch.randint(0, 8, (30,), generator=gen)

    def fn(a, b, idx):
        h = (a @ b).tanh() @ b.t()
        loss = h.gather(1, idx[:, None]).sum() + h.pow(2).mean()
        return loss, h.detach().mean()

    direct = fn(a, b, idx)
    grads = torch.autograd.grad(direct[0], (a, b))
    meter = SavedTensorMeter(set())
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        again = recomputed(fn, a, b, idx)
    assert meter.count == 3  # a, b, idx: nothing of fn's intermediates
    assert not again[1].requires_grad
    torch.testing.assert_close(again[0], direct[0])
    torch.testing.assert_close(torch.autograd.grad(again[0], (a, b)), grads)


def test_upcast_linear_equals_the_linear_of_the_upcast_and_keeps_the_bf16_input():
    """The router's fp32 logits from bf16 hidden states: bit-identical output and gradients to
    F.linear(x.float(), W), with x kept in bf16 (not its fp32 copy) for backward."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 32, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(6, 32, generator=gen, requires_grad=True)
    grad_out = torch.randn(2, 24, 6, generator=gen)
    reference = torch.nn.functional.linear(x.float(), weight)
    ref_grads = torch.autograd.grad(reference, (x, weight), grad_out)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = upcast_linear(x, weight)
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), weight.data_ptr()}
    assert out.dtype == torch.float32 and torch.equal(out, reference)
    for got, want in zip(torch.autograd.grad(out, (x, weight), grad_out), ref_grads, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize(
    "contrastive, experts",
    [(False, "dense"), (True, "dense"), (False, "dora"), (True, "grouped"), (False, "grouped")],
)
def test_a_layer_under_bf16_autocast_works_on_its_bf16_input_without_an_fp32_copy(
    monkeypatch, contrastive, experts
):
    """`--bf16`: the layer takes a bf16 input as it is (no fp32 copy made or kept): the same forward as
    forming the fp32 copy first, bit for bit (dropout masks included, on every expert path and DoRA experts),
    keeping less; its gradients differ
    by bf16 rounding in backward and are as close to the float32 model's as the copy-first gradients are."""
    import comoe.layer

    config = tiny_comoe_config(
        "llama",
        lora_dropout=0.1,
        contrastive_weight=0.5 if contrastive else 0.0,
        use_dora=experts == "dora",
        expert_path="grouped" if experts == "grouped" else "dense",
    )
    inputs = batch("llama")
    runs = {}
    for mode in ("as-is", "fp32 copy first", "float32 model"):
        if (
            mode == "fp32 copy first"
        ):  # what the layer did before: x.to(fp32), every product cast back to bf16
            monkeypatch.setattr(comoe.layer, "adapter_input", lambda x, dtype: x.to(dtype))
        base = build("llama").to(torch.bfloat16)
        model = get_comoe_model(base.float() if mode == "float32 model" else base, config)
        randomize_adapters(model)
        model.train()
        embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
        meter = SavedTensorMeter(parameter_storages(model))
        torch.manual_seed(0)
        with (
            torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "float32 model"),
        ):
            out = model(
                inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["input_ids"]
            )
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        runs[mode] = (out.loss.detach(), grads, meter.bytes)
    (loss, grads, kept), (loss_copy, grads_copy, kept_copy), (_, grads_fp32, _) = runs.values()
    assert torch.equal(loss, loss_copy)
    assert kept < kept_copy  # no fp32 copy of any adapted input kept
    for name, exact in grads_fp32.items():  # bf16 rounding moves single small gradients (routers) a lot
        err, err_copy = ((g - exact).norm() / exact.norm() for g in (grads[name], grads_copy[name]))
        assert err <= 2 * err_copy + 0.02, name

    def error(got: dict) -> float:  # all adapter gradients together, relative to the float32 model's
        flat = torch.cat([(got[n] - g).flatten() for n, g in grads_fp32.items()])
        return (flat.norm() / torch.cat([g.flatten() for g in grads_fp32.values()]).norm()).item()

    assert error(grads) <= 1.25 * error(grads_copy) + 1e-3  # no less accurate than the fp32 copy was


def test_stacked_gram_matrices_equal_each_modules_and_their_gradients():
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(9, 6, generator=gen, requires_grad=True) for _ in range(3)]
    weights = torch.randn(3, 6, 6, generator=gen)
    stacked = gram_matrices(mats)
    (stacked * weights).sum().backward()
    got = [m.grad.clone() for m in mats]
    for m in mats:
        m.grad = None
    plain = torch.stack([m.t() @ m for m in mats])
    torch.testing.assert_close(stacked.detach(), plain.detach())
    (plain * weights).sum().backward()
    for m, grad in zip(mats, got, strict=True):
        torch.testing.assert_close(grad, m.grad)


# hidden 32, E = 4: r = 1 is below E*r = d_in/4 (intermediates kept); r = 2 (E*r below the token count)
# and r = 16 (E*r above it) recompute them
@pytest.mark.parametrize("rank", [1, 2, 16])
def test_the_models_contrastive_term_keeps_little_beyond_what_the_layers_keep(rank):
    """Where E*r >= d_in/4, a training forward with the contrastive term on keeps for backward a small
    fraction of what the loss computed by plain autograd keeps (the loss is one node, ``comoe.gram_loss``,
    that keeps the codes and Gram matrices the layers keep anyway and a few (N, A, E) tensors); below, no
    more than plain autograd keeps. The loss and gradients are the same either way."""
    import comoe.auxiliary
    from comoe.auxiliary import group_node_applies

    inputs = batch("llama", batch_size=4, seq_len=16)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    saved, results = {}, {}
    for name, weight in [("off", 0.0), ("on", 0.5), ("plain", 0.5)]:
        model = get_comoe_model(build("llama"), tiny_comoe_config("llama", r=rank, contrastive_weight=weight))
        randomize_adapters(model)
        model.train()
        if name == "plain":  # the plain ops, their intermediates kept
            comoe.auxiliary.recomputed = lambda fn, *xs, differentiable=1: tuple(fn(*xs))
            comoe.auxiliary.group_node_applies = lambda valid: False
        try:
            meter = SavedTensorMeter(parameter_storages(model))
            torch.manual_seed(0)
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                out = model(**inputs, labels=labels)
            out.loss.backward()
        finally:
            comoe.auxiliary.recomputed = recomputed
            comoe.auxiliary.group_node_applies = group_node_applies
        saved[name] = meter.bytes
        results[name] = [out.loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]
    if rank == 1:  # small intermediates
        assert saved["off"] < saved["on"] <= saved["plain"]
    else:
        assert saved["on"] - saved["off"] < 0.25 * (saved["plain"] - saved["off"])
    for on, plain in zip(results["on"], results["plain"], strict=True):
        torch.testing.assert_close(on, plain, rtol=1e-5, atol=1e-6)


def test_stacked_loss_from_given_gram_matrices_equals_the_loss_from_B():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randn(3, 20, E, R, generator=gen)
    lora_B = torch.randn(3, D_OUT, E * R, generator=gen)
    top_idx = torch.rand(3, 20, E, generator=gen).topk(2, dim=-1).indices
    kwargs = dict(
        temperature=0.1, anchors=top_idx[..., :1], negatives=torch.rand(3, 20, E, generator=gen) > 0.5
    )
    from_b = stacked_contrastive_loss(codes, lora_B, top_idx, form="gram", **kwargs)
    from_gram = stacked_contrastive_loss(codes, None, top_idx, gram=gram_matrices(lora_B), **kwargs)
    for x, y in zip(from_b, from_gram, strict=True):
        torch.testing.assert_close(x, y)


def test_dense_path_without_autograd_runs_the_plain_ops_with_the_same_mask():
    """Generation and evaluation skip the node (its overhead buys nothing there); a reentrant-checkpointing
    forward (no grad) and its recompute (grad) draw the same dropout mask, so they agree."""
    inputs = {k: v.clone().requires_grad_() for k, v in _dense_inputs().items()}
    outputs = []
    for grad in (True, False):
        torch.manual_seed(5)
        with torch.set_grad_enabled(grad):
            keep = dropout_keep(inputs["x"], 0.2)
            delta, codes = dense_experts(
                inputs["x"], keep, 1.25, inputs["lora_A"], inputs["lora_B"], inputs["gates"], R, 2.0
            )
        assert (delta.grad_fn is not None) == grad
        outputs.append((delta.detach(), codes.detach()))
    torch.testing.assert_close(outputs[0], outputs[1])


@pytest.mark.parametrize("rank", [1, 16])
def test_the_compiler_path_computes_the_same_loss_and_gradients(rank, monkeypatch):
    """Under torch.compile the layers run the plain ops and the cosines are not recomputed (the compiler
    plans memory itself); that path, taken here by answering `is_compiling` with True, gives the same
    loss and gradients as eager."""
    inputs = batch("llama", batch_size=4, seq_len=16)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    results = []
    for compiling in (False, True):
        model = get_comoe_model(
            build("llama"), tiny_comoe_config("llama", r=rank, contrastive_weight=0.5, lora_dropout=0.1)
        )
        randomize_adapters(model)
        model.train()
        if compiling:
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        torch.manual_seed(0)
        out = model(**inputs, labels=labels)
        out.loss.backward()
        monkeypatch.undo()
        results.append([out.loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
