"""One interface over the adapters a run can train: CoMoE variants (ours) and plain LoRA (through PEFT)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from comoe.config import CONFIG_NAME, CoMoEConfig
from comoe.layer import layer_features
from comoe.model import CoMoEModel, find_targets, get_comoe_model
from comoe.runconfig import RunConfig


def comoe_parameter_count(base: nn.Module, config: CoMoEConfig) -> int:
    """Trainable parameters CoMoE would add: per module E·r·(d_in + d_out) experts + E·d_in router."""
    total = 0
    for name in find_targets(base, config):
        d_in, d_out = layer_features(base.get_submodule(name))
        total += config.num_experts * config.r * (d_in + d_out) + config.num_experts * d_in
    return total


def matched_lora_rank(base: nn.Module, config: CoMoEConfig) -> int:
    """The LoRA rank whose parameter count is closest to the CoMoE adapter's (the paper's r = 80 idea)."""
    per_rank = sum(sum(layer_features(base.get_submodule(n))) for n in find_targets(base, config))
    return max(1, round(comoe_parameter_count(base, config) / per_rank))


def build_adapted_model(base: nn.Module, run: RunConfig) -> nn.Module:
    """Wrap ``base`` with the adapter of ``run.method``; the base is frozen."""
    comoe_config = run.comoe_config()
    if run.method != "lora":
        return get_comoe_model(base, comoe_config)
    rank = run.lora_r or matched_lora_rank(base, comoe_config)
    lora = LoraConfig(
        r=rank, lora_alpha=run.lora_alpha * rank / run.r, lora_dropout=run.lora_dropout,
        target_modules=find_targets(base, comoe_config),  # the modules CoMoE would adapt, layers applied
    )
    return get_peft_model(base, lora)


def save_adapter(model: nn.Module, directory: str | Path) -> None:
    """Save the adapter atomically: a temp directory renamed into place."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Load saved adapter tensors into an already-wrapped model of the same kind."""
    if isinstance(model, CoMoEModel):
        model.load_adapter_weights(directory)
        return
    weights = load_file(os.path.join(directory, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ValueError(f"{directory}: unexpected LoRA tensors {result.unexpected_keys[:5]}")


def load_adapted_model(base: nn.Module, directory: str | Path) -> nn.Module:
    """Wrap ``base`` with whichever adapter (CoMoE or PEFT LoRA) ``directory`` holds, for evaluation."""
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not an adapter directory")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); the adapter directory is damaged: "
                         "re-save the adapter or restore the file") from None
    peft_type = data.get("peft_type") if isinstance(data, dict) else None
    if peft_type == "COMOE":
        return CoMoEModel.from_pretrained(base, directory)
    model = PeftModel.from_pretrained(base, str(directory))
    model.eval()
    return model


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
