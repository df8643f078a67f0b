"""Regional compilation: the forward of each decoder layer compiled by ``torch.compile``.

Every adapted module sits inside a decoder layer (a class the model lists in ``_no_split_modules``), and a
layer's forward compiles to one graph, with no graph break and no host sync, for every expert kind and
routing. Layers of one class share their graphs (their parameters are inputs; the first layer, whose input
needs no gradient, has its own), so compiling costs one layer's time however deep the model is. While
they are compiled the model's ``config.use_cache`` is False: a KV cache's per-layer state would make each
layer a graph of its own. Only ``forward`` is compiled: the module's hooks (FSDP2's, PEFT's, accelerate's,
comoe's own) stay outside the graph. torch's activation checkpointing runs its function with the
compiler off, so the two are refused together. The rest of the step (embedding, output head, loss, the
auxiliary losses) runs eagerly.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import nn


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model``, however it is wrapped (DDP, PEFT)."""
    inner = getattr(model, "module", model)  # DDP
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of the classes in the transformers model's ``_no_split_modules`` (its decoder layers)."""
    base = transformers_model(model)
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
    ``with`` block; several handles restore in the reverse order of their making). ``compile_kwargs`` go
    to ``torch.compile`` (``backend``, ``mode``, ``fullgraph``, ...)."""

    def __init__(self, model: nn.Module, **compile_kwargs: Any):
        base = transformers_model(model)
        if getattr(base, "is_activation_checkpointing", False):
            raise ValueError(
                "activation checkpointing is on, and torch's checkpoint runs each layer with the compiler "
                "off: the layers would run eagerly. Turn one of them off"
            )
        self.layers = decoder_layers(model)
        # training builds no KV cache: each layer's cache state would be a guard, one graph per layer
        self._config, self._use_cache = base.config, getattr(base.config, "use_cache", None)
        base.config.use_cache = False
        self._own_forward = {}  # a forward set on the instance before (another library's patch) comes back
        compiled: dict[object, Any] = {}  # one compiled function per forward function: layers share it
        for layer in self.layers:
            if "forward" in layer.__dict__:
                self._own_forward[layer] = layer.__dict__["forward"]
            forward = layer.forward
            if not isinstance(forward, MethodType):  # a wrapper set on the instance (accelerate's hooks)
                layer.forward = torch.compile(forward, **compile_kwargs)
                continue
            if forward.__func__ not in compiled:
                compiled[forward.__func__] = torch.compile(forward.__func__, **compile_kwargs)
            layer.forward = MethodType(compiled[forward.__func__], layer)

    def restore(self) -> None:
        """Give each layer its eager forward back."""
        for layer in self.layers:
            if layer in self._own_forward:
                layer.forward = self._own_forward[layer]
            else:
                layer.__dict__.pop("forward", None)
        if self.layers:
            self._config.use_cache = self._use_cache
        self.layers, self._own_forward = [], {}

    def __enter__(self) -> CompiledLayers:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.restore()


def compile_layers(model: nn.Module, **compile_kwargs: Any) -> CompiledLayers:
    """Compile the forward of each decoder layer of ``model`` (see the module's docstring); returns the
    handle whose ``restore()`` undoes it. With Trainer: ``compile_layers(model)`` before
    ``trainer.train()``."""
    return CompiledLayers(model, **compile_kwargs)
