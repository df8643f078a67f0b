"""``comoe.trainers``: ``AuxLossMixin`` / ``with_aux_loss`` on ``transformers.Trainer`` itself (the loss it
optimises already holds the auxiliary loss: nothing is added; with ``compute_loss_func`` the labels never reach
the model, so it is added, weighted as comoe weighs it), what it refuses, and the optional TRL extra."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments

import comoe
from comoe import get_comoe_model, with_aux_loss
from comoe.auxiliary import token_share
from comoe.trainers import AuxLossMixin
from tests.tiny_models import batch, build, randomize_adapters, tiny_comoe_config

pytestmark = pytest.mark.usefixtures("single_thread")


def causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """A user's ``compute_loss_func``: summed next-token cross-entropy over ``num_items_in_batch`` tokens."""
    logits, targets = outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=-100)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / num_items_in_batch


def trainer_inputs() -> dict:
    inputs = batch("llama", batch_size=3, seq_len=9)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def comoe_trainer(tmp_path, cls=Trainer, **kwargs) -> Trainer:
    model = get_comoe_model(build("llama"), tiny_comoe_config("llama", contrastive_weight=0.5))
    randomize_adapters(model)  # B = 0 at init gives every anchor draw the same loss
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, gradient_accumulation_steps=2
    )
    return cls(model=model, args=args, **kwargs)


def test_under_trainer_the_auxiliary_loss_in_outputs_loss_is_counted_once(tmp_path):
    trainer = comoe_trainer(tmp_path, with_aux_loss(Trainer))
    model, inputs = trainer.model, trainer_inputs()
    model.train()
    torch.manual_seed(1)  # the same random anchors in both forwards
    loss = trainer.compute_loss(model, dict(inputs))
    assert model.base_model.training_aux.contrastive > 0
    torch.manual_seed(1)
    torch.testing.assert_close(loss, Trainer.compute_loss(trainer, model, dict(inputs)), rtol=0, atol=0)
    assert trainer._comoe_aux_in_loss is True


def test_with_compute_loss_func_the_auxiliary_loss_is_added_by_token_share(tmp_path):
    """Trainer pops the labels for ``compute_loss_func``, so the model computes no loss and comoe's hook adds
    the auxiliary loss nowhere; the mixin adds it with the micro-batch's share of the step's labelled tokens."""
    trainer = comoe_trainer(tmp_path, with_aux_loss(Trainer), compute_loss_func=causal_lm_loss)
    model, inputs = trainer.model, trainer_inputs()
    model.train()
    step_tokens = 2 * int((inputs["labels"][:, 1:] != -100).sum())  # this micro-batch holds half the step's
    torch.manual_seed(1)
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=step_tokens)
    aux = model.base_model.training_aux
    torch.manual_seed(1)
    task = Trainer.compute_loss(trainer, model, dict(inputs), num_items_in_batch=step_tokens)
    assert token_share(inputs["labels"], step_tokens) == 0.5
    torch.testing.assert_close(loss, task + 0.5 * aux.contrastive * 0.5, rtol=1e-6, atol=1e-6)
    loss.backward()  # reaches the experts through the auxiliary term
    assert all(p.grad is not None for p in model.base_model.adapter_state_dict().values())


def test_evaluation_adds_nothing(tmp_path):
    trainer = comoe_trainer(tmp_path, with_aux_loss(Trainer), compute_loss_func=causal_lm_loss)
    model, inputs = trainer.model, trainer_inputs()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            trainer.compute_loss(model, dict(inputs)), Trainer.compute_loss(trainer, model, dict(inputs))
        )


def test_with_aux_loss_makes_one_class_per_trainer_and_refuses_what_is_no_trainer():
    cls = with_aux_loss(Trainer)
    assert cls is with_aux_loss(Trainer) and with_aux_loss(cls) is cls
    assert issubclass(cls, AuxLossMixin) and issubclass(cls, Trainer) and cls.__name__ == "CoMoETrainer"
    with pytest.raises(TypeError, match="transformers.Trainer subclass"):
        with_aux_loss(torch.nn.Module)


def test_the_mixin_after_the_trainer_among_the_bases_is_refused():
    with pytest.raises(TypeError, match="put AuxLossMixin before Trainer among the bases of Late"):

        class Late(Trainer, AuxLossMixin):  # Trainer.compute_loss would shadow the mixin's
            pass


def test_a_model_without_comoe_layers_is_refused(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="CoMoETrainer trains CoMoE adapters"):
        with_aux_loss(Trainer)(model=build("llama"), args=args)


def test_a_moe_base_whose_router_loss_trl_would_read_is_refused(tiny_model_dir, tmp_path):
    """TRL adds ``router_aux_loss_coef · outputs.aux_loss`` for a MoE base; comoe's adapter owns that field."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    from comoe.sft import CoMoESFTTrainer

    config = MixtralConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    base = MixtralForCausalLM(config)
    model = get_comoe_model(base, tiny_comoe_config("llama", target_modules=["q_proj", "v_proj"]))
    data = Dataset.from_dict({"input_ids": [[1, 5, 7, 9]] * 2})

    def sft(coef):
        args = trl.SFTConfig(
            output_dir=str(tmp_path), report_to="none", bf16=False, router_aux_loss_coef=coef
        )
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        return CoMoESFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=data)

    with pytest.raises(ValueError, match="router_aux_loss_coef=0.0"):
        sft(None)  # the architecture's own coefficient
    assert not sft(0.0).aux_loss_enabled


def test_without_trl_the_trainers_name_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    for module in ("comoe.sft", "comoe.alignment"):
        monkeypatch.delitem(sys.modules, module, raising=False)
        with pytest.raises(ImportError, match=r"pip install 'comoe\[trl\]'"):
            importlib.import_module(module)
    with pytest.raises(ImportError, match=r"pip install 'comoe\[trl\]'"):
        comoe.CoMoEDPOTrainer  # noqa: B018  (the lazy export)
