"""The contrastive term reaches the optimiser whatever wraps the model.

Each wrapper that runs on the CPU (accelerate's bf16 mixed precision, DDP, torch.compile, activation
checkpointing) gets a tiny CoMoE Llama in training mode, made by comoe's API and by PEFT's; the test checks that the output still carries
``aux_loss`` / ``contrastive_loss`` and that the gradient of the loss the model returns differs from the
gradient of the task loss alone, i.e. the contrastive term is in the gradient. (A wrapper that rebuilds the
output drops a plain attribute: the losses travel as output fields so that no wrapper trains plain MoE-LoRA
in silence.)
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from peft import get_peft_model

from comoe import get_comoe_model
from tests.tiny_models import batch, build, is_adapter, randomize_adapters, tiny_comoe_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(params=["get_comoe_model", "get_peft_model"])
def maker(request) -> str:
    """Each wrapper is tested on comoe's model and on the PeftModelForCausalLM that PEFT's own API builds."""
    return request.param


@pytest.fixture(params=["linear", "ffn"])
def placement(request) -> str:
    """Experts on each linear, and whole-FFN experts on each MLP block (plain LoRA on the attention)."""
    return request.param


def tiny_model(maker: str = "get_comoe_model", placement: str = "linear", **overrides):
    config = tiny_comoe_config("llama", placement=placement, **overrides)
    if maker == "get_peft_model":
        config.task_type = "CAUSAL_LM"
        model = get_peft_model(build("llama"), config)
    else:
        model = get_comoe_model(build("llama"), config)
    randomize_adapters(model)
    return model.train()


def inputs_and_labels() -> dict:
    inputs = batch("llama")
    return {**inputs, "labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)}


def expert_grads(loss: torch.Tensor, model, retain_graph: bool = True) -> list[torch.Tensor]:
    params = [p for n, p in sorted(model.named_parameters()) if is_adapter(n) and n.endswith("_A")]
    return [g.float() for g in torch.autograd.grad(loss, params, retain_graph=retain_graph)]


def assert_contrastive_in_gradient(out, core, task_only: list[torch.Tensor] | None = None) -> None:
    """``task_only``: the task loss's gradients, when taken from another forward (a compiled graph can be
    differentiated only once)."""
    assert "aux_loss" in out and "contrastive_loss" in out, (
        f"the output lost its aux fields: {list(out.keys())}"
    )
    assert torch.isfinite(out.contrastive_loss) and out.contrastive_loss > 0
    if task_only is None:
        task_only = expert_grads(out.loss - out.aux_loss, core)
    with_aux = expert_grads(out.loss, core, retain_graph=False)
    differences = [(a - b).abs().max().item() for a, b in zip(with_aux, task_only, strict=True)]
    assert max(differences) > 0, "the contrastive term does not reach the expert gradients"


def test_plain_model(maker, placement):
    model = tiny_model(maker, placement)
    assert_contrastive_in_gradient(model(**inputs_and_labels()), model)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; another test's Accelerator must not fix its precision."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_bf16_mixed_precision(fresh_accelerator_state, maker, placement):
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = tiny_model(maker, placement)
    prepared = accelerator.prepare(model)
    with accelerator.autocast():
        out = prepared(**inputs_and_labels())
    assert out.logits.dtype == torch.float32  # accelerate rebuilt the output (fp32 conversion)...
    assert_contrastive_in_gradient(out, accelerator.unwrap_model(prepared))  # ...and the aux fields survived


def test_bf16_base_weights(placement):
    """What `comoe train --bf16 true` does: the frozen base in bf16, adapters and routers in fp32."""
    config = tiny_comoe_config("llama", placement=placement)
    model = get_comoe_model(build("llama").to(torch.bfloat16), config)
    randomize_adapters(model)
    assert {p.dtype for n, p in model.named_parameters() if "comoe_" in n} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(**inputs_and_labels())
    assert_contrastive_in_gradient(out, model)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_distributed_data_parallel(maker, placement):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = tiny_model(maker, placement)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert_contrastive_in_gradient(ddp(**inputs_and_labels()), model)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_compile():
    """The whole model compiled (Trainer's ``torch_compile=True``; ``comoe.compile_layers``, the layers
    only, is tests/test_compiling.py): the contrastive term is in the gradient."""
    maker = "get_peft_model"
    try:  # a torch build without a working compiler skips; a failure of the CoMoE model below does not
        torch.compile(torch.nn.Linear(2, 2), backend="aot_eager")(torch.ones(1, 2))
    except Exception as err:  # pragma: no cover
        pytest.skip(f"torch.compile is not usable here: {err}")
    model = tiny_model(maker)
    eager = model(**inputs_and_labels())  # no dropout, and the task loss does not see the anchor draws
    task_only = expert_grads(eager.loss - eager.aux_loss, model, retain_graph=False)
    out = torch.compile(model, backend="aot_eager")(**inputs_and_labels())
    assert_contrastive_in_gradient(out, model, task_only)


def test_gradient_checkpointing(maker, placement):
    model = tiny_model(maker, placement)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert_contrastive_in_gradient(model(**inputs_and_labels()), model)
