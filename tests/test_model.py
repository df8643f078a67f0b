"""CoMoEModel on tiny random models of four families: injection, losses, switches, records, training."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from comoe import CoMoEConfig, CoMoELayer, CoMoEModel, RoutingRecorder, get_comoe_model
from comoe.auxiliary import losses_from_traces
from comoe.losses import active_mask
from comoe.trace import ForwardContext
from tests.references import reference_contrastive
from tests.tiny_models import CAUSAL, batch, build, randomize_adapters, tiny_comoe_config

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = ["llama", "qwen2", "gpt2", "bert"]


def make_config(family: str, **overrides) -> CoMoEConfig:
    return tiny_comoe_config(family, **overrides)


def labels_for(family: str, inputs: dict) -> torch.Tensor:
    if family == "bert":  # sequence classification, 3 classes
        return torch.arange(inputs["input_ids"].shape[0]) % 3
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


def task_loss(family: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain cross-entropy the base model computes (next-token for causal LMs)."""
    if family == "bert":
        return F.cross_entropy(logits.float(), labels)
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def wrapped(family: str, seed: int = 0, num_layers: int = 2, **overrides):
    model = get_comoe_model(build(family, seed=seed, num_layers=num_layers), make_config(family, **overrides))
    randomize_adapters(model)
    return model


# --- the family matrix -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_generate(family):
    model = wrapped(family)
    n_layers = 2
    per_layer = {"llama": 4, "qwen2": 4, "gpt2": 3, "bert": 6}[family]
    extra = 1 if family == "bert" else 0  # BERT's pooler.dense also matches "dense"
    assert len(model.adapted_modules) == n_layers * per_layer + extra
    if family == "gpt2":
        assert all(isinstance(m.base_layer, Conv1D) for m in model.adapted_modules.values())
    model.train()
    inputs = batch(family)
    labels = labels_for(family, inputs)
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)
    assert out.contrastive_loss is not None and torch.isfinite(out.contrastive_loss)
    out.loss.backward()
    n_adapter = 0
    for name, param in model.named_parameters():
        if "comoe_" in name:
            n_adapter += 1
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert param.grad is None, f"frozen base parameter {name} got a gradient"
    assert n_adapter == 3 * len(model.adapted_modules)

    if family in CAUSAL:
        model.eval()
        prompt = batch(family, seed=3, pad=0)
        with torch.no_grad():
            generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
            first_next = model(**prompt).logits[:, -1].argmax(-1)
        assert generated.shape == (2, prompt["input_ids"].shape[1] + 4)
        assert torch.equal(generated[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])
        assert torch.equal(generated[:, prompt["input_ids"].shape[1]], first_next)


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_adapters_gives_exactly_the_base_model(family):
    base = build(family)
    reference = copy.deepcopy(base).eval()
    model = get_comoe_model(base, make_config(family))
    randomize_adapters(model)
    model.eval()
    inputs = batch(family)
    with torch.no_grad():
        expected = reference(**inputs).logits
        adapted = model(**inputs).logits
        with model.disable_adapters():
            disabled = model(**inputs).logits
        after = model(**inputs).logits
    assert torch.equal(disabled, expected)
    assert not torch.allclose(adapted, expected, atol=1e-4)  # the adapter does something
    assert torch.equal(after, adapted)  # and comes back after the block


