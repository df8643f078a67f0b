"""A training checkpoint of DoRA experts as comoe 0.1 wrote it, and the adapter 0.1 reached two steps
later, so that later versions are held to resuming it (comoe 0.1 named and ordered the adapter tensors
otherwise: ``comoe.compat``).

``python tests/checkpoint_fixture.py`` writes ``tests/fixtures/checkpoint-0.1/`` (``step-000002/`` and
``after-step-4.safetensors``); it was run once by comoe 0.1's code. The same steps run under any version.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests` importable when run as a script

from tests.tiny_models import batch, build, randomize_adapters, tiny_comoe_config  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-0.1"
CHECKPOINT = FIXTURE / "step-000002"
AFTER = FIXTURE / "after-step-4.safetensors"


def model_and_optimizer():
    """Routed DoRA experts with the contrastive term (the layout whose tensor order changed), and AdamW."""
    from comoe import get_comoe_model

    model = get_comoe_model(build("llama", num_layers=2), tiny_comoe_config("llama", use_dora=True))
    randomize_adapters(model, seed=7)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def train_step(model, optimizer, step: int) -> None:
    inputs = batch("llama", seed=step, batch_size=2, seq_len=12, pad=3)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def main() -> None:
    from safetensors.torch import save_file

    from comoe.training.checkpoint import save_checkpoint

    model, optimizer = model_and_optimizer()
    for step in range(2):
        train_step(model, optimizer, step)
    save_checkpoint(FIXTURE, 2, model, optimizer, None, {"elapsed_s": 0.0})
    for step in range(2, 4):
        train_step(model, optimizer, step)
    tensors = {name: p.detach().contiguous() for name, p in model.adapter_state_dict().items()}
    save_file(tensors, str(AFTER))


if __name__ == "__main__":
    main()
