"""The contract every adapter kind keeps: one table of kinds, each check a test over the whole table.

Each kind is a ``tiny_comoe_config("llama", **overrides)`` on the tiny 2-layer Llama, with the
contrastive term on wherever the kind allows it and a small balance term. A new expert kind or router is a
row here; a new promise is a test here, parametrized over ``KINDS``.

1. saved and reloaded through ``CoMoEModel.from_pretrained`` and ``peft.PeftModel.from_pretrained``, the
   adapter gives identical eval logits;
2. with the adapters disabled the model is exactly the base;
3. one training step (loss with the auxiliary terms) gives every adapter tensor a non-zero gradient;
4. activation checkpointing gives the same loss and gradients;
5. each decoder layer compiled with no graph break gives the same loss and gradients as eager;
6. bf16 autocast trains, with gradients within bf16 tolerance of fp32 and fp32 auxiliary losses;
7. FSDP2 (2 CPU processes) gives one process's gradients;
8. the trainable parameter count equals ``adapter_parameter_count`` (layers built on the meta device), the
   count parameter-matched LoRA uses;
9. a fresh adapter (B = 0) leaves the base's logits as they are, and its first steps give finite losses and
   gradients.
"""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch
import torch.multiprocessing as mp
from peft import PeftModel

from comoe import CoMoEModel, get_comoe_model
from comoe.compiling import compile_layers, decoder_layers
from comoe.placement import adapter_parameter_count
from tests import sharded_worker
from tests.tiny_models import batch, build, is_adapter, randomize_adapters, tiny_comoe_config

pytestmark = pytest.mark.usefixtures("single_thread")

FFN_TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]

# kind -> the overrides of tiny_comoe_config (4 experts, top-2, r=4, contrastive_weight=0.1, dropout 0)
KINDS = {
    "lora": dict(),
    "dora": dict(use_dora=True),
    "ffn": dict(placement="ffn", target_modules=FFN_TARGETS),
    "single": dict(num_experts=1, top_k=1, contrastive_weight=0.0),
    "soft": dict(routing="soft", top_k=4, contrastive_weight=0.0),
    "topp": dict(routing="topp", top_p=0.6, top_k=3, num_experts=4),
    "grouped": dict(expert_path="grouped"),
}
BALANCE = 0.01


def config_of(kind: str):
    return tiny_comoe_config("llama", **{"balance_weight": BALANCE, **KINDS[kind]})


@pytest.fixture(params=list(KINDS))
def kind(request) -> str:
    return request.param


@torch.no_grad()
def adapted(kind: str):
    """The kind's model on the tiny Llama, every adapter tensor moved away from its initial value (B and the
    router random, A and DoRA magnitudes perturbed), so that no tensor is zero or equal to a fresh init."""
    model = get_comoe_model(build("llama"), config_of(kind))
    randomize_adapters(model)
    gen = torch.Generator().manual_seed(5)
    for name, param in sorted(model.named_parameters()):
        if is_adapter(name):
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


