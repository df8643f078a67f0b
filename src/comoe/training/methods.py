"""The methods a run trains (``--method``): one `Method` entry each, in `METHODS`.

A method is a named recipe over the adapter: a one-line description (the ``--method`` help), the adapter
fields it fixes whatever the run gives (so that ``--method moe-lora --contrastive-weight 0.5`` is refused
by name), the defaults it fills for the fields a run does not give, and whether it trains the CoMoE
adapter or a plain PEFT LoRA on the same modules. `RunConfig` (its ``adapter`` and ``trained_adapter``),
`build_adapted_model`, `comoe analyze` and `comoe compare`'s presets read the entry; no other module
spells a method's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from comoe.config import CoMoEConfig

Settings = Mapping[str, Any]  # adapter settings as given: CoMoEConfig field -> value


def _every_expert(settings: Settings) -> int:
    return settings.get("num_experts", CoMoEConfig.num_experts)


@dataclass(frozen=True)
class Method:
    name: str
    description: str  # one line: what it trains, for `--method`'s help
    # adapter fields the method sets itself: a value, or a function of the given settings
    fixes: Mapping[str, Any | Callable[[Settings], Any]] = field(default_factory=dict)
    # adapter fields filled when the run does not give them (a run's settings win over these)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # True: a plain PEFT LoRA on the modules CoMoE would adapt (no router: nothing for `comoe analyze`)
    plain_lora: bool = False

    @property
    def routed(self) -> bool:
        """Whether the trained adapter has routers (and so routing to record and analyse)."""
        return not self.plain_lora

    def trained_settings(self, settings: Settings) -> dict[str, Any]:
        """The adapter settings this method trains from ``settings``: its fixed fields set, and
        ``num_negatives`` cleared when there is no contrastive loss (negatives mean nothing without it)."""
        fixed = {name: value(settings) if callable(value) else value for name, value in self.fixes.items()}
        trained = {**settings, **fixed}
        if trained.get("contrastive_weight", CoMoEConfig.contrastive_weight) == 0:
            trained["num_negatives"] = None
        return trained


_NO_CONTRASTIVE = {"contrastive_weight": 0.0}
# MixLoRA's published defaults (Li et al. 2024; its README's top-k routing block). Rank, alpha and dropout
# stay the run's, as for every method.
MIXLORA_DEFAULTS: Mapping[str, Any] = {"num_experts": 8, "top_k": 2, "balance_weight": 0.01}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("comoe", "experts + contrastive loss"),
        Method("moe-lora", "the same experts, contrastive_weight = 0", fixes=_NO_CONTRASTIVE),
        Method(
            "soft-moe",
            "routing = soft: every expert, soft gates, top_k = num_experts, no contrastive loss",
            fixes={**_NO_CONTRASTIVE, "routing": "soft", "top_k": _every_expert},
        ),
        Method(
            "mixlora",
            "MixLoRA: placement = ffn, whole-FFN experts + plain LoRA on the other target modules, no "
            "contrastive loss; unless given, 8 experts, top-2, balance_weight 0.01",
            fixes={**_NO_CONTRASTIVE, "placement": "ffn"},
            defaults=MIXLORA_DEFAULTS,
        ),
        Method(
            "lora",
            "plain PEFT LoRA on the same modules, parameter-matched unless --lora-r",
            fixes=_NO_CONTRASTIVE,  # it only borrows the modules and the parameter count
            plain_lora=True,
        ),
    )
}
METHOD_NAMES = tuple(METHODS)
DEFAULT_METHOD = "comoe"
# every adapter field some method sets: what a method may replace in the settings given
FIXED_FIELDS = tuple(sorted({name for m in METHODS.values() for name in m.fixes} | {"num_negatives"}))


def method_help() -> str:
    """``--method``'s help: each method with its description."""
    return ", ".join(f"{m.name} ({m.description})" for m in METHODS.values()) + "."


def method_of(name: str) -> Method:
    """The method called ``name``; any other name is a ValueError that lists the methods."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHOD_NAMES)}, got {name!r}")
    return METHODS[name]


def method_variant(method: str, **adapter: Any) -> dict[str, Any]:
    """A `comoe compare` variant that trains ``method`` with these adapter settings (a known method only)."""
    method_of(method)
    return {"method": method, "adapter": adapter} if adapter else {"method": method}
