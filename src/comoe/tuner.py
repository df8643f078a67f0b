"""CoMoE as a PEFT method: ``CoMoETuner`` puts CoMoE layers into a model and adds the auxiliary losses.

Importing this module registers the method with PEFT (``peft_type`` "COMOE", prefix ``comoe_``), so that
``peft.get_peft_model(model, CoMoEConfig(...))`` and ``peft.PeftModel.from_pretrained(base, adapter_dir)``
build it, as they build LoRA. ``comoe.get_comoe_model`` goes through the same tuner.

The auxiliary losses are added by forward hooks on the wrapped transformers model, not by a forward of the
tuner: PEFT's plain ``PeftModel`` calls that model directly, its task classes call the tuner, ``generate``
neither; hooks see every path. The pre-hook prepares the layers' shared context from the batch (padding
mask, optional ``task_ids``); the post-hook forms the losses from the traces the layers left
(``comoe.auxiliary``), adds them to a training ``loss`` and sets the output fields ``aux_loss``,
``contrastive_loss`` and ``balance_loss``, as transformers' MoE models return theirs (mapping fields, which
wrappers that rebuild the output keep: mixed precision, DDP, ``torch.compile``).

One adapter per model (its parameters are not keyed by adapter name): a second one, ``delete_adapter`` and
merging are refused with the reason.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import register_peft_method
from torch import Tensor, nn

from comoe.auxiliary import AuxLosses, combined_aux, losses_from_traces, token_share
from comoe.compat import DeprecatedAuxLosses
from comoe.config import CoMoEConfig
from comoe.loading import ADAPTER_PREFIX, AdapterLoadError, fit_adapter_tensors
from comoe.mixture import MERGE_REFUSED, ONE_ADAPTER, MixtureLayer
from comoe.outputs import with_aux_fields
from comoe.placement import AdapterTargets, build_layer
from comoe.records import RoutingRecorder
from comoe.trace import ForwardContext
from comoe.utils.deprecation import moved_names
from comoe.utils.modeling import named_arguments, replace_module, token_shape


class AdapterConfigs(dict):
    """The tuner's ``peft_config`` (adapter name → ``CoMoEConfig``): it refuses another method's config.

    ``peft.get_peft_model(comoe_model, LoraConfig(...))`` builds a second tuner on top, whose ``BaseTuner``
    adds its config to the ``peft_config`` of the model it wraps, this dict: the CoMoE hooks would read a
    ``LoraConfig`` at the next forward. Refusing it stops PEFT before it changes any module."""

    def __setitem__(self, name: str, config: object) -> None:
        if not isinstance(config, CoMoEConfig):
            method = getattr(getattr(config, "peft_type", None), "value", None) or type(config).__name__
            raise ValueError(
                f"this model holds a CoMoE adapter; PEFT cannot add a {method} adapter ({type(config).__name__}) "
                f"on top of it ({ONE_ADAPTER}, and the other method would wrap CoMoE's layers). Apply "
                f"{type(config).__name__} to the original base model instead, or take the base back from the "
                "CoMoE model with unload() first"
            )
        super().__setitem__(name, config)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for name, config in dict(*args, **kwargs).items():
            self[name] = config


def refuse_stacking(model: nn.Module) -> None:
    """A clear error for a model that already carries adapters (comoe's or another PEFT method's)."""
    if any(isinstance(m, MixtureLayer) for m in model.modules()):
        raise ValueError("this model already holds CoMoE layers; wrap the original base model instead")
    other = next((m for m in model.modules() if isinstance(m, (BaseTunerLayer, PeftModel))), None)
    if other is not None:
        raise ValueError(
            f"this model already carries PEFT adapters ({type(other).__name__}); comoe cannot train on top of them "
            "(it would freeze their weights). Merge them into the base first, e.g. "
            "model = peft_model.merge_and_unload(), and wrap the merged model, or wrap the original base model"
        )


class CoMoETuner(BaseTuner):
    """PEFT's tuner for CoMoE (``PeftModel.base_model`` of a CoMoE adapter). Holds the layers' shared
    forward context, the last forward's ``AuxLosses`` and the adapted layers by module name."""

    prefix = ADAPTER_PREFIX
    tuner_layer_cls = MixtureLayer
    target_module_mapping: dict[str, list[str]] = {}  # CoMoEConfig always names its targets

    # --- injection -----------------------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: CoMoEConfig, adapter_name: str) -> None:
        if not isinstance(config, CoMoEConfig):
            raise TypeError(f"CoMoETuner needs a CoMoEConfig, got {type(config).__name__}")
        refuse_stacking(model)
        self._requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
        # PEFT copies this dict onto the wrapped model (model.peft_config), where another method's tuner
        # finds it and adds its config: the dict refuses that before any module changes.
        self.peft_config = AdapterConfigs(self.peft_config)
        self.context = ForwardContext()
        self.last_aux: AuxLosses | None = None
        self.training_aux: AuxLosses | None = None
        self.adapted_modules: dict[str, MixtureLayer] = {}
        # comoe's matching ('all-linear', layer groups, MLP blocks), resolved before any module changes: a
        # refused config leaves the model as it was given.
        self._targets = AdapterTargets(model, config)

    def _check_new_adapter_config(self, config: CoMoEConfig) -> None:
        if len(self.peft_config) > 1:
            first = next(iter(self.peft_config))
            raise ValueError(
                f"{ONE_ADAPTER}: this model already has the adapter {first!r}. Load another adapter onto its own "
                "copy of the base model, or unload() this one first"
            )

    def _prepare_adapter_config(self, peft_config: CoMoEConfig, model_config: dict) -> CoMoEConfig:
        # PEFT rewrites target_modules of the config it gets back (e.g. 'all-linear' to its own meaning);
        # a copy keeps the saved config as the user wrote it. Matching uses self._targets.
        return copy.copy(peft_config)

    def _check_target_module_exists(self, peft_config: CoMoEConfig, key: str) -> bool:
        return key in self._targets.names

    def _create_and_replace(
        self,
        peft_config: CoMoEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **_: Any,
    ) -> None:
        config = self.peft_config[adapter_name]  # the user's object, not PEFT's working copy
        layer = build_layer(target, current_key, config, self._targets, self.context, adapter_name)
        setattr(parent, target_name, layer)
        self.adapted_modules[current_key] = layer

    def _post_injection_hook(self, model: nn.Module, config: CoMoEConfig, adapter_name: str) -> None:
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        if config.base_model_name_or_path is None and name_or_path:
            config.base_model_name_or_path = name_or_path
        if config.task_type is None and config.auto_mapping is None:
            # as PEFT saves a config without task_type: AutoPeftModelForCausalLM rebuilds the base from it
            base = type(model)
            config.auto_mapping = {"base_model_class": base.__name__, "parent_library": base.__module__}
        self._hook_handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
            model.register_forward_hook(self._after_aux),  # after _after_forward: sees its fields
        ]
        self._aux_use: dict[str, bool] | None = None
        self._aux_unused_warned = False

    @property
    def routed_modules(self) -> dict[str, MixtureLayer]:
        """The adapted modules that route tokens among experts (not the plain LoRA of placement='ffn')."""
        return {name: layer for name, layer in self.adapted_modules.items() if layer.routed}

    # --- forward hooks: the auxiliary losses ------------------------------------------------------------
    @property
    def comoe_config(self) -> CoMoEConfig:
        return self.peft_config[self.active_adapters[0]]

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Prepare the layers' context for this forward; ``task_ids`` (batch,) is taken out of the inputs."""
        task_ids = kwargs.pop("task_ids", None)
        named = named_arguments(module, args, kwargs)
        input_ids, mask = named.get("input_ids"), named.get("attention_mask")
        cfg, ctx = self.comoe_config, self.context
        ctx.token_mask = mask.reshape(-1).bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None
        if task_ids is not None:
            shape = token_shape(mask, input_ids)
            if shape is not None:  # (batch, seq): every token of a sequence gets its sequence's task id
                ctx.task_ids = task_ids.reshape(-1, 1).expand(shape).reshape(-1)
        recording = ctx.recorder is not None and getattr(ctx.recorder, "contrastive", False)
        # a training forward without autograd (generation in training mode, a no_grad reference) trains nothing
        training = module.training and torch.is_grad_enabled()
        ctx.compute_contrastive = (training and cfg.contrastive_weight > 0) or recording
        ctx.compute_balance = training and cfg.balance_weight > 0
        ctx.aux, ctx.traces, ctx.active = [], [], True
        return args, kwargs

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        """Compute the auxiliary losses and add them to the output (also runs, to reset, when forward raised).

        When Trainer passes ``num_items_in_batch`` (the labelled tokens of a whole accumulated, possibly
        multi-process batch), the task loss is a sum over that many tokens and Trainer no longer divides
        by the accumulation steps; ``aux_loss`` is then added in proportion to this micro-batch's share of
        those tokens, so that λ weighs the same with or without gradient accumulation.
        """
        ctx = self.context
        try:
            if outputs is None:  # the forward raised
                return None
            # after the base forward: checkpointed layers never re-run the loss computation
            ctx.traces = ctx.traces + self._pending_traces()
            ctx.aux = losses_from_traces(ctx, module.training)
            self.last_aux = combined_aux(ctx.aux, self.comoe_config)
            if module.training and torch.is_grad_enabled():  # what a trainer that ignores outputs.loss adds
                self.training_aux = self.last_aux  # (comoe.sft)
            # Only a training loss carries the aux terms: recording in eval mode must not change out.loss.
            if module.training and self.last_aux is not None and getattr(outputs, "loss", None) is not None:
                share = token_share(kwargs.get("labels"), kwargs.get("num_items_in_batch"))
                outputs["loss"] = outputs.loss + self.last_aux.total * share
            if self.last_aux is not None and isinstance(outputs, dict):  # ModelOutput; a tuple has no room
                outputs = with_aux_fields(outputs, self.last_aux.output_fields())
            return outputs
        finally:
            ctx.token_mask = ctx.task_ids = None
            ctx.compute_contrastive = ctx.compute_balance = ctx.active = False
            ctx.traces = []
            self._pending_traces()  # what a forward that raised left

    def _pending_traces(self) -> list:
        """The traces compiled layers kept (``MixtureLayer.pending_traces``), in module order; cleared."""
        traces = []
        for layer in self.adapted_modules.values():
            traces += layer.pending_traces
            layer.pending_traces = []
        return traces

    def _after_aux(self, module: nn.Module, args: tuple, outputs: Any) -> None:
        """What follows the auxiliary losses: the deprecated ``outputs.aux_losses``, the check that a
        training loss uses them."""
        if torch.compiler.is_compiling():
            return
        if self.last_aux is not None and isinstance(outputs, dict):
            outputs.__dict__["aux_losses"] = DeprecatedAuxLosses(self.last_aux)  # an attribute, not a field
        self._watch_aux_use(module, outputs)

    def _watch_aux_use(self, module: nn.Module, outputs: Any) -> None:
        """Warn once when a training step's loss left out the auxiliary loss.

        A trainer that optimises its own loss instead of ``outputs.loss`` (TRL's ``SFTTrainer``, a custom
        loop) trains as if λ were 0, silently. The signal is autograd's: gradient hooks note whether the
        backward of a training forward reached its outputs and whether it reached ``aux_loss``; the next
        training forward reads the notes, so the warning comes one step after the first such step.
        """
        used = self._aux_use
        if self._aux_unused_warned or not (module.training and torch.is_grad_enabled()):
            return
        if used is not None and used["outputs"] and not used["aux"]:
            self._aux_unused_warned = True
            cfg = self.comoe_config
            warnings.warn(
                f"comoe: a training step's backward reached the model's outputs but not its auxiliary loss "
                f"(contrastive_weight={cfg.contrastive_weight}, balance_weight={cfg.balance_weight}): the loss "
                "being optimised leaves it out, so training runs as with both weights 0. comoe adds it to "
                "outputs.loss, which transformers.Trainer optimises; TRL's trainers compute their own loss: use "
                "comoe.sft.CoMoESFTTrainer, comoe.alignment's DPO/GRPO trainers or comoe.with_aux_loss(Trainer"
                "Class). A custom loop adds model.get_aux_loss() (or outputs.aux_loss) to "
                "its loss",
                UserWarning,
                stacklevel=2,
            )
            return
        self._aux_use = None
        aux, cfg = self.last_aux, self.comoe_config
        if aux is None or not aux.total.requires_grad or not isinstance(outputs, dict):
            return
        if cfg.contrastive_weight == 0 and cfg.balance_weight == 0:  # computed for routing records only
            return
        tensors = [
            value
            for key, value in outputs.items()
            if key not in aux.output_fields() and isinstance(value, Tensor) and value.requires_grad
        ]
        if not tensors:
            return
        notes = {"outputs": False, "aux": False}

        def noting(key: str):
            def hook(grad: Tensor) -> None:
                notes[key] = True

            return hook

        for tensor in tensors:
            tensor.register_hook(noting("outputs"))
        aux.total.register_hook(noting("aux"))
        self._aux_use = notes

    def get_aux_loss(self) -> Tensor:
        """Weighted auxiliary loss of the last forward, for custom training loops (add it to your loss)."""
        if self.last_aux is None:
            return torch.zeros(())
        return self.last_aux.total

    @contextmanager
    def recording(self, recorder: RoutingRecorder | None = None) -> Iterator[RoutingRecorder]:
        """Record routing statistics for every forward inside this block."""
        recorder = recorder or RoutingRecorder()
        self.context.recorder = recorder
        try:
            yield recorder
        finally:
            self.context.recorder = None

    # --- parameters ------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Every adapter tensor (routers and experts), keyed by its name inside the wrapped model."""
        return {n: p for n, p in self.model.named_parameters() if ADAPTER_PREFIX in n.rsplit(".", 1)[-1]}

    def set_trainable(self, trainable: bool = True) -> None:
        for param in self.adapter_state_dict().values():
            param.requires_grad_(trainable)

    # --- what PEFT offers that a routed mixture cannot do ------------------------------------------------
    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_REFUSED)

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError(f"{ONE_ADAPTER}; to remove it, use unload(), which returns the base model")

    def unload(self) -> nn.Module:
        """The base model without CoMoE layers or hooks (the adapter is dropped, never merged)."""
        for handle in getattr(self, "_hook_handles", []):
            handle.remove()
        self._hook_handles = []
        # each adapted module back to the module it wraps (PEFT's own unload assumes a wrapped linear's
        # attributes, which an MLP block wrapped by FFN experts does not have)
        for name, layer in self.adapted_modules.items():
            replace_module(self.model, name, layer.base_layer)
        self.adapted_modules = {}
        if self.model.__dict__.get("peft_config") is self.peft_config:  # PEFT put it there on injection
            del self.model.peft_config
        return self.model

    def restore_base(self) -> nn.Module:
        """``unload()``, and every base parameter's ``requires_grad`` as it was before the wrap: the model
        as it was given, after a refused load."""
        model = self.unload()
        before = getattr(self, "_requires_grad_before", {})
        for name, param in model.named_parameters():
            param.requires_grad_(before.get(name, param.requires_grad))
        return model

    # --- PEFT's save/load key mapping --------------------------------------------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # the parameters carry no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: CoMoEConfig, adapter_name: str, state_dict: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Checkpoint keys → model keys, after every check (``comoe.loading.fit_adapter_tensors``: the
        load path of both ``PeftModel.from_pretrained`` and ``CoMoEModel``'s loaders)."""
        expected = {
            k: v.shape for k, v in model.state_dict().items() if ADAPTER_PREFIX in k.rsplit(".", 1)[-1]
        }
        try:
            return fit_adapter_tensors(state_dict, expected, "the adapter checkpoint")
        except AdapterLoadError:
            tuner = getattr(model, "base_model", None)
            if isinstance(tuner, cls) and _called_from(PeftModel.from_pretrained):
                tuner.restore_base()  # PEFT wrapped the caller's model for this load alone: give it back
            raise


def _called_from(function: Any) -> bool:
    """Whether ``function`` (a method, classmethods included) is on the call stack."""
    code = getattr(function, "__func__", function).__code__
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def register() -> None:
    """Register CoMoE with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from comoe.peft_type import COMOE

    if PEFT_TYPE_TO_TUNER_MAPPING.get(COMOE) is None:
        register_peft_method(
            name="comoe", config_cls=CoMoEConfig, model_cls=CoMoETuner, prefix=ADAPTER_PREFIX
        )


register()


# names this module held in comoe 0.1 (comoe.utils.deprecation)
__getattr__ = moved_names(
    __name__,
    {
        "AdapterLoadError": "comoe.loading:AdapterLoadError",
        "ADAPTER_PREFIX": "comoe.loading:ADAPTER_PREFIX",
        "PEFT_PREFIX": "comoe.loading:PEFT_PREFIX",
        "check_adapter_tensors": "comoe.loading:check_adapter_tensors",
        "check_finite": "comoe.loading:check_finite",
        "AuxLosses": "comoe.auxiliary:AuxLosses",
        "token_share": "comoe.auxiliary:token_share",
    },
)
