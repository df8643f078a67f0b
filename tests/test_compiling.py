"""`comoe.compile_layers`: each decoder layer's forward compiled, with Trainer, checkpointing, DDP and FSDP2,
and undone.

The backend is ``aot_eager`` (Dynamo's graph capture and AOT autograd without code generation, seconds on
a CPU); `comoe train --compile` with inductor is tested end to end in tests/training/test_train.py.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from peft import get_peft_model
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import Trainer, TrainingArguments

from comoe import compile_layers, get_comoe_model
from comoe.compiling import decoder_layers
from tests.test_contract import adapted, assert_same_step, training_step
from tests.test_trainer import dataset
from tests.tiny_models import VOCAB, build, randomize_adapters, tiny_comoe_config

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]


def test_restore_gives_back_the_eager_forward_and_an_earlier_instance_forward():
    model = adapted("lora")
    first, second = decoder_layers(model)
    patched = first.forward  # another library's patch on the instance stays after restore
    first.forward = patched
    handle = compile_layers(model, backend="aot_eager")
    assert first.forward is not patched and "forward" in second.__dict__
    handle.restore()
    assert first.forward is patched and "forward" not in second.__dict__


def test_layers_share_two_graphs_however_deep_the_model_is():
    """Four layers, two graphs: the first layer's (its input needs no gradient) and the other three's."""
    torch._dynamo.reset()
    model = get_comoe_model(build("llama", num_layers=4), tiny_comoe_config("llama", contrastive_weight=0.1))
    randomize_adapters(model)
    eager = training_step(model)
    counter = CompileCounterWithBackend("aot_eager")
    with compile_layers(model, backend=counter, fullgraph=True) as handle:
        assert len(handle.layers) == 4
        compiled = training_step(model)
    assert counter.frame_count == 2
    assert_same_step(compiled, eager, rtol=1e-5, atol=1e-6)


def test_layers_under_accelerates_instance_forward_compile_and_give_the_eager_step():
    """A forward that accelerate's hooks set on the instance (a partial: ``device_map`` dispatch) is compiled
    as it is, and restored."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    torch._dynamo.reset()
    model = adapted("lora")
    for layer in decoder_layers(model):
        add_hook_to_module(layer, ModelHook())
    hooked = [layer.forward for layer in decoder_layers(model)]
    eager = training_step(model)
    counter = CompileCounterWithBackend("aot_eager")
    with compile_layers(model, backend=counter):
        compiled = training_step(model)
    assert counter.frame_count >= 1
    assert_same_step(compiled, eager, rtol=1e-5, atol=1e-6)
    assert [layer.forward for layer in decoder_layers(model)] == hooked


def test_activation_checkpointing_is_refused_and_the_cache_setting_comes_back():
    """torch's checkpoint runs its function with the compiler off: the layers would run eagerly."""
    model = adapted("lora")
    base = model.get_base_model()
    base.config.use_cache = True
    with compile_layers(model, backend="aot_eager"):
        assert base.config.use_cache is False  # no KV cache while the layers are compiled
    assert base.config.use_cache is True
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="activation checkpointing is on.*Turn one of them off"):
        compile_layers(model)


def test_a_model_without_decoder_layer_classes_is_refused_naming_them():
    model = adapted("lora")
    model.get_base_model()._no_split_modules = []
    with pytest.raises(ValueError, match=r"_no_split_modules is empty.*train without compiling"):
        compile_layers(model)


def test_trainer_with_compiled_layers_trains_what_eager_trains(tmp_path):
    """The documented way for Trainer: ``compile_layers(model)`` before ``trainer.train()``; the same losses
    (λ > 0, so the auxiliary term is in them) and adapter as an eager Trainer."""

    def train(compiled: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        config = tiny_comoe_config("llama", contrastive_weight=0.5, anchor="all")
        config.task_type = "CAUSAL_LM"
        model = get_peft_model(build("llama"), config)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(compiled)),
            per_device_train_batch_size=4,
            max_steps=3,
            learning_rate=1e-2,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset())
        counter = CompileCounterWithBackend("aot_eager")
        if compiled:
            compile_layers(model, backend=counter, fullgraph=True)
        trainer.train()
        assert (counter.frame_count > 0) == compiled
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    (eager_losses, eager_params), (losses, params) = train(False), train(True)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for name, value in eager_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrapped_model_compiles_its_layers_and_gives_the_eager_step():
    """``compile_layers`` on the DDP wrapper finds the layers inside it; DDP's gradient hooks fire after the
    compiled backward."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        torch._dynamo.reset()
        model = adapted("lora")
        eager = training_step(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        counter = CompileCounterWithBackend("aot_eager")
        with compile_layers(ddp, backend=counter, fullgraph=True):
            compiled = training_step(model, ddp)
        assert counter.frame_count == 2
        assert_same_step(compiled, eager, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_layers_compile_and_give_the_eager_step():
    """Under FSDP2 each sharded layer is an instance of a subclass of its class: it is found, compiled
    whole (its hooks, which gather the shards, stay outside the graph), and gives eager's step."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        torch._dynamo.reset()
        model = adapted("lora")
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model.get_base_model())
        eager = training_step(model)
        counter = CompileCounterWithBackend("aot_eager")
        with compile_layers(model, backend=counter, fullgraph=True) as handle:
            assert len(handle.layers) == 2 and all(type(m).__name__.startswith("FSDP") for m in handle.layers)
            compiled = training_step(model)
        assert counter.frame_count == 2
        assert_same_step(compiled, eager, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_a_static_cache_decode_step_compiles_whole_and_generates_eagers_tokens():
    """Generation with transformers' static KV cache, whose decode step transformers compiles (on GPUs;
    forced here on the CPU): a comoe model's forward, hooks included, traces as one graph (``fullgraph``)
    for top-k and top-p routing and gives eager's greedy tokens."""
    from transformers import CompileConfig

    for kind in ("lora", "topp"):  # top-k and a data-dependent number of experts per token
        torch._dynamo.reset()
        model = adapted(kind).eval()
        inputs = {
            "input_ids": torch.randint(3, VOCAB, (2, 6)),
            "attention_mask": torch.ones(2, 6, dtype=torch.long),
        }
        settings = dict(max_new_tokens=4, do_sample=False, cache_implementation="static", pad_token_id=0)
        config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)  # a graph break raises
        config._compile_all_devices = True  # transformers compiles the decode step on GPUs only by default
        with torch.no_grad():
            eager = model.generate(**inputs, **settings)
            assert not hasattr(model.get_base_model(), "_compiled_call")
            compiled = model.generate(**inputs, **settings, compile_config=config)
        assert hasattr(model.get_base_model(), "_compiled_call"), f"{kind}: the decode step was not compiled"
        assert torch.equal(compiled, eager), kind
