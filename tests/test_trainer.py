"""transformers.Trainer with its default arguments trains a CoMoE model, saves a comoe adapter, resumes.

A tiny random Llama and a `datasets.Dataset` with an extra text column (Trainer's default
`remove_unused_columns=True` must keep the model's inputs and drop only that one).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from comoe import CoMoEModel, get_comoe_model
from comoe.config import CONFIG_NAME, WEIGHTS_NAME
from tests.tiny_models import VOCAB, build, tiny_comoe_config

pytestmark = pytest.mark.usefixtures("single_thread")


def dataset(rows: int = 16, length: int = 12) -> Dataset:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": ids.tolist(),
            "text": [f"row {i}" for i in range(rows)],  # not a model input: Trainer drops it
        }
    )


def comoe_model(maker: str = "get_comoe_model"):
    """A CoMoE model made by comoe's own API or by PEFT's (a PeftModelForCausalLM)."""
    config = tiny_comoe_config("llama", contrastive_weight=0.5)
    if maker == "get_peft_model":
        config.task_type = "CAUSAL_LM"
        return get_peft_model(build("llama"), config)
    return get_comoe_model(build("llama"), config)


def trainer_for(model, out_dir, **overrides) -> Trainer:
    settings = {"per_device_train_batch_size": 4, "max_steps": 4, "learning_rate": 1e-2, **overrides}
    return Trainer(
        model=model, args=TrainingArguments(output_dir=str(out_dir), **settings), train_dataset=dataset()
    )


class StopAt(TrainerCallback):
    """Ends training after ``step`` steps, as a killed job would (its checkpoint at that step is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def adapter_tensors(model: CoMoEModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


@pytest.mark.parametrize("maker", ["get_comoe_model", "get_peft_model"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_trainer_defaults_train_with_the_contrastive_term_and_save_an_adapter(tmp_path, checkpointing, maker):
    model = comoe_model(maker)
    before = adapter_tensors(model)
    trainer = trainer_for(model, tmp_path / "out", activation_checkpointing=checkpointing)

    # The loss Trainer optimises is the task loss plus λ·L_con.
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert set(inputs) == {"input_ids", "attention_mask", "labels"}  # the text column was dropped, no more
    model.train()
    loss, out = trainer.compute_loss(model, inputs, return_outputs=True)
    task = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), inputs["labels"][:, 1:].reshape(-1))
    assert out.contrastive_loss > 0
    torch.testing.assert_close(loss, task + 0.5 * out.contrastive_loss, rtol=1e-5, atol=1e-5)

    trainer.train()
    after = adapter_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no adapter weight"

    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    assert (saved / CONFIG_NAME).is_file() and (saved / WEIGHTS_NAME).is_file()
    assert not (saved / "model.safetensors").exists(), "Trainer wrote the whole model instead of the adapter"
    assert set(load_file(saved / WEIGHTS_NAME)) == {"base_model.model." + k for k in after}  # PEFT layout

    reloaded = CoMoEModel.from_pretrained(build("llama"), saved)
    ids = dataset()["input_ids"][:2]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=torch.tensor(ids)).logits,
            model(input_ids=torch.tensor(ids)).logits,
            rtol=0,
            atol=0,
        )


def test_trainer_checkpoints_are_adapters_and_resume_to_the_same_weights(tmp_path):
    straight = comoe_model()
    trainer_for(straight, tmp_path / "straight", save_strategy="no").train()

    first = trainer_for(comoe_model(), tmp_path / "resumed", save_steps=2)
    first.add_callback(StopAt(2))
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / WEIGHTS_NAME).is_file() and not (checkpoint / "model.safetensors").exists()

    second = comoe_model()
    trainer_for(second, tmp_path / "resumed", save_steps=2).train(resume_from_checkpoint=str(checkpoint))
    for name, value in adapter_tensors(straight).items():
        torch.testing.assert_close(adapter_tensors(second)[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert os.path.isdir(tmp_path / "resumed" / "checkpoint-4")


def test_with_gradient_accumulation_the_aux_term_weighs_by_the_micro_batch_token_share(tmp_path):
    """Trainer passes num_items_in_batch (labelled tokens of the whole accumulated batch) and then does not
    divide by the accumulation steps: the aux term must be scaled to this micro-batch's share, or λ would
    count once per micro-batch."""
    model = comoe_model()
    trainer = trainer_for(model, tmp_path / "out", gradient_accumulation_steps=2)
    assert trainer.model_accepts_loss_kwargs
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    predicted = int((inputs["labels"][:, 1:] != -100).sum())
    total = 2 * predicted  # two micro-batches of the same size
    model.train()
    loss, out = trainer.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=total)
    task_sum = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), inputs["labels"][:, 1:].reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(
        loss, task_sum / total + out.aux_loss * predicted / total, rtol=1e-5, atol=1e-6
    )


def test_routing_health_callback_logs_each_routed_layer_through_the_trainer(tmp_path):
    from comoe import RoutingHealthCallback

    model = comoe_model("get_peft_model")  # a plain PeftModelForCausalLM
    trainer = trainer_for(model, tmp_path, max_steps=4, logging_steps=100, report_to="none")
    trainer.add_callback(RoutingHealthCallback(trainer, every=2))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if any(k.startswith("routing/") for k in entry)]
    assert [entry["step"] for entry in logged] == [2, 4]
    layers = set(model.base_model.routed_modules)
    assert {key.split("/")[1] for key in logged[0] if key.startswith("routing/")} == layers
    assert all(0 <= logged[0][f"routing/{name}/load_entropy"] <= 1 for name in layers)
