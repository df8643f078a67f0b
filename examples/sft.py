"""Train a CoMoE adapter with TRL's SFTTrainer (comoe's subclass, which keeps λ·L_con in the loss).

    pip install 'comoe[trl]'
    .venv/bin/python examples/sft.py [--model smollm2-135m] [--max-steps 30] [--output-dir runs/sft-example]

Plain `trl.SFTTrainer` computes its loss from a fused LM head and would drop the contrastive term;
`comoe.sft.CoMoESFTTrainer` adds it back. The saved directory is a CoMoE adapter in PEFT's layout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig

from comoe import CoMoEConfig, CoMoEModel
from comoe.sft import CoMoESFTTrainer
from comoe.training.base_models import load_base_model

DATA = Path(__file__).parent / "data" / "capitals.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="comoe's offline alias, a model directory or a hub id"
    )
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--output-dir", default="runs/sft-example")
    args = parser.parse_args()

    base, tokenizer = load_base_model(args.model)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    dataset = Dataset.from_dict(
        {"prompt": [row["prompt"] for row in rows], "completion": [" " + row["target"] for row in rows]}
    )
    trainer = CoMoESFTTrainer(
        model=base,
        processing_class=tokenizer,
        args=SFTConfig(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            max_length=64,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        ),
        train_dataset=dataset,
        peft_config=CoMoEConfig(contrastive_weight=0.01),
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    reloaded = CoMoEModel.from_pretrained(load_base_model(args.model)[0], args.output_dir)
    print(
        f"saved {args.output_dir}: {len(reloaded.adapted_modules)} CoMoE layers, "
        f"last training contrastive loss {trainer.model.base_model.training_aux.contrastive.item():.3f}"
    )


if __name__ == "__main__":
    main()
