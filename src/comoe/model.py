"""Inject CoMoE layers into any PyTorch / Hugging Face model; collect auxiliary losses; save and load.

The shape follows PEFT: ``get_comoe_model`` wraps a model, freezes the base, and replaces each targeted
``nn.Linear`` / ``Conv1D`` by a ``CoMoELayer`` holding it as ``base_layer``. Every adapter tensor has
``comoe_`` in its name; that prefix drives both trainable marking and saving.

The auxiliary losses travel as fields of the model output (``aux_loss``, ``contrastive_loss``,
``balance_loss``), as transformers' own MoE models return theirs: wrappers that rebuild the output
(accelerate's mixed precision, DDP, ``torch.compile``) keep mapping fields, where an attribute would be
dropped. ``CoMoEModel`` presents the small part of ``peft.PeftModel``'s interface that
``transformers.Trainer`` relies on (``get_base_model``, ``active_adapters``, ``load_adapter``,
``save_pretrained(state_dict=...)``), so that Trainer with its default arguments keeps the model's input
columns, saves an adapter directory rather than the whole model, and resumes from its checkpoints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from comoe.config import CONFIG_NAME, WEIGHTS_NAME, CoMoEConfig
from comoe.layer import ADAPTABLE_TYPES, CoMoELayer, ForwardContext
from comoe.records import RoutingRecorder

ADAPTER_PREFIX = "comoe_"
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


class AdapterLoadError(ValueError):
    """An adapter file that cannot be loaded into this base model; nothing was changed."""


@dataclass
class AuxLosses:
    """The auxiliary losses of the last forward, averaged over adapted modules."""

    contrastive: Tensor | None
    balance: Tensor | None
    pos_cos: Tensor | None
    neg_cos: Tensor | None
    total: Tensor  # contrastive_weight · contrastive + balance_weight · balance

    def output_fields(self) -> dict[str, Tensor]:
        """The tensors a model output carries: ``aux_loss`` (weighted total) and the unweighted parts."""
        fields = {"aux_loss": self.total}
        if self.contrastive is not None:
            fields["contrastive_loss"] = self.contrastive
        if self.balance is not None:
            fields["balance_loss"] = self.balance
        return fields

    def as_floats(self) -> dict[str, float]:
        """Detached values for logging (this syncs with the device)."""
        out = {"aux_total": self.total.item()}
        for key in ("contrastive", "balance", "pos_cos", "neg_cos"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.item()
        return out


# --- finding targets ---------------------------------------------------------------------------
def layer_index(module_name: str) -> int | None:
    """Index of the repeated block a module sits in: the first integer component of its dotted name."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def num_hidden_layers(model: nn.Module, names: list[str]) -> int:
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def resolve_layers(spec: list[int] | str | None, n_layers: int) -> set[int] | None:
    """Layer indices selected by ``CoMoEConfig.layers``: None (all), a list, or a thirds group."""
    if spec is None:
        return None
    if isinstance(spec, str):
        bounds = [round(n_layers * i / 3) for i in range(4)]
        thirds = {name: set(range(bounds[i], bounds[i + 1])) for i, name in enumerate(("low", "middle", "high"))}
        return set().union(*(thirds[part] for part in spec.split("+")))
    bad = [i for i in spec if i >= n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {n_layers} layers (0..{n_layers - 1})")
    return set(spec)


def _matches(name: str, target: list[str] | str) -> bool:
    if isinstance(target, str):
        if target == "all-linear":
            return layer_index(name) is not None
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def adaptable_module_names(model: nn.Module) -> list[str]:
    """The distinct last components of every Linear/Conv1D in the model (what target_modules can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, ADAPTABLE_TYPES)})


def find_targets(model: nn.Module, config: CoMoEConfig) -> list[str]:
    """Names of the modules ``config`` adapts; a clear error when there are none."""
    candidates = [name for name, m in model.named_modules() if isinstance(m, ADAPTABLE_TYPES) and name]
    matched = [name for name in candidates if _matches(name, config.target_modules)]
    if not matched:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no nn.Linear/Conv1D module of "
            f"{type(model).__name__}. Its adaptable module names are: {', '.join(adaptable_module_names(model))}"
        )
    allowed = resolve_layers(config.layers, num_hidden_layers(model, matched))
    if allowed is None:
        return matched
    selected = [name for name in matched if layer_index(name) in allowed]
    if not selected:
        raise ValueError(f"layers={config.layers!r} selected none of the matched modules ({len(matched)} matched)")
    return selected


# --- the wrapper ---------------------------------------------------------------------------------
class CoMoEModel(PeftModel):
    """A model whose targeted linears are CoMoE layers. Attribute access falls through to the base model.

    It subclasses ``PeftModel`` only so that ``transformers.Trainer`` treats it as an adapter model (saving
    and resuming adapters, inspecting the base model's signature); ``PeftModel.__init__`` is not run and
    the members Trainer uses are defined here. Most of the rest of PEFT's API (multiple adapters,
    merging, ``get_model_status``) does not work on it: comoe is not yet a registered PEFT method.
    """

    def __init__(self, model: nn.Module, config: CoMoEConfig):
        nn.Module.__init__(self)
        if any(isinstance(m, CoMoELayer) for m in model.modules()):
            raise ValueError("this model already holds CoMoE layers; wrap the original base model instead")
        self.base_model = model
        self.comoe_config = config
        self.context = ForwardContext()
        self.last_aux: AuxLosses | None = None
        targets = find_targets(model, config)  # before anything changes: a refused wrap leaves the model as given
        for param in model.parameters():
            param.requires_grad_(False)
        self.adapted_modules: dict[str, CoMoELayer] = {}
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = CoMoELayer(getattr(parent, child), config, self.context, name)
            setattr(parent, child, layer)
            self.adapted_modules[name] = layer
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        if config.base_model_name_or_path is None and name_or_path:
            config.base_model_name_or_path = name_or_path

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # --- forward and the auxiliary losses ---------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, *, task_ids: Tensor | None = None, **kwargs):
        """Forward of the base model; in training, ``outputs.loss`` includes the weighted aux losses.

        The output also carries ``aux_loss`` (the weighted sum, λ·L_con + balance term, of this batch),
        ``contrastive_loss`` and ``balance_loss`` (unweighted) when they were computed. ``task_ids``
        (batch,) is optional and only used by routing records. ``labels`` is named so that Trainer finds
        the label column.

        When Trainer passes ``num_items_in_batch`` (the labelled tokens of a whole accumulated, possibly
        multi-process batch), the task loss is a sum over that many tokens and Trainer no longer divides
        by the accumulation steps; ``aux_loss`` is then added in proportion to this micro-batch's share of
        those tokens, so that λ weighs the same with or without gradient accumulation.
        """
        for key, value in (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels)):
            if value is not None:
                kwargs[key] = value
        cfg, ctx = self.comoe_config, self.context
        mask = attention_mask
        ctx.token_mask = mask.reshape(-1).bool() if mask is not None and mask.dim() == 2 else None
        if task_ids is not None:
            shape = _token_shape(mask, input_ids)
            if shape is not None:  # (batch, seq): every token of a sequence gets its sequence's task id
                ctx.task_ids = task_ids.reshape(-1, 1).expand(shape).reshape(-1)
        recording = ctx.recorder is not None and getattr(ctx.recorder, "contrastive", False)
        ctx.compute_contrastive = (self.training and cfg.contrastive_weight > 0) or recording
        ctx.compute_balance = self.training and cfg.balance_weight > 0
        ctx.aux, ctx.pending, ctx.active = [], [], True
        try:
            outputs = self.base_model(**kwargs)
            ctx.collect()  # after the base forward: checkpointed layers never re-run the loss computation
            self.last_aux = self._collect_aux()
        finally:
            ctx.token_mask = ctx.task_ids = None
            ctx.compute_contrastive = ctx.compute_balance = ctx.active = False
            ctx.pending = []
        # Only a training loss carries the aux terms: recording in eval mode must not change out.loss.
        if self.training and self.last_aux is not None and getattr(outputs, "loss", None) is not None:
            share = _token_share(labels, kwargs.get("num_items_in_batch"))
            outputs["loss"] = outputs.loss + self.last_aux.total * share
        if self.last_aux is not None and isinstance(outputs, dict):  # ModelOutput; a tuple output has no room
            for key, value in self.last_aux.output_fields().items():
                outputs[key] = value
        return outputs

    def _collect_aux(self) -> AuxLosses | None:
        aux = self.context.aux
        if not aux:
            return None
        cfg = self.comoe_config
        cons = [a.contrastive for a in aux if a.contrastive is not None]
        bals = [a.balance for a in aux if a.balance is not None]
        mean = lambda xs: torch.stack(xs).mean() if xs else None  # noqa: E731
        contrastive = mean([c.loss for c in cons])
        balance = mean(bals)
        device = (contrastive if contrastive is not None else balance).device
        total = torch.zeros((), device=device)
        if contrastive is not None:
            total = total + cfg.contrastive_weight * contrastive
        if balance is not None:
            total = total + cfg.balance_weight * balance
        return AuxLosses(contrastive, balance, mean([c.pos_cos for c in cons]), mean([c.neg_cos for c in cons]), total)

    def get_aux_loss(self) -> Tensor:
        """Weighted auxiliary loss of the last forward, for custom training loops (add it to your loss)."""
        if self.last_aux is None:
            return torch.zeros(())
        return self.last_aux.total

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    # --- the part of PeftModel's interface that transformers.Trainer uses --------------------------
    def get_base_model(self) -> nn.Module:
        """The wrapped model (its adapted linears are CoMoE layers)."""
        return self.base_model

    @property
    def active_adapters(self) -> list[str]:
        return ["default"]  # one adapter per model; PEFT's multi-adapter API is not supported

    @property
    def active_adapter(self) -> str:
        return "default"

    @property
    def peft_config(self) -> dict[str, CoMoEConfig]:
        return {"default": self.comoe_config}

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
                     **_: object) -> None:
        """Load the weights of a saved adapter with this model's configuration (Trainer's resume path)."""
        if adapter_name != "default":
            raise ValueError(f"comoe holds one adapter per model, named 'default'; got adapter_name={adapter_name!r}")
        saved = CoMoEConfig.from_pretrained(directory)
        mine = {k: v for k, v in self.comoe_config.to_dict().items() if k != "base_model_name_or_path"}
        theirs = {k: v for k, v in saved.to_dict().items() if k != "base_model_name_or_path"}
        differ = sorted(k for k in mine if mine[k] != theirs.get(k))
        if differ:
            raise AdapterLoadError(
                f"{directory}: the saved adapter's configuration differs from this model's in {differ}; "
                "load it onto a fresh base with CoMoEModel.from_pretrained(base, directory) instead"
            )
        self.load_adapter_weights(directory)
        self.set_trainable(is_trainable)

    def set_adapter(self, adapter_name: str = "default", **_: object) -> None:
        """Only the one adapter, 'default', exists: accepted as a no-op (Trainer calls it on resume)."""
        if adapter_name != "default":
            raise ValueError(f"comoe holds one adapter per model, named 'default'; got {adapter_name!r}")

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """PEFT's name for :meth:`disable_adapters`."""
        with self.disable_adapters():
            yield

    # --- switches ------------------------------------------------------------------------------------
    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the plain base model inside this block."""
        previous = {name: layer.disabled for name, layer in self.adapted_modules.items()}
        for layer in self.adapted_modules.values():
            layer.disabled = True
        try:
            yield
        finally:
            for name, layer in self.adapted_modules.items():
                layer.disabled = previous[name]

    @contextmanager
    def recording(self, recorder: RoutingRecorder | None = None) -> Iterator[RoutingRecorder]:
        """Record routing statistics for every forward inside this block."""
        recorder = recorder or RoutingRecorder()
        self.context.recorder = recorder
        try:
            yield recorder
        finally:
            self.context.recorder = None

    # --- parameters ----------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Every adapter tensor (routers and experts), keyed by its name inside the base model."""
        return {n: p for n, p in self.base_model.named_parameters() if ADAPTER_PREFIX in n.rsplit(".", 1)[-1]}

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    get_nb_trainable_parameters = trainable_parameters

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def set_trainable(self, trainable: bool = True) -> None:
        for param in self.adapter_state_dict().values():
            param.requires_grad_(trainable)

    def _unwrap(self, requires_grad: dict[str, bool]) -> None:
        """Put the original linears back into the base model and restore its requires_grad flags."""
        for name, layer in self.adapted_modules.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, layer.base_layer)
        self.adapted_modules = {}
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(requires_grad.get(name, param.requires_grad))

    # --- save / load ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, Tensor] | None = None,
                        is_main_process: bool = True, **_: object) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors``, each atomically.

        ``state_dict`` (this wrapper's full state dict, as Trainer passes it under FSDP/DeepSpeed) replaces
        the live parameters as the source of the adapter tensors; other keyword arguments are ignored.
        """
        if not is_main_process:
            return
        adapter = self.adapter_state_dict()
        if state_dict is not None:
            adapter = _adapter_tensors_from(state_dict, list(adapter))
        os.makedirs(directory, exist_ok=True)
        self.comoe_config.save_pretrained(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.items()}
        path = os.path.join(directory, WEIGHTS_NAME)
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={"format": "pt", "adapter": "comoe"})
        os.replace(tmp, path)

    def load_adapter_weights(self, directory: str | os.PathLike) -> None:
        """Load saved adapter tensors; every check runs before any tensor is copied."""
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        try:
            loaded = load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise AdapterLoadError(f"{path}: not a readable safetensors file ({err}); nothing was loaded") from err
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(loaded))
        unexpected = sorted(set(loaded) - set(expected))
        if missing or unexpected:
            raise AdapterLoadError(
                f"{path} does not fit this model: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; nothing was loaded"
            )
        for name, param in expected.items():
            if loaded[name].shape != param.shape:
                raise AdapterLoadError(
                    f"{path}: tensor {name} has shape {tuple(loaded[name].shape)} but this model expects "
                    f"{tuple(param.shape)} (an adapter for a base of another shape?); nothing was loaded"
                )
        with torch.no_grad():
            for name, param in expected.items():
                param.copy_(loaded[name])

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> CoMoEModel:
        """Wrap ``model`` with the adapter saved in ``directory`` (eval mode, frozen unless is_trainable)."""
        config = CoMoEConfig.from_pretrained(directory)
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        wrapped = cls(model, config)
        try:
            wrapped.load_adapter_weights(directory)
        except BaseException:
            wrapped._unwrap(requires_grad)  # leave the caller's base model as it was given
            raise
        wrapped.set_trainable(is_trainable)
        if not is_trainable:
            wrapped.eval()
        return wrapped


def _adapter_tensors_from(state_dict: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """The adapter tensors of a full state dict, whatever wrapper prefixed its keys; all of them or an error."""
    by_name = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod.", "base_model."):  # DDP, torch.compile, this wrapper
            key = key.removeprefix(prefix)
        by_name[key] = value
    missing = [name for name in names if name not in by_name]
    if missing:
        raise AdapterLoadError(f"the state_dict given to save_pretrained lacks {len(missing)} adapter tensors "
                               f"(e.g. {missing[0]}); nothing was written")
    return {name: by_name[name] for name in names}


def _token_share(labels: Tensor | None, num_items_in_batch: Tensor | int | None) -> Tensor | float:
    """This micro-batch's labelled (predicted) tokens over ``num_items_in_batch``; 1 when that is not given."""
    if num_items_in_batch is None or labels is None:
        return 1.0
    predicted = labels[..., 1:] if labels.dim() >= 2 else labels  # causal LMs predict labels[1:]
    return (predicted != -100).sum() / num_items_in_batch


def _token_shape(mask: Tensor | None, ids: Tensor | None) -> torch.Size | None:
    """(batch, seq) of this forward, from the attention mask or else from the token ids."""
    if mask is not None and mask.dim() == 2:
        return mask.shape
    if isinstance(ids, Tensor) and ids.dim() == 2:
        return ids.shape
    return None


def get_comoe_model(model: nn.Module, config: CoMoEConfig) -> CoMoEModel:
    """Freeze ``model`` and add trainable CoMoE experts and routers to the modules ``config`` targets."""
    return CoMoEModel(model, config)


def is_adapter_dir(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_NAME)) and os.path.isfile(os.path.join(directory, WEIGHTS_NAME))
