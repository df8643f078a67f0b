"""``CoMoEModel``: the ``peft.PeftModel`` of a CoMoE adapter, with comoe's own conveniences.

``get_comoe_model(model, config)`` freezes ``model`` and replaces each targeted ``nn.Linear`` /
``Conv1D`` by a ``CoMoELayer`` holding it as ``base_layer`` (with placement='ffn', each MLP block by a
``CoMoEFFNLayer``) (through PEFT's injection and
``comoe.tuner.CoMoETuner``). The result is a real ``PeftModel``: ``save_pretrained`` writes PEFT's layout,
``peft.PeftModel.from_pretrained(base, directory)`` loads it (after ``import comoe``), and
``transformers.Trainer`` treats it as any adapter model. On top of PEFT's API it offers
``recording`` (routing statistics), ``disable_adapters`` (PEFT's ``disable_adapter``), ``last_aux`` /
``get_aux_loss`` (the auxiliary losses of the last forward), ``adapted_modules`` and ``comoe_config``;
these live on the tuner, so a plain ``PeftModel`` of a CoMoE adapter reaches them too
(``peft_model.base_model.recording()``).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from comoe.auxiliary import AuxLosses
from comoe.config import CONFIG_NAME, README_NAME, WEIGHTS_NAME, CoMoEConfig, adapter_readme
from comoe.loading import ADAPTER_PREFIX, PEFT_PREFIX, AdapterLoadError, fit_adapter_tensors
from comoe.mixture import ONE_ADAPTER, MixtureLayer
from comoe.records import RoutingRecorder
from comoe.targets import adaptable_module_names, find_targets, layer_index, num_hidden_layers, resolve_layers
from comoe.tuner import CoMoETuner
from comoe.utils.files import write_text_atomic

__all__ = [
    "ADAPTER_PREFIX",
    "AdapterLoadError",
    "AuxLosses",
    "CoMoEModel",
    "adaptable_module_names",
    "find_targets",
    "get_comoe_model",
    "is_adapter_dir",
    "layer_index",
    "num_hidden_layers",
    "resolve_layers",
]


class CoMoEModel(PeftModel):
    """A ``PeftModel`` whose targeted linears are CoMoE layers; in training, ``outputs.loss`` includes the
    weighted auxiliary losses (see ``comoe.tuner``). ``task_ids`` (batch,) may be passed to forward for
    routing records."""

    base_model: CoMoETuner

    def __init__(self, model: nn.Module, config: CoMoEConfig, adapter_name: str = "default", **kwargs):
        if not isinstance(config, CoMoEConfig):
            raise TypeError(f"CoMoEModel needs a CoMoEConfig, got {type(config).__name__}")
        with warnings.catch_warnings():  # PEFT 0.21 reads an attribute that transformers 5 deprecates
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            super().__init__(model, config, adapter_name, **kwargs)

    @property
    def comoe_config(self) -> CoMoEConfig:
        return self.base_model.comoe_config

    @property
    def adapted_modules(self) -> dict[str, MixtureLayer]:
        """Every adapted module by name: CoMoE layers on linears, FFN-expert blocks, shared LoRA layers."""
        return self.base_model.adapted_modules

    @property
    def routed_modules(self) -> dict[str, MixtureLayer]:
        """The adapted modules that route tokens among experts."""
        return self.base_model.routed_modules

    @property
    def last_aux(self) -> AuxLosses | None:
        return self.base_model.last_aux

    @property
    def context(self):
        return self.base_model.context

    def get_aux_loss(self) -> Tensor:
        """Weighted auxiliary loss of the last forward, for custom training loops (add it to your loss)."""
        return self.base_model.get_aux_loss()

    @contextmanager
    def recording(self, recorder: RoutingRecorder | None = None) -> Iterator[RoutingRecorder]:
        """Record routing statistics for every forward inside this block."""
        with self.base_model.recording(recorder) as active:
            yield active

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the plain base model inside this block (each layer's previous state is restored after)."""
        previous = {name: layer.disabled for name, layer in self.adapted_modules.items()}
        for layer in self.adapted_modules.values():
            layer.disabled = True
        try:
            yield
        finally:
            for name, layer in self.adapted_modules.items():
                layer.disabled = previous[name]

    disable_adapter = disable_adapters  # PEFT's name

    # --- parameters ----------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Every adapter tensor (routers and experts), keyed by its name inside the base model."""
        return self.base_model.adapter_state_dict()

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        return self.get_nb_trainable_parameters()

    def set_trainable(self, trainable: bool = True) -> None:
        self.base_model.set_trainable(trainable)

    # --- save / load ---------------------------------------------------------------------------------
    def save_pretrained(
        self,
        directory: str | os.PathLike,
        safe_serialization: bool = True,
        state_dict: dict[str, Tensor] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """PEFT's ``save_pretrained``, atomic: the tuner picks the adapter tensors (everything an adapted layer
        holds but its base layer) and PEFT writes ``adapter_config.json`` and ``adapter_model.safetensors``
        into a hidden directory inside ``directory``, whose files then replace the old ones one by one. A
        README.md that says how to load them is added unless the directory has one.

        ``state_dict`` (the full state dict of this model, possibly under a DDP or compile prefix, as Trainer
        passes it under FSDP/DeepSpeed) replaces the live parameters as the source of the adapter tensors;
        it must hold all of them. Adapters are written as safetensors only.
        """
        if not safe_serialization:
            raise ValueError(
                "comoe writes adapters as safetensors only; safe_serialization=False would pickle"
            )
        if not is_main_process:
            return
        if state_dict is not None:
            state_dict = _with_peft_keys(state_dict, list(self.adapter_state_dict()))
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".save-", suffix=".tmp") as tmp:
            super().save_pretrained(tmp, state_dict=state_dict, **kwargs)
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        readme = os.path.join(directory, README_NAME)
        if not os.path.exists(readme):  # how to load it, for whoever opens the directory (not a user's own)
            write_text_atomic(readme, adapter_readme(self.comoe_config))

    def load_adapter_weights(self, directory: str | os.PathLike) -> None:
        """Load saved adapter tensors (PEFT's layout, or comoe 0.1's); every check runs before any copy."""
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        try:
            loaded = load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise AdapterLoadError(
                f"{path}: not a readable safetensors file ({err}); nothing was loaded"
            ) from err
        expected = self.adapter_state_dict()
        loaded = fit_adapter_tensors(loaded, {name: p.shape for name, p in expected.items()}, path)
        with torch.no_grad():
            for name, param in expected.items():
                param.copy_(loaded[name])

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str | None = None,
        is_trainable: bool = False,
        **_: object,
    ) -> None:
        """Load the weights of a saved adapter of the same configuration into this model (Trainer's resume
        path). A second adapter is refused: comoe holds one per model."""
        mine = self.active_adapters[0]
        if adapter_name not in (None, mine):
            raise ValueError(
                f"{ONE_ADAPTER}, named {mine!r}; got adapter_name={adapter_name!r}. Load another "
                "adapter onto its own copy of the base model"
            )
        saved = CoMoEConfig.from_pretrained(model_id)
        mine_cfg, theirs = self.comoe_config.method_dict(), saved.method_dict()
        differ = sorted(k for k in mine_cfg if mine_cfg[k] != theirs.get(k))
        if differ:
            raise AdapterLoadError(
                f"{model_id}: the saved adapter's configuration differs from this model's in {differ}; "
                "load it onto a fresh base with CoMoEModel.from_pretrained(base, directory) instead"
            )
        self.load_adapter_weights(model_id)
        self.set_trainable(is_trainable)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: CoMoEConfig | None = None,
        **_: object,
    ) -> CoMoEModel:
        """Wrap ``model`` with the adapter saved in ``model_id`` (a local directory): eval mode, frozen unless
        ``is_trainable``. On any error the caller's ``model`` is left as it was given."""
        config = copy.copy(config) if config is not None else CoMoEConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable  # on a copy: the caller's config is left as given
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        attributes = set(vars(model))
        wrapped = cls(model, config, adapter_name)
        try:
            wrapped.load_adapter_weights(model_id)
        except BaseException:
            wrapped.base_model.unload()
            for name in set(vars(model)) - attributes:  # what PEFT set on it (peft_config)
                delattr(model, name)
            for name, param in model.named_parameters():
                param.requires_grad_(requires_grad.get(name, param.requires_grad))
            raise
        wrapped.set_trainable(is_trainable)
        if not is_trainable:
            wrapped.eval()
        return wrapped


def _with_peft_keys(state_dict: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """A full state dict keyed as PeftModel keys it, whatever wrapper prefixed its keys (DDP, torch.compile);
    an error unless it holds every adapter tensor (``names``, keyed inside the base model)."""
    by_name = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod.", PEFT_PREFIX):
            key = key.removeprefix(prefix)
        by_name[key] = value
    missing = [name for name in names if name not in by_name]
    if missing:
        raise AdapterLoadError(
            f"the state_dict given to save_pretrained lacks {len(missing)} adapter tensors "
            f"(e.g. {missing[0]}); nothing was written"
        )
    return {PEFT_PREFIX + key: value for key, value in by_name.items()}


def get_comoe_model(model: nn.Module, config: CoMoEConfig) -> CoMoEModel:
    """Freeze ``model`` and add trainable CoMoE experts and routers to the modules ``config`` targets."""
    return CoMoEModel(model, config)


def is_adapter_dir(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_NAME)) and os.path.isfile(
        os.path.join(directory, WEIGHTS_NAME)
    )
