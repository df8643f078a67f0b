"""Train a CoMoE adapter with transformers.Trainer through PEFT, then load it back with PEFT.

    .venv/bin/python examples/trainer.py [--model smollm2-135m] [--max-steps 30] [--output-dir runs/trainer-example]

`get_peft_model` builds the CoMoE model from a `CoMoEConfig` (importing comoe registers the method with
PEFT); Trainer optimises `outputs.loss`, which includes λ·L_con; `save_model` writes a PEFT adapter
directory that `PeftModel.from_pretrained` loads in any process that has imported comoe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import comoe  # noqa: F401  (registers CoMoE with PEFT)
from comoe import CoMoEConfig
from comoe.training.base_models import load_base_model

DATA = Path(__file__).parent / "data" / "capitals.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="comoe's offline alias, a model directory or a hub id"
    )
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--output-dir", default="runs/trainer-example")
    args = parser.parse_args()

    base, tokenizer = load_base_model(args.model)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    texts = [f"{row['prompt']} {row['target']}{tokenizer.eos_token}" for row in rows]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=64),
        batched=True,
        remove_columns=["text"],
    )

    model = get_peft_model(base, CoMoEConfig(task_type="CAUSAL_LM", contrastive_weight=0.01))
    model.print_trainable_parameters()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
        ),
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    trainer.save_model(args.output_dir)

    reloaded = PeftModel.from_pretrained(load_base_model(args.model)[0], args.output_dir)
    batch = tokenizer(texts[:2], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        same = torch.equal(reloaded(**batch).logits, model(**batch).logits)
    print(f"saved {args.output_dir}; PeftModel.from_pretrained reproduces the logits exactly: {same}")


if __name__ == "__main__":
    main()
