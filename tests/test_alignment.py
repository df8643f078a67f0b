"""TRL's DPO and GRPO through ``comoe.alignment`` (and KTO through ``with_aux_loss``): the policy's training
forward inside ``compute_loss`` brings the contrastive term into the loss they optimise, once, with the
weight comoe's other paths give it; the reference, old-log-probability and generation forwards (under
``no_grad``) bring nothing; the adapter they save reloads to the same logits."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer

from comoe import CoMoEModel, with_aux_loss
from comoe.alignment import CoMoEDPOTrainer, CoMoEGRPOTrainer
from tests.tiny_models import randomize_adapters, tiny_comoe_config

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]

PROMPTS = ["the cat sat on", "two plus two is", "paris is the capital of", "bees make"]
PAIRS = {"prompt": PROMPTS, "chosen": [" the mat", " four", " france", " honey"]}
PAIRS["rejected"] = [" the moon", " five", " spain", " wax"]
LAMBDA = 0.5
COMMON = dict(report_to="none", save_strategy="no", bf16=False, learning_rate=1e-2, logging_steps=1)


def comoe_config():
    return tiny_comoe_config("llama", contrastive_weight=LAMBDA)


class Forwards:
    """Each forward of the wrapped model: (training mode, autograd on, its auxiliary losses)."""

    def __init__(self, model: PeftModel):
        self.tuner, self.seen = model.base_model, []
        self.handle = self.tuner.model.register_forward_hook(self)

    def __call__(self, module, args, outputs):
        self.seen.append((module.training, torch.is_grad_enabled(), self.tuner.last_aux))

    def training(self) -> list:
        return [aux for training, grad, aux in self.seen if training and grad]


def assert_reloads_the_same_logits(trainer, model_dir, directory, loader) -> None:
    trainer.save_model(str(directory))
    reloaded = loader(AutoModelForCausalLM.from_pretrained(model_dir), directory)
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPTS[:2], return_tensors="pt", padding=True)
    trainer.model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, trainer.model(**ids).logits, rtol=0, atol=0)


def adapter_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.base_model.adapter_state_dict().items()}


def test_dpo_optimises_the_contrastive_term_of_the_policy_forward_and_saves_a_comoe_adapter(
    tiny_model_dir, tmp_path
):
    args = DPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **COMMON,
    )
    trainer = CoMoEDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=Dataset.from_dict(PAIRS),
        peft_config=comoe_config(),
    )
    model = trainer.model
    assert isinstance(model, PeftModel) and trainer.ref_model is None  # the reference: the adapter disabled
    randomize_adapters(
        model
    )  # B = 0 at init: a policy equal to the reference, the same L_con for any anchors
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    forwards = Forwards(model)
    loss = trainer.compute_loss(model, dict(inputs))
    forwards.handle.remove()
    # the policy forward, then the reference forward under no_grad, which has no auxiliary loss to add
    assert [(training, grad) for training, grad, _ in forwards.seen] == [(True, True), (True, False)]
    (aux,) = forwards.training()
    assert aux.contrastive > 0 and model.base_model.training_aux is aux
    dpo_only = DPOTrainer.compute_loss(trainer, model, dict(inputs))  # what plain DPOTrainer optimises
    # weight 1: DPO's loss is a mean over the micro-batch's pairs, divided by the accumulation steps later
    torch.testing.assert_close(loss, dpo_only + LAMBDA * aux.contrastive, rtol=1e-6, atol=1e-6)

    before = adapter_weights(model)
    trainer.train()
    after = model.base_model.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no adapter weight"
    assert_reloads_the_same_logits(trainer, tiny_model_dir, tmp_path / "saved", CoMoEModel.from_pretrained)


def completion_length(completions, **_) -> list[float]:
    """A reward with a spread, so that the advantages are not all zero."""
    return [float(len(completion)) for completion in completions]


def test_grpo_optimises_the_contrastive_term_of_the_training_forward_and_saves_a_comoe_adapter(
    tiny_model_dir, tmp_path
):
    """Two accumulation steps and two iterations per generation: GRPO computes the old log-probabilities
    (and, beta > 0, the reference's) under no_grad while it prepares the inputs, after generating."""
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        num_iterations=2,
        num_generations=4,
        max_completion_length=4,
        beta=0.1,
        **COMMON,
    )
    trainer = CoMoEGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        reward_funcs=completion_length,
        args=args,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=comoe_config(),
    )
    model, tuner = trainer.model, trainer.model.base_model
    randomize_adapters(model)
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop, read by GRPO's loss
    model.train()
    forwards = Forwards(model)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert {"old_per_token_logps", "ref_per_token_logps"} <= set(inputs)
    assert forwards.seen and not forwards.training() and tuner.training_aux is None  # all under no_grad
    forwards.seen.clear()
    loss = trainer.compute_loss(model, inputs)
    forwards.handle.remove()
    (aux,) = forwards.training()
    assert aux.contrastive > 0 and len(forwards.seen) == 1
    grpo_only = GRPOTrainer.compute_loss(trainer, model, inputs)
    # weight 1/2: GRPO's loss is already normalised over the two accumulated micro-batches
    torch.testing.assert_close(loss, grpo_only + LAMBDA * aux.contrastive / 2, rtol=1e-6, atol=1e-6)

    before = adapter_weights(model)
    trainer.train()
    after = model.base_model.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no adapter weight"
    assert_reloads_the_same_logits(trainer, tiny_model_dir, tmp_path / "saved", PeftModel.from_pretrained)


