"""Validation while training: every ``eval_steps`` steps, the held-out examples' task loss and accuracy.

The examples are held out of each task's training examples (``RunConfig.val_per_task``), never the test
split. Validation runs on the main process, in evaluation mode, outside the training's random streams:
a run with validation trains the same adapter as one without it, and resumes to it exactly.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from comoe.data.batching import collate, encode_example
from comoe.data.schema import Example
from comoe.evaluation.scoring import evaluate_tasks
from comoe.model import CoMoEModel
from comoe.training.run_config import RunConfig
from comoe.training.task_loss import causal_lm_loss, label_tokens
from comoe.utils.modeling import accepts_logits_to_keep, pad_token_id

VAL_KEYS = ("val_loss", "val_accuracy")  # what a validation adds to its step's train_log row


class Validator:
    """Scores ``examples`` (task -> held-out examples) with the model being trained."""

    def __init__(
        self, examples: dict[str, list[Example]], tokenizer, task_names: list[str], run: RunConfig
    ) -> None:
        self.examples, self.tokenizer, self.run = examples, tokenizer, run
        index = {name: i for i, name in enumerate(task_names)}
        self.encoded = [
            encode_example(ex, tokenizer, index[ex.task], run.max_length, run.train_on_prompt)
            for task in examples
            for ex in examples[task]
        ]

    def due(self, step: int, total_steps: int) -> bool:
        """Whether optimiser step ``step`` (1-based) ends with a validation."""
        every = self.run.eval_steps
        return bool(every) and (step % every == 0 or step == total_steps)

    def __call__(self, model, accelerator: Accelerator) -> dict[str, float]:
        """``val_loss`` (cross-entropy per label token, as the training's task loss) and ``val_accuracy``
        (the macro average under the run's protocol) of ``model``, the unwrapped adapted model."""
        was_training = model.training
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices),
            torch.no_grad(),
            accelerator.autocast(),
            torch.compiler.set_stance("force_eager"),  # under --compile: no graphs for evaluation
        ):
            model.eval()
            try:
                loss = self._task_loss(model, accelerator.device)
                scores = evaluate_tasks(
                    model,
                    self.tokenizer,
                    self.examples,
                    protocol=self.run.protocol,
                    batch_size=self.run.eval_batch_size,
                    max_length=self.run.max_length,
                    progress=False,
                )
            finally:
                model.train(was_training)
        return {"val_loss": loss, "val_accuracy": scores["macro"]["accuracy"]}

    def _task_loss(self, model, device: torch.device) -> float:
        total, tokens = 0.0, 0
        size = self.run.eval_batch_size
        for start in range(0, len(self.encoded), size):
            batch = collate(self.encoded[start : start + size], pad_token_id(self.tokenizer))
            batch = {k: v.to(device) for k, v in batch.items()}
            if not isinstance(model, CoMoEModel):
                batch.pop("task_ids")  # PEFT/plain models do not take it
            loss, _ = causal_lm_loss(model, batch, accepts_logits_to_keep(model), reduction="sum")
            total, tokens = total + loss.item(), tokens + label_tokens(batch["labels"])
        return total / max(tokens, 1)


def validation_history(rows: list[dict]) -> list[dict[str, float]]:
    """The validations of a run's ``train_log.jsonl`` rows: ``[{step, val_loss, val_accuracy}]``."""
    return [{"step": row["step"], **{k: row[k] for k in VAL_KEYS}} for row in rows if VAL_KEYS[0] in row]