def inputs_and_labels(seq_len: int = 7) -> dict:
    inputs = batch("llama", seq_len=seq_len)
    return {**inputs, "labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)}


def contrastive_on(kind: str) -> bool:
    return config_of(kind).contrastive_weight > 0


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def training_step(model, runner=None, seed: int = 11) -> tuple[dict, dict[str, torch.Tensor]]:
    """One training forward and backward of ``model`` (through ``runner``, a wrapper of it, if given): the
    output's losses (detached) and every trainable tensor's gradient. ``seed`` fixes the random anchors of
    the contrastive loss."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = (model if runner is None else runner)(**inputs_and_labels())
    out.loss.backward()
    losses = {
        key: out[key].detach()
        for key in ("loss", "aux_loss", "contrastive_loss", "balance_loss")
        if key in out
    }
    return losses, {name: p.grad for name, p in trainable(model).items()}


def assert_same_step(actual, expected, rtol: float, atol: float) -> None:
    (losses, grads), (ref_losses, ref_grads) = actual, expected
    assert losses.keys() == ref_losses.keys()
    for key, value in ref_losses.items():
        torch.testing.assert_close(losses[key], value, rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert grads[name] is not None, f"{name}: no gradient"
        torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch("llama")).logits


# --- 1. save and load --------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", ["CoMoEModel", "PeftModel"])
def test_saved_and_reloaded_adapters_give_identical_logits(kind, loader, tmp_path):
    model = adapted(kind)
    expected = eval_logits(model)
    assert not torch.allclose(expected, eval_logits(build("llama")), atol=1e-3)  # the adapter matters
    model.save_pretrained(tmp_path)
    load = CoMoEModel.from_pretrained if loader == "CoMoEModel" else PeftModel.from_pretrained
    reloaded = load(build("llama"), tmp_path)
    assert reloaded.peft_config["default"].method_dict() == model.comoe_config.method_dict()
    saved, loaded = model.base_model.adapter_state_dict(), reloaded.base_model.adapter_state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items())
    torch.testing.assert_close(eval_logits(reloaded), expected, rtol=0, atol=0)


# --- 2. disabled is the base -------------------------------------------------------------------------------
def test_disabled_adapters_give_exactly_the_base(kind):
    model, reference = adapted(kind), build("llama")
    expected, adapted_logits = eval_logits(reference), eval_logits(model)
    assert not torch.allclose(adapted_logits, expected, atol=1e-3)
    with model.disable_adapters():
        torch.testing.assert_close(eval_logits(model), expected, rtol=0, atol=0)
        model.train()  # a training forward: the base's loss, no auxiliary term
        reference.train()
        data = inputs_and_labels()
        out, base_out = model(**data), reference(**data)
        torch.testing.assert_close(out.loss, base_out.loss, rtol=0, atol=0)
        assert "aux_loss" not in out
    torch.testing.assert_close(eval_logits(model), adapted_logits, rtol=0, atol=0)  # enabled again after


# --- 3. a gradient reaches every adapter tensor ------------------------------------------------------------
def test_one_training_step_gives_every_adapter_tensor_a_gradient(kind):
    model = adapted(kind)
    losses, grads = training_step(model)
    assert grads and set(grads) == {name for name, _ in model.named_parameters() if is_adapter(name)}
    assert all(p.grad is None for name, p in model.named_parameters() if not p.requires_grad)
    assert torch.isfinite(losses["loss"])
    if contrastive_on(kind):
        assert losses["contrastive_loss"] > 0
    if model.routed_modules:
        assert losses["balance_loss"] > 0
    else:
        assert "aux_loss" not in losses  # a single expert has no router: nothing to balance or contrast
    for name, grad in grads.items():
        assert grad is not None, f"{name}: no gradient reached it"
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
        assert grad.abs().sum() > 0, f"{name}: a zero gradient"


# --- 4. activation checkpointing ---------------------------------------------------------------------------
def test_activation_checkpointing_gives_the_same_loss_and_gradients(kind):
    """transformers' non-reentrant checkpointing re-runs each decoder layer's forward inside backward: the
    adapter runs the same ops there, and the auxiliary terms keep their gradient."""
    model = adapted(kind)
    calls = []
    layer = next(iter(model.adapted_modules.values()))
    layer.register_forward_hook(lambda *_: calls.append(1))
    plain = training_step(model)
    base = model.get_base_model()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert base.is_activation_checkpointing
    n_plain = len(calls)
    checkpointed = training_step(model)
    assert len(calls) - n_plain == 2 * n_plain  # the layer's forward ran again inside backward
    assert_same_step(checkpointed, plain, rtol=1e-6, atol=1e-7)


# --- 5. torch.compile --------------------------------------------------------------------------------------
def _compile_available() -> bool:
    try:
        fn = torch.compile(lambda t: t * 2 + 1, backend="aot_eager")
        return torch.equal(fn(torch.ones(3)), torch.full((3,), 3.0))
    except Exception:
        return False


@pytest.mark.slow
def test_torch_compile_gives_the_same_loss_and_gradients_as_eager(kind):
    """Each decoder layer compiled whole (``fullgraph``: a graph break raises) gives eager's step; the
    layers share their graphs (the first layer's input needs no gradient: a second graph)."""
    if not _compile_available():
        pytest.skip("torch.compile (backend aot_eager) is not usable here")
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = adapted(kind)
    eager = training_step(model)
    counter = CompileCounterWithBackend("aot_eager")
    with compile_layers(model, backend=counter, fullgraph=True) as compiled:
        assert len(compiled.layers) == 2  # the tiny Llama's decoder layers
        steps = [training_step(model) for _ in range(2)]
    assert counter.frame_count == 2  # two graphs, the second step compiled nothing
    for step in steps:
        assert_same_step(step, eager, rtol=1e-5, atol=1e-6)
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))  # eager again


