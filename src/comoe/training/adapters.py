"""One interface over the adapters a run can train: CoMoE variants (ours) and plain LoRA (through PEFT)."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from comoe.config import DAMAGED, WEIGHTS_NAME, CoMoEConfig, read_adapter_config
from comoe.frozen import layer_features
from comoe.loading import PEFT_PREFIX, check_finite, fit_adapter_tensors
from comoe.model import AdapterLoadError, CoMoEModel, find_targets, get_comoe_model
from comoe.placement import adapter_parameter_count
from comoe.training.methods import method_of
from comoe.training.run_config import RunConfig
from comoe.utils.files import atomic_dir
from comoe.utils.modeling import replace_module


def matched_lora_rank(base: nn.Module, config: CoMoEConfig) -> int:
    """The LoRA rank whose parameter count is closest to the CoMoE adapter's (the paper's r = 80 idea)."""
    per_rank = sum(sum(layer_features(base.get_submodule(n))) for n in find_targets(base, config))
    return max(1, round(adapter_parameter_count(base, config) / per_rank))


def build_adapted_model(base: nn.Module, run: RunConfig) -> nn.Module:
    """Wrap ``base`` with the adapter of ``run.method`` (see `comoe.training.methods`); the base is frozen."""
    if not method_of(run.method).plain_lora:
        return get_comoe_model(base, run.trained_adapter)
    rank = run.lora_r or matched_lora_rank(base, run.adapter)
    lora = LoraConfig(
        r=rank,
        lora_alpha=run.adapter.lora_alpha * rank / run.adapter.r,
        lora_dropout=run.adapter.lora_dropout,
        target_modules=find_targets(base, run.adapter),  # the modules CoMoE would adapt, layers applied
        use_dora=run.adapter.use_dora,  # --method lora --use-dora: PEFT's DoRA baseline
    )
    return get_peft_model(base, lora)


def save_adapter(
    model: nn.Module, directory: str | Path, state_dict: dict[str, Tensor] | None = None
) -> None:
    """Save the adapter atomically: a temp directory renamed into place. ``state_dict``: the whole trainable
    tensors by parameter name (a sharded model's, gathered), in place of the live parameters."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)


def whole_adapter(model: nn.Module, directory: str | Path) -> dict[str, Tensor]:
    """The adapter saved in ``directory``, keyed by ``model``'s parameter names and checked against their
    (whole) shapes: what a sharded model loads (each process keeps its shard)."""
    path = Path(directory) / WEIGHTS_NAME
    if isinstance(model, CoMoEModel):
        tensors = model.adapter_state_dict().items()  # ZeRO-3 keeps a partitioned tensor's shape as ds_shape
        expected = {name: getattr(param, "ds_shape", param.shape) for name, param in tensors}
        return {
            PEFT_PREFIX + k: v for k, v in fit_adapter_tensors(load_file(path), expected, str(path)).items()
        }
    saved, adapter = load_file(path), f".{model.active_adapter}"  # PEFT's file drops the adapter's name
    return {n: saved[n.replace(adapter, "")] for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Load saved adapter tensors into an already-wrapped model of the same kind."""
    if isinstance(model, CoMoEModel):
        model.load_adapter_weights(directory)
        return
    path = Path(directory) / WEIGHTS_NAME
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as err:
        raise AdapterLoadError(
            f"{path}: not a readable safetensors file ({err}); nothing was loaded"
        ) from err
    check_finite(weights, str(path))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ValueError(f"{directory}: unexpected LoRA tensors {result.unexpected_keys[:5]}")


def load_adapted_model(base: nn.Module, directory: str | Path) -> nn.Module:
    """Wrap ``base`` with whichever adapter (CoMoE or PEFT LoRA) ``directory`` holds, for evaluation.

    A damaged directory is a FileNotFoundError (no config or weights) or a ValueError naming the file
    (:class:`~comoe.model.AdapterLoadError` when the weights cannot be loaded).
    """
    directory = Path(directory)
    peft_type = read_adapter_config(directory)["peft_type"]
    if peft_type == "COMOE":
        return CoMoEModel.from_pretrained(base, directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file() and not (directory / "adapter_model.bin").is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}: {DAMAGED}")
    if weights.is_file():  # readable and finite, before PEFT changes the base model
        try:
            with safe_open(weights, framework="pt"):
                pass
            tensors = load_file(weights)
        except (SafetensorError, OSError) as err:
            raise AdapterLoadError(
                f"{weights}: not a readable safetensors file ({err}); nothing was loaded"
            ) from err
        check_finite(tensors, str(weights))
    attributes, requires_grad = (
        set(vars(base)),
        {name: p.requires_grad for name, p in base.named_parameters()},
    )
    try:
        model = PeftModel.from_pretrained(base, str(directory))
    except (
        Exception
    ) as err:  # PEFT raises many kinds (KeyError, TypeError, RuntimeError, SafetensorError, ...)
        _undo_peft_wrap(base, attributes, requires_grad)
        raise AdapterLoadError(
            f"{directory}: PEFT could not load this {peft_type} adapter "
            f"({type(err).__name__}: {err}); {DAMAGED}, or load it onto the base model "
            "it was trained on"
        ) from err
    model.eval()
    return model


def _undo_peft_wrap(base: nn.Module, attributes: set[str], requires_grad: dict[str, bool]) -> None:
    """Undo what a failed ``PeftModel.from_pretrained`` did to ``base``: wrapped modules, new attributes
    (``peft_config``), trainable flags."""
    for name in set(vars(base)) - attributes:
        delattr(base, name)
    for name, module in list(base.named_modules()):
        if isinstance(module, BaseTunerLayer):
            replace_module(base, name, module.get_base_layer())
    for name, param in base.named_parameters():
        param.requires_grad_(requires_grad.get(name, param.requires_grad))


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters: PEFT's count for a PEFT model (it counts quantised weights as the
    parameters they stand for), else the tensors' sizes."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