def test_fresh_adapter_leaves_the_base_output_unchanged():
    base = build("llama")
    reference = copy.deepcopy(base).eval()
    model = get_comoe_model(base, make_config("llama")).eval()
    inputs = batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_aux_loss_is_out_loss_minus_task_loss(family):
    model = wrapped(family, contrastive_weight=0.5, balance_weight=0.2)
    model.train()
    inputs = batch(family)
    labels = labels_for(family, inputs)
    out = model(**inputs, labels=labels)
    aux = model.get_aux_loss()
    ce = task_loss(family, out.logits, labels)
    torch.testing.assert_close(aux, out.loss - ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(aux, 0.5 * out.contrastive_loss + 0.2 * out.balance_loss, rtol=1e-6, atol=1e-6)
    assert out.contrastive_loss > 0 and out.balance_loss > 0
    assert aux.requires_grad  # usable in a custom training loop


def test_contrastive_gradient_reaches_every_expert_but_not_the_router():
    """Paper: the loss uses raw expert outputs (no gates), and nothing is detached, inactive experts included."""
    cfg = CoMoEConfig(r=4, num_experts=6, top_k=2, lora_dropout=0.0, contrastive_weight=1.0, num_negatives=2)
    for path in ("dense", "grouped"):
        ctx = ForwardContext(compute_contrastive=True, active=True)
        layer = CoMoELayer(torch.nn.Linear(16, 8), dataclasses.replace(cfg, expert_path=path), ctx)
        torch.nn.init.normal_(layer.experts.comoe_B)
        layer.train()
        layer(torch.randn(3, 16))
        (aux,) = losses_from_traces(ctx, training=True)
        tensors = (layer.experts.comoe_A, layer.experts.comoe_B, layer.router.comoe_router)
        g_a, g_b, g_router = torch.autograd.grad(aux.contrastive.loss, tensors, allow_unused=True)
        assert g_router is None or g_router.abs().max() == 0
        assert (g_a.view(6, 4, 16).abs().sum((1, 2)) > 0).sum() >= 4  # 3 tokens x (2 active + 2 negatives)
        assert (g_b.view(8, 6, 4).abs().sum((0, 2)) > 0).sum() >= 4


def test_contrastive_is_the_mean_over_modules_of_algorithm_1_on_real_tokens():
    """End to end: hooks capture each adapted module's input; the reference recomputes routing, expert
    outputs and Algorithm 1 (Eq. 12, all anchors) per token, skipping padding; then the mean over modules."""
    model = wrapped("llama", anchor="all", contrastive_weight=1.0)
    model.train()
    inputs = batch("llama", pad=3)
    captured = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, _out, name=name: captured.__setitem__(name, args[0].detach())
        )
        for name, m in model.adapted_modules.items()
    ]
    out = model(**inputs, labels=labels_for("llama", inputs))
    for h in hooks:
        h.remove()
    mask = inputs["attention_mask"].reshape(-1).bool()
    per_module = []
    with torch.no_grad():
        for name, layer in model.adapted_modules.items():
            x = captured[name].reshape(-1, layer.in_features)
            probs = (x @ layer.router.comoe_router.t()).softmax(-1)
            topk_idx = probs.topk(2, dim=-1).indices
            outputs = torch.stack(
                [
                    x
                    @ layer.experts.comoe_A[i * 4 : (i + 1) * 4].t()
                    @ layer.experts.comoe_B[:, i * 4 : (i + 1) * 4].t()
                    for i in range(4)
                ],
                dim=1,
            )
            per_module.append(
                reference_contrastive(
                    outputs,
                    topk_idx,
                    topk_idx,
                    ~active_mask(topk_idx, 4),
                    temperature=0.1,
                    epsilon=1e-3,
                    token_mask=mask,
                )
            )
    torch.testing.assert_close(out.contrastive_loss, torch.stack(per_module).mean(), rtol=1e-5, atol=1e-5)


def test_zero_weight_is_exactly_plain_moe_lora():
    """λ = 0: no contrastive work, out.loss is the task loss, and gradients are those of the task loss alone."""
    plain = wrapped("llama", contrastive_weight=0.0, anchor="all")
    comoe = get_comoe_model(build("llama"), make_config("llama", contrastive_weight=0.5, anchor="all"))
    comoe.load_state_dict(plain.state_dict())
    plain.train()
    comoe.train()
    inputs = batch("llama")
    labels = labels_for("llama", inputs)

    out0 = plain(**inputs, labels=labels)
    assert plain.last_aux is None and float(plain.get_aux_loss()) == 0.0
    torch.testing.assert_close(out0.loss, task_loss("llama", out0.logits, labels), rtol=1e-6, atol=1e-6)
    out0.loss.backward()

    out1 = comoe(**inputs, labels=labels)
    torch.testing.assert_close(out1.logits, out0.logits, rtol=1e-6, atol=1e-6)  # the forward is unchanged
    assert out1.contrastive_loss > 0
    torch.testing.assert_close(
        out1.loss - task_loss("llama", out1.logits, labels), 0.5 * out1.contrastive_loss
    )
    task_loss("llama", out1.logits, labels).backward()
    grads0 = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    grads1 = {n: p.grad for n, p in comoe.named_parameters() if p.requires_grad}
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads0[name], grads1[name], rtol=1e-5, atol=1e-6)


