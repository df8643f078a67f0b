"""TRL's SFTTrainer through ``comoe.sft.CoMoESFTTrainer``: the contrastive term is in the loss it optimises
(plain SFTTrainer computes its loss from a fused LM head and would drop it), with gradient checkpointing on
and off, and the adapter it saves loads back as a comoe adapter."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from comoe import CoMoEModel
from comoe.config import CONFIG_NAME, WEIGHTS_NAME
from comoe.sft import CoMoESFTTrainer
from tests.tiny_models import randomize_adapters, tiny_comoe_config

pytestmark = pytest.mark.usefixtures("single_thread")

SENTENCES = [
    "the cat sat on the mat",
    "two plus two is four",
    "paris is the capital of france",
    "water boils at one hundred degrees",
    "the sun rises in the east",
    "bees make honey",
]


def sft_trainer(model_dir, out_dir, cls=CoMoESFTTrainer, checkpointing=False, **config) -> SFTTrainer:
    args = SFTConfig(
        output_dir=str(out_dir),
        max_steps=4,
        per_device_train_batch_size=3,
        learning_rate=1e-2,
        max_length=32,
        gradient_checkpointing=checkpointing,
        report_to="none",
        save_strategy="no",
        bf16=False,
        **config,
    )
    return cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        train_dataset=Dataset.from_dict({"text": SENTENCES * 2}),
        peft_config=tiny_comoe_config("llama", contrastive_weight=0.5, lora_dropout=0.0),
    )


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_sft_trainer_optimises_the_contrastive_term_and_saves_a_comoe_adapter(
    tiny_model_dir, tmp_path, checkpointing
):
    trainer = sft_trainer(tiny_model_dir, tmp_path / "out", checkpointing=checkpointing)
    model = trainer.model
    assert isinstance(model, PeftModel) and len(model.base_model.adapted_modules) == 8
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    aux = model.base_model.training_aux
    assert aux is not None and aux.contrastive > 0
    sft_only = SFTTrainer.compute_loss(trainer, model, dict(inputs))  # what plain SFTTrainer optimises
    torch.testing.assert_close(loss, sft_only + 0.5 * aux.contrastive, rtol=1e-5, atol=1e-5)

    before = {k: v.detach().clone() for k, v in model.base_model.adapter_state_dict().items()}
    trainer.train()
    after = model.base_model.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no adapter weight"

    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / CONFIG_NAME).is_file() and (tmp_path / "saved" / WEIGHTS_NAME).is_file()
    reloaded = CoMoEModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "saved"
    )
    ids = inputs["input_ids"][:2]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
        )


def test_sft_trainer_without_a_comoe_adapter_is_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="CoMoESFTTrainer trains CoMoE adapters"):
        CoMoESFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=SFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False),
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
            train_dataset=Dataset.from_dict({"text": SENTENCES}),
            peft_config=LoraConfig(target_modules=["q_proj"]),
        )


def test_sft_trainer_counts_the_training_forward_not_the_no_grad_one_after_it(tiny_model_dir, tmp_path):
    """With ``compute_loss_func`` SFTTrainer runs the model twice: the loss's forward, then one under no_grad
    for its metrics (the adapter on, in training mode), which computes no auxiliary loss. Only the first brings
    its auxiliary loss, weighted by the micro-batch's share of the step's labelled tokens."""

    def cross_entropy(outputs, labels, num_items_in_batch=None):
        logits, targets = outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch

    trainer = sft_trainer(tiny_model_dir, tmp_path / "out")
    trainer.compute_loss_func = cross_entropy
    model, tuner = trainer.model, trainer.model.base_model
    randomize_adapters(model)  # B = 0 at init gives every anchor draw the same loss
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    step_tokens = 4 * int((inputs["labels"][:, 1:] != -100).sum())  # as if 4 micro-batches like this one
    model.train()
    seen = []
    handle = tuner.model.register_forward_hook(
        lambda *_: seen.append((torch.is_grad_enabled(), tuner.last_aux))
    )
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=step_tokens)
    handle.remove()
    assert [grad for grad, _ in seen] == [True, False]
    aux, other = seen[0][1], seen[1][1]
    assert aux is not None and other is None  # a forward without autograd computes no auxiliary loss
    task = SFTTrainer.compute_loss(trainer, model, dict(inputs), num_items_in_batch=step_tokens)
    torch.testing.assert_close(loss, task + 0.5 * aux.contrastive / 4, rtol=1e-5, atol=1e-6)
