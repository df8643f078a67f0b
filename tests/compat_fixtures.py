"""Adapters of every kind as comoe 0.1 saved them, with their logits, so that later versions are held to
loading them with identical outputs (``tests/test_compat.py``).

``python tests/compat_fixtures.py`` writes ``tests/fixtures/adapters-0.1/<kind>/`` (adapter_config.json,
adapter_model.safetensors, logits.safetensors); it was run once by comoe 0.1's code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests` importable when run as a script

from tests.tiny_models import batch, build, randomize_adapters, tiny_comoe_config  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "adapters-0.1"

KINDS: dict[str, dict] = {
    "lora-experts": dict(),
    "dora-experts": dict(use_dora=True),
    "ffn-experts": dict(
        placement="ffn", target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    ),
    "single-expert": dict(num_experts=1, top_k=1, contrastive_weight=0.0),
    "soft": dict(routing="soft", top_k=4, contrastive_weight=0.0),
}


def inputs() -> dict:
    return batch("llama", seed=5, batch_size=2, seq_len=10, pad=2)


def main() -> None:
    from safetensors.torch import save_file

    from comoe import get_comoe_model

    for kind, overrides in KINDS.items():
        model = get_comoe_model(build("llama"), tiny_comoe_config("llama", **overrides))
        randomize_adapters(model, seed=17)
        with torch.no_grad():  # every adapter tensor away from its init (A random already; magnitudes too)
            for name, param in model.named_parameters():
                if name.endswith("comoe_magnitude"):
                    param.mul_(1.1)
        model.eval()
        directory = FIXTURES / kind
        model.save_pretrained(directory)
        with torch.no_grad():
            logits = model(**inputs()).logits
        save_file({"logits": logits.contiguous()}, str(directory / "logits.safetensors"))
        print(f"wrote {directory}")


if __name__ == "__main__":
    main()
