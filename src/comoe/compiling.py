"""Regional compilation: the forward of each decoder layer compiled by ``torch.compile``.

Every adapted module sits inside a decoder layer (a class the model lists in ``_no_split_modules``), and a
layer's forward compiles to one graph, with no graph break and no host sync, for every expert kind and
routing. Layers of one class share that graph (their parameters are its inputs), so compiling costs one
layer's time however deep the model is. Only ``forward`` is compiled: the module's hooks (FSDP2's, PEFT's,
comoe's own) and activation checkpointing stay outside the graph and compose with it. The rest of the
step (embedding, output head, loss, the mean of the auxiliary losses) runs eagerly: a few operators.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of the classes in the transformers model's ``_no_split_modules`` (its decoder layers),
    however it is wrapped (DDP, PEFT)."""
    inner = getattr(model, "module", model)  # DDP
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    names = set(getattr(base, "_no_split_modules", None) or ())
    # by the class or a base of it: FSDP2 makes each sharded layer an instance of a subclass of its own
    layers = [m for m in base.modules() if any(cls.__name__ in names for cls in type(m).__mro__)]
    if not layers:
        raise ValueError(
            f"{type(base).__name__} names no decoder layer class (_no_split_modules is "
            f"{sorted(names) or 'empty'}), so there is no layer to compile; train without compiling"
        )
    return layers


class CompiledLayers:
    """The decoder layers of ``model`` with their forward compiled until :meth:`restore` (or the end of a
    ``with`` block). ``compile_kwargs`` go to ``torch.compile`` (``backend``, ``mode``, ``fullgraph``, ...)."""

    def __init__(self, model: nn.Module, **compile_kwargs: Any):
        self.layers = decoder_layers(model)
        self._own_forward = {}  # a forward set on the instance before (another library's patch) comes back
        compiled: dict[object, Any] = {}  # one compiled function per forward function: layers share it
        for layer in self.layers:
            if "forward" in layer.__dict__:
                self._own_forward[layer] = layer.__dict__["forward"]
            function = layer.forward.__func__
            if function not in compiled:
                compiled[function] = torch.compile(function, **compile_kwargs)
            layer.forward = MethodType(compiled[function], layer)

    def restore(self) -> None:
        """Give each layer its eager forward back."""
        for layer in self.layers:
            if layer in self._own_forward:
                layer.forward = self._own_forward[layer]
            else:
                layer.__dict__.pop("forward", None)
        self.layers, self._own_forward = [], {}

    def __enter__(self) -> CompiledLayers:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.restore()


def compile_layers(model: nn.Module, **compile_kwargs: Any) -> CompiledLayers:
    """Compile the forward of each decoder layer of ``model`` (see the module's docstring); returns the handle
    whose ``restore()`` undoes it. For Trainer: ``compile_layers(model)`` before ``trainer.train()``."""
    return CompiledLayers(model, **compile_kwargs)