def test_eval_mode_computes_no_aux_and_recording_does_not_change_the_loss():
    model = wrapped("llama", contrastive_weight=0.5).eval()
    inputs = batch("llama")
    labels = labels_for("llama", inputs)
    with torch.no_grad():
        plain = model(**inputs, labels=labels)
        assert model.last_aux is None
        with model.recording() as rec:
            recorded = model(**inputs, labels=labels)
    # (recording computes every code densely for the loss; the grouped path sums in another order: 1e-7)
    torch.testing.assert_close(recorded.loss, plain.loss, rtol=1e-6, atol=1e-6)
    assert recorded.contrastive_loss is not None  # computed for the records only
    assert all(s["contrastive_loss"] is not None for s in rec.summary().values())


# --- activation checkpointing ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(path):
    """transformers' (non-reentrant) activation checkpointing re-runs each decoder layer's forward inside
    backward: the adapter must run the same ops there, and the aux losses keep their gradient."""
    overrides = dict(contrastive_weight=0.5, balance_weight=0.1, lora_dropout=0.1, expert_path=path)
    plain, checkpointed = wrapped("llama", **overrides), wrapped("llama", **overrides)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    inputs = batch("llama")
    labels = labels_for("llama", inputs)
    results = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(11)  # the same dropout masks and random anchors in both
        with model.recording() as rec:  # the recompute inside backward must not count tokens again
            out = model(**inputs, labels=labels)
            out.loss.backward()
        assert all(sum(map(sum, s["counts"])) == 2 * 12 for s in rec.summary().values())
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss.detach(), out.contrastive_loss.detach(), grads))
    (loss0, con0, grads0), (loss1, con1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(con1, con0, rtol=1e-6, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["linear", "ffn"])
def test_reentrant_checkpointing_is_refused_instead_of_dropping_the_aux_gradient(placement):
    model = wrapped("llama", contrastive_weight=0.5, placement=placement)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    inputs = batch("llama")
    with pytest.raises(RuntimeError, match="use_reentrant': False"):
        model(**inputs, labels=labels_for("llama", inputs))
    # under no_grad (evaluation in train mode) nothing is lost, so nothing is refused
    with torch.no_grad():
        model(**inputs, labels=labels_for("llama", inputs))


# --- parameters -----------------------------------------------------------------------------------
def test_only_adapter_parameters_are_trainable_and_the_count_matches_the_formula():
    base = build("llama")
    n_base = sum(p.numel() for p in base.parameters())
    dims = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32)}  # (d_in, d_out)
    model = get_comoe_model(base, make_config("llama", num_experts=5, r=3))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("comoe_") for n in trainable)
    assert all(n in trainable for n, _ in model.named_parameters() if "comoe_" in n)
    # E·r·(d_in + d_out) + E·d_in per adapted module, 2 layers
    expected = 2 * sum(5 * 3 * (d_in + d_out) + 5 * d_in for d_in, d_out in dims.values())
    assert expected == 2 * (15 * 64 + 160 + 15 * 48 + 160 + 15 * 48 + 160 + 15 * 64 + 160)
    assert model.trainable_parameters() == (expected, n_base + expected)
    assert sum(t.numel() for t in model.adapter_state_dict().values()) == expected
    model.set_trainable(False)
    assert model.trainable_parameters()[0] == 0


def test_gpt2_conv1d_count_uses_the_in_out_layout():
    model = get_comoe_model(build("gpt2"), make_config("gpt2", num_experts=3, r=2, target_modules=["c_attn"]))
    # c_attn: Conv1D(in=32, out=96), 2 layers
    assert model.trainable_parameters()[0] == 2 * (3 * 2 * (32 + 96) + 3 * 32)
    layer = model.adapted_modules["transformer.h.0.attn.c_attn"]
    assert tuple(layer.experts.comoe_A.shape) == (6, 32) and tuple(layer.experts.comoe_B.shape) == (96, 6)