# --- 6. bf16 autocast --------------------------------------------------------------------------------------
def record_choices(model) -> tuple[dict, list]:
    """Each routed layer's ``Routing`` in the next forward, by module name (and the hooks, to remove)."""
    choices = {}
    hooks = [
        layer.router.register_forward_hook(lambda _m, _a, out, name=name: choices.__setitem__(name, out))
        for name, layer in model.routed_modules.items()
    ]
    return choices, hooks


def pin_choices(model, choices: dict) -> list:
    """Make each routed layer select the experts in ``choices``, its gates the softmax of its own logits over
    them (as the top-k and top-p routers form them): the discrete choice is fixed, everything continuous is
    this forward's."""

    def pinned(_module, args, out, name):
        ref = choices[name]
        if ref.selected is None:  # every expert is used: nothing to pin
            return out
        picked = out.probs.log().gather(1, ref.selected)  # log-probabilities: the logits up to a shift
        if ref.slot_mask is not None:
            picked = picked.masked_fill(~ref.slot_mask, float("-inf"))
        gates = torch.zeros_like(out.probs).scatter(1, ref.selected, picked.softmax(-1))
        return out._replace(gates=gates, selected=ref.selected, slot_mask=ref.slot_mask)

    return [
        layer.router.register_forward_hook(lambda m, a, out, name=name: pinned(m, a, out, name))
        for name, layer in model.routed_modules.items()
    ]