def test_with_aux_loss_brings_the_contrastive_term_into_another_trl_trainer(tiny_model_dir, tmp_path):
    """KTO, which no comoe class names: its KL and reference forwards run under no_grad."""
    data = {
        "prompt": PROMPTS + PROMPTS,
        "completion": PAIRS["chosen"] + PAIRS["rejected"],
        "label": [True] * 4 + [False] * 4,
    }
    trainer = with_aux_loss(KTOTrainer)(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=KTOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, **COMMON),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=Dataset.from_dict(data),
        peft_config=comoe_config(),
    )
    model = trainer.model
    randomize_adapters(model)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    forwards = Forwards(model)
    loss = trainer.compute_loss(model, dict(inputs))
    forwards.handle.remove()
    (aux,) = forwards.training()
    assert len(forwards.seen) > 1  # the reference (and KL) forwards ran too
    kto_only = KTOTrainer.compute_loss(trainer, model, dict(inputs))
    torch.testing.assert_close(loss, kto_only + LAMBDA * aux.contrastive, rtol=1e-6, atol=1e-6)
    trainer.train()


def test_the_readme_example(tiny_model_dir, tmp_path, monkeypatch):
    """README's TRL section, line for line."""
    monkeypatch.chdir(tmp_path)
    name, tokenizer, pairs = (
        str(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
        Dataset.from_dict(PAIRS),
    )
    # --- README ---
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, KTOTrainer

    from comoe import CoMoEConfig, CoMoEModel, with_aux_loss
    from comoe.alignment import CoMoEDPOTrainer  # CoMoEGRPOTrainer: the same way

    trainer = CoMoEDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(name),
        args=DPOConfig(output_dir="runs/dpo", num_train_epochs=1, bf16=torch.cuda.is_available()),
        processing_class=tokenizer,
        train_dataset=pairs,  # prompt, chosen, rejected
        peft_config=CoMoEConfig(target_modules=["q_proj", "v_proj"], contrastive_weight=0.01),
    )
    trainer.train()
    trainer.save_model("runs/dpo")  # a CoMoE adapter
    policy = CoMoEModel.from_pretrained(AutoModelForCausalLM.from_pretrained(name), "runs/dpo")

    CoMoEKTOTrainer = with_aux_loss(KTOTrainer)  # any other trainer that computes its own loss
    # --- end ---
    assert len(policy.adapted_modules) == 4 and CoMoEKTOTrainer.__name__ == "CoMoEKTOTrainer"
    assert trainer.model.base_model.training_aux.contrastive > 0