# --- layer selection --------------------------------------------------------------------------------
def adapted_layer_indices(model) -> set[int]:
    return {int(name.split(".")[2]) for name in model.adapted_modules}


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ("low", {0, 1}),
        ("middle", {2, 3}),
        ("high", {4, 5}),
        ("low+high", {0, 1, 4, 5}),
        ([0, 5], {0, 5}),
        (None, {0, 1, 2, 3, 4, 5}),
    ],
)
def test_layer_selection(layers, expected):
    model = get_comoe_model(build("llama", num_layers=6), make_config("llama", layers=layers))
    assert adapted_layer_indices(model) == expected
    assert len(model.adapted_modules) == 4 * len(expected)


def test_layer_thirds_of_nine_layers_and_bert_names():
    model = get_comoe_model(build("llama", num_layers=9), make_config("llama", layers="middle"))
    assert adapted_layer_indices(model) == {3, 4, 5}
    bert = get_comoe_model(build("bert", num_layers=3), make_config("bert", layers="high"))
    assert {n.split(".")[3] for n in bert.adapted_modules} == {"2"}  # the pooler (no layer index) is left out


# --- bad input ---------------------------------------------------------------------------------------
def test_targets_that_match_nothing_list_the_adaptable_names():
    with pytest.raises(ValueError) as info:
        get_comoe_model(build("llama"), make_config("llama", target_modules=["query", "c_attn"]))
    message = str(info.value)
    assert "matched no" in message and "LlamaForCausalLM" in message
    for name in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]:
        assert name in message
    with pytest.raises(ValueError, match="c_attn, c_fc, c_proj"):
        get_comoe_model(build("gpt2"), make_config("gpt2", target_modules=["q_proj"]))


def test_layers_out_of_range():
    with pytest.raises(ValueError, match=r"layers \[2, 7\] do not exist: the model has 2 layers \(0..1\)"):
        get_comoe_model(build("llama"), make_config("llama", layers=[0, 2, 7]))


def test_wrapping_twice_is_refused_and_regex_targets_work():
    model = get_comoe_model(build("llama"), make_config("llama"))
    with pytest.raises(ValueError, match="already holds CoMoE layers"):
        get_comoe_model(model.get_base_model(), make_config("llama"))
    regex = get_comoe_model(build("llama"), make_config("llama", target_modules=r"model\.layers\.1\.mlp\..*"))
    assert sorted(regex.adapted_modules) == [
        f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")
    ]
    everything = get_comoe_model(build("llama"), make_config("llama", target_modules="all-linear"))
    assert len(everything.adapted_modules) == 2 * 7  # every linear inside the repeated layers, not lm_head


# --- routing records ------------------------------------------------------------------------------------
def test_recorder_counts_sum_to_k_times_real_tokens_per_task():
    model = wrapped("llama", top_k=2).eval()
    inputs = batch("llama", batch_size=3, seq_len=6, pad=2)  # row 0 has 4 real tokens, rows 1-2 have 6
    captured = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, _out, name=name: captured.__setitem__(name, args[0].detach())
        )
        for name, m in model.adapted_modules.items()
    ]
    with torch.no_grad(), model.recording(RoutingRecorder(num_tasks=3)) as rec:
        model(**inputs, task_ids=torch.tensor([2, 0, 2]))
    for h in hooks:
        h.remove()
    summary = rec.summary()
    assert set(summary) == set(model.adapted_modules)
    mask = inputs["attention_mask"].reshape(-1).bool()
    tasks = torch.tensor([2, 0, 2]).repeat_interleave(6)
    for name, stats in summary.items():
        counts = torch.tensor(stats["counts"])
        assert stats["tokens_per_task"] == [6.0, 0.0, 10.0]
        assert counts.sum().item() == 2 * 16  # k × real tokens, padding excluded
        assert counts.sum(1).tolist() == [12.0, 0.0, 20.0]
        layer = model.adapted_modules[name]
        x = captured[name].reshape(-1, layer.in_features)
        chosen = (x @ layer.router.comoe_router.t()).softmax(-1).topk(2, dim=-1).indices
        expected = torch.zeros(3, 4, dtype=torch.float64)
        for t in range(x.shape[0]):
            if mask[t]:
                expected[tasks[t], chosen[t]] += 1
        assert torch.equal(counts.double(), expected)
        assert abs(sum(stats["load"]) - 1.0) < 1e-9