def test_bf16_autocast_trains_with_fp32_auxiliary_losses(kind):
    """Under bf16 autocast a training step gives finite fp32 losses and fp32 gradients within bf16 rounding
    of the fp32 step's. Rounding may flip a token's expert choice where two router logits nearly tie (a
    discrete change no tolerance covers), so the fp32 step takes the bf16 step's choices; its gates, losses
    and gradients are its own."""
    model = adapted(kind)
    choices, hooks = record_choices(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, grads = training_step(model)
    grads = {name: grad.clone() for name, grad in grads.items()}
    for hook in hooks:
        hook.remove()
    hooks = pin_choices(model, choices)
    fp32_losses, fp32_grads = training_step(model)
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(losses["loss"]) and losses.keys() == fp32_losses.keys()
    for key, value in fp32_losses.items():
        if key != "loss":
            assert losses[key].dtype == torch.float32, f"{key} is {losses[key].dtype}"
        torch.testing.assert_close(losses[key], value, rtol=1e-2, atol=1e-3, msg=lambda m, k=key: f"{k}: {m}")
    assert grads.keys() == fp32_grads.keys()
    errors = {}
    for name, grad in fp32_grads.items():
        assert grads[name].dtype == torch.float32 and torch.isfinite(grads[name]).all(), name
        errors[name] = (grads[name] - grad).norm() / grad.norm()
    worst = max(errors, key=errors.get)
    assert errors[worst] < 0.1, f"{worst}: the bf16 gradient is {errors[worst]:.3g} away from fp32 (norm)"
    total = torch.stack([(grads[n] - g).norm() for n, g in fp32_grads.items()]).norm()
    assert total / torch.stack([g.norm() for g in fp32_grads.values()]).norm() < 3e-2


# --- 7. FSDP2 ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    """Every kind's FSDP2, ZeRO-3 (``zero3 <kind>``) and one-process gradients (fp32 base), and LoRA
    experts' under FSDP2 on a bf16 base: one launch of 2 processes for all of them."""
    cases = {
        kind: dict(base_dtype="float32", config={"balance_weight": BALANCE, **KINDS[kind]}) for kind in KINDS
    }
    cases["bf16 base"] = dict(base_dtype="bfloat16", config={"balance_weight": BALANCE})
    if importlib.util.find_spec("deepspeed"):
        cases.update({f"zero3 {kind}": {**cases[kind], "engine": "zero3"} for kind in KINDS})
    out_path = str(tmp_path_factory.mktemp("fsdp") / "grads.pt")
    mp.spawn(sharded_worker.run, args=(2, _free_port(), out_path, cases), nprocs=2, join=True)
    return torch.load(out_path)


def _check_fsdp(result: dict, with_contrastive: bool) -> None:
    sharded, single = result["sharded"], result["single"]
    assert single and sorted(sharded) == sorted(single)
    con_sharded, con_single = result["contrastive"]
    if with_contrastive:
        assert con_single > 0
        torch.testing.assert_close(con_sharded, con_single, rtol=1e-5, atol=1e-6)
    else:
        assert con_sharded is None and con_single is None
    for name, grad in single.items():
        assert grad.abs().sum() > 0, f"{name}: no gradient reached it"
        torch.testing.assert_close(
            sharded[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.slow
def test_fsdp2_gives_one_process_gradients(kind, fsdp_results):
    """torch's ``fully_shard`` per decoder layer and the root, 2 CPU processes over gloo: what the losses need
    from the adapter weights (BᵀB, materialised expert outputs) is formed inside each layer's forward, while
    FSDP holds the layer's weights whole."""
    _check_fsdp(fsdp_results[kind], contrastive_on(kind))


@pytest.mark.slow
def test_zero3_gives_one_process_gradients(kind, fsdp_results):
    """DeepSpeed ZeRO-3 with every tensor partitioned: each module's weights are gathered when it runs
    (every kind, the grouped path too), and what the losses need from them is formed while they are
    gathered. Both ranks see the same batch here; ranks whose tokens pick other experts run the same
    modules all the same (a layer's experts are one module)."""
    pytest.importorskip("deepspeed")
    _check_fsdp(fsdp_results[f"zero3 {kind}"], contrastive_on(kind))


@pytest.mark.slow
def test_fsdp2_with_a_bf16_base_gives_one_process_gradients(fsdp_results):
    """A bf16 base (adapters and routers fp32), as `comoe train --bf16 true` trains."""
    _check_fsdp(fsdp_results["bf16 base"], with_contrastive=True)


# --- 8. parameter count ------------------------------------------------------------------------------------
def test_the_trainable_count_is_the_counted_parameters(kind):
    model = get_comoe_model(build("llama"), config_of(kind))
    counted = sum(p.numel() for p in trainable(model).values())
    assert all(is_adapter(name) for name in trainable(model))
    assert model.get_nb_trainable_parameters()[0] == counted
    assert adapter_parameter_count(build("llama"), config_of(kind)) == counted


# --- 9. from a fresh init ----------------------------------------------------------------------------------
def test_a_fresh_adapter_is_the_base_and_its_first_steps_are_finite(kind):
    """B = 0 at init: every expert's update is zero (the cosines' norms are floored, so the contrastive loss
    is finite there), and training moves off it with finite losses and gradients."""
    model = get_comoe_model(build("llama"), config_of(kind))
    # to fp32 rounding: DoRA's scale and FFN experts' shared FFN form the base output in another order
    torch.testing.assert_close(eval_logits(model), eval_logits(build("llama")), rtol=0, atol=1e-6)
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    for step in range(3):
        losses, grads = training_step(model, seed=step)
        assert all(torch.isfinite(value) for value in losses.values()), (step, losses)
        assert all(torch.isfinite(grad).all() for grad in grads.values() if grad is not None), step
        optimizer.step()
    assert not torch.allclose(eval_logits(model), eval_logits(build("llama")), atol=1e-4)  # it trained