def test_recorder_task_ids_without_attention_mask_and_soft_routing():
    model = wrapped("gpt2", routing="soft", contrastive_weight=0.0).eval()
    ids = batch("gpt2", batch_size=2, seq_len=5, pad=0)["input_ids"]
    with torch.no_grad(), model.recording(RoutingRecorder(num_tasks=2)) as rec:
        model(input_ids=ids, task_ids=torch.tensor([1, 0]))
    for stats in rec.summary().values():
        assert stats["tokens_per_task"] == [5.0, 5.0]  # task ids reach the layers without a mask
        counts = torch.tensor(stats["counts"])
        torch.testing.assert_close(
            counts.sum(1), torch.tensor([5.0, 5.0], dtype=counts.dtype)
        )  # gate mass: 1/token
        assert stats["contrastive_loss"] is None  # soft routing has no negatives


def test_recorder_counts_generated_tokens():
    model = wrapped("llama").eval()
    prompt = batch("llama", pad=0)  # 2 x 7 tokens, then 3 new tokens one at a time (with the KV cache)
    with model.recording() as rec:
        model.generate(**prompt, max_new_tokens=4, do_sample=False)
    for stats in rec.summary().values():
        assert sum(map(sum, stats["counts"])) == 2 * (2 * 7 + 2 * 3)


def test_recorder_samples_expert_outputs():
    model = wrapped("llama").eval()
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad(), model.recording(RoutingRecorder(sample_outputs=5, sample_modules={name})) as rec:
        model(**batch("llama"))
        model(**batch("llama", seed=9))
    record = rec.records[name]
    assert record.sampled == 5 and record.sampled_outputs[0].shape[1:] == (4, 32)
    assert rec.records["model.layers.0.self_attn.k_proj"].sampled == 0


# --- training from a fresh init --------------------------------------------------------------------------
def test_fifty_adamw_steps_from_fresh_init_stay_finite_and_the_contrastive_loss_falls():
    torch.manual_seed(0)
    base = build("llama", seed=0, num_layers=1)
    config = make_config(
        "llama", contrastive_weight=1.0, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]
    )
    model = get_comoe_model(base, config)
    assert all(
        torch.equal(m.experts.comoe_B, torch.zeros_like(m.experts.comoe_B))
        for m in model.adapted_modules.values()
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    inputs = batch("llama", batch_size=4, seq_len=12, pad=3, seed=4)
    labels = labels_for("llama", inputs)
    contrastive = []
    for _ in range(50):
        out = model(**inputs, labels=labels)
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        for p in params:
            assert torch.isfinite(p.grad).all()
        optimizer.step()
        contrastive.append(out.contrastive_loss.item())
    first, last = sum(contrastive[:5]) / 5, sum(contrastive[-5:]) / 5
    assert last < 0.8 * first, (first, last)


# --- torch.compile -------------------------------------------------------------------------------------
def _compile_available(backend: str) -> bool:
    try:
        fn = torch.compile(lambda t: t * 2 + 1, backend=backend)
        return torch.equal(fn(torch.ones(3)), torch.full((3,), 3.0))
    except Exception:
        return False


def test_dense_layer_compiles_without_graph_breaks():
    """The dense-codes forward and the Gram loss have no data-dependent shapes or host syncs: fullgraph."""
    if not _compile_available("aot_eager"):
        pytest.skip("torch.compile is not usable here")
    ctx = ForwardContext(compute_contrastive=True)
    cfg = CoMoEConfig(
        r=4,
        num_experts=4,
        top_k=2,
        lora_dropout=0.0,
        contrastive_weight=0.5,
        anchor="all",
        expert_path="dense",
    )
    layer = CoMoELayer(torch.nn.Linear(16, 16), cfg, ctx, "probe")
    torch.nn.init.normal_(layer.experts.comoe_B)
    x = torch.randn(10, 16)

    def step(x):
        ctx.aux, ctx.traces, ctx.active = [], [], True
        y = layer(x)
        ctx.traces = (
            ctx.traces + layer.pending_traces
        )  # a compiled call keeps its trace (the tuner gathers it)
        layer.pending_traces = []
        ctx.aux = losses_from_traces(ctx, training=True)
        ctx.active = False
        return y.square().mean() + ctx.aux[0].contrastive.loss

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x), rtol=1e-5, atol=1e-5)


def test_comoe_layer_is_exported_and_used():
    model = wrapped("qwen2")
    assert all(isinstance(m, CoMoELayer) for m in model.adapted_modules.values())
    assert isinstance(model.get_base_model().get_submodule("model.layers.0.mlp.gate_proj"), CoMoELayer)
    assert not isinstance(model.get_base_model().get_submodule("model.layers.0.mlp.up_proj"), CoMoELayer)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_contrastive_losses_computed_together_equal_the_per_module_losses(family, monkeypatch):
    """The forward's contrastive term, its modules grouped by shape and computed in one call per group,
    equals each module computed on its own: the loss and every adapter gradient."""
    import comoe.auxiliary
    import comoe.gram_loss
    import comoe.losses

    calls = []

    def counted(fn):
        def call(*args, **kwargs):
            calls.append(1)
            return fn(*args, **kwargs)

        return call

    # a group's loss is one node (comoe.gram_loss); a call on its own computes its cosines itself
    monkeypatch.setattr(comoe.auxiliary, "stacked_cosines", counted(comoe.losses.stacked_cosines))
    monkeypatch.setattr(comoe.auxiliary, "gram_group_loss", counted(comoe.gram_loss.gram_group_loss))
    inputs = batch(family)
    results = []
    for stacked in (True, False):
        if not stacked:
            monkeypatch.setattr(comoe.auxiliary, "stacked_contrastive", lambda traces, ctx: {})
        model = wrapped(family, contrastive_weight=0.5, anchor="all", num_negatives=None).train()
        out = model(**inputs, labels=labels_for(family, inputs))
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.contrastive_loss.detach(), grads, len(calls)))
        calls.clear()
    (con_stacked, grads_stacked, stacked_calls), (con_single, grads_single, single_calls) = results
    assert 0 < stacked_calls < single_calls == len(model.routed_modules)  # modules did share calls
    torch.testing.assert_close(con_stacked, con_single, rtol=1e-6, atol=1e-6)
    for name, grad in grads_single.items():
        torch.testing.assert_close(grads_stacked[name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("contrastive_form", ["gram", "materialized"])
def test_the_auxiliary_losses_are_fp32_under_bf16_autocast(contrastive_form):
    """The losses are computed after the forward with autocast off: fp32 products, fp32 results."""
    model = wrapped("llama", contrastive_weight=0.5, balance_weight=0.1, contrastive_form=contrastive_form)
    inputs = batch("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(**inputs, labels=labels_for("llama", inputs))
    assert out.contrastive_loss.dtype == out.balance_loss.dtype == torch.float32
    assert torch.isfinite(out.contrastive_loss) and out.contrastive_loss > 0


def test_the_router_stays_fp32_under_bf16_autocast():
    model = wrapped("llama")
    layer = next(iter(model.routed_modules.values()))
    x = torch.randn(16, layer.in_features)
    _, probs, top_idx, _ = layer.route(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, probs_bf16, top_bf16, _ = layer.route(x)
    assert probs_bf16.dtype == torch.float32
    torch.testing.assert_close(probs_bf16, probs, rtol=0, atol=0)
    assert torch.equal(top_bf16, top_idx)


def test_single_expert_adapters_saved_with_a_router_still_load(tmp_path):
    """Before 0.2 a one-expert layer (plain LoRA) had a (1, d_in) router; it has none now, and such saved
    adapters load through both loaders."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    config = make_config("llama", num_experts=1, top_k=1, contrastive_weight=0.0)
    model = wrapped(
        "llama", **{k: getattr(config, k) for k in ("num_experts", "top_k", "contrastive_weight")}
    )
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    for name in [n for n in tensors if n.endswith("comoe_A")]:
        tensors[name.replace("experts.comoe_A", "comoe_router")] = torch.zeros(1, tensors[name].shape[1])
    save_file(tensors, weights)
    inputs = batch("llama")
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
    for loader in (CoMoEModel.from_pretrained, PeftModel.from_pretrained):
        with torch.no_grad():
            torch.testing.assert_close(loader(build("llama"), tmp_path)(**inputs).logits, expected)
