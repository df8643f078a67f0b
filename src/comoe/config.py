"""`CoMoEConfig`: every choice of the method in one validated, JSON-serialisable dataclass.

Defaults follow the paper where it is specific and our own choices where it is not (the README's
"Decisions on what the paper leaves open", and the comment on each field). The config round-trips
through ``adapter_config.json`` beside the adapter weights. It is a ``peft.PeftConfig`` (``peft_type``
"COMOE"), so ``peft.get_peft_model`` and ``PeftModel.from_pretrained`` accept it once ``comoe`` is
imported; the fields PEFT adds (``task_type``, ``inference_mode``, ``revision``, ``peft_version``,
``auto_mapping``, ``base_model_name_or_path``) are its bookkeeping.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from peft import PeftConfig

from comoe.peft_type import COMOE
from comoe.routers import ROUTERS
from comoe.utils.files import write_json_atomic
from comoe.utils.validation import check_field_types, unknown_fields

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"

ANCHORS = ("random", "all")
EXPERT_PATHS = ("auto", "dense", "grouped")
CONTRASTIVE_FORMS = ("gram", "materialized")
PLACEMENTS = ("linear", "ffn")
LAYER_GROUPS = ("low", "middle", "high", "low+high")
ALL_LINEAR = "all-linear"
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_PROJECTIONS = ATTENTION_MODULES + ["gate_proj", "up_proj", "down_proj"]


@dataclass
class CoMoEConfig(PeftConfig):
    r: int = field(default=16, metadata={"help": "LoRA rank of each expert."})
    lora_alpha: float = field(
        default=32.0, metadata={"help": "LoRA scaling numerator: outputs scale by alpha / r."}
    )
    lora_dropout: float = field(
        default=0.05,
        metadata={"help": "Dropout on the adapter input; one mask is shared by all experts of a module."},
    )
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "DoRA experts (CoMoE-DoRA): each expert also learns a magnitude per output feature, "
            "m_i / ||W0 + s B_i A_i|| rescaling that expert's whole layer output (the norm a constant, as in "
            "DoRA). The contrastive loss then uses the materialised expert outputs. With `comoe train --method "
            "lora`, PEFT's DoRA baseline."
        },
    )
    num_experts: int = field(
        default=4, metadata={"help": "Experts per adapted linear, or per MLP block with placement='ffn' (n)."}
    )
    top_k: int = field(default=2, metadata={"help": "Experts activated per token (k)."})
    target_modules: list[str] | str = field(
        default_factory=lambda: list(ATTENTION_MODULES),
        metadata={
            "help": "Module names to adapt: a list of names (matched against the end of the dotted module "
            "path) or a single regex (matched against the full path). 'all-linear' adapts every linear "
            "inside the repeated layers."
        },
    )
    placement: str = field(
        default="linear",
        metadata={
            "choices": PLACEMENTS,
            "help": "'linear': a mixture of LoRA experts on each target module (the paper). 'ffn': MixLoRA's "
            "layout: each MLP block (gate/up/down) becomes a mixture of whole-FFN experts, expert i the frozen "
            "FFN with its own LoRA on gate, up and down, one router per block; the other target modules "
            "(attention) get one plain LoRA each. The contrastive loss then compares the experts' FFN output "
            "updates FFN_i(x) - FFN(x).",
        },
    )
    layers: list[int] | str | None = field(
        default=None,
        metadata={
            "help": "Layer indices to adapt, or a group: low / middle / high thirds, low+high. None = all."
        },
    )
    routing: str = field(
        default="topk",
        metadata={
            "choices": tuple(ROUTERS),
            "help": "'topk': softmax, keep top-k, renormalise (paper). 'soft': all experts, LoRAMoE-style. "
            "'topp': dynamic, the fewest experts whose probabilities reach top_p (1 to top_k of them). "
            "(comoe.routers.ROUTERS holds the choices.)",
        },
    )
    top_p: float = field(
        default=0.75,
        metadata={"help": "routing='topp': the probability mass each token's experts reach, in (0, 1]."},
    )
    contrastive_weight: float = field(
        default=0.01, metadata={"help": "lambda: weight of the contrastive loss."}
    )
    temperature: float = field(
        default=0.1, metadata={"help": "tau of the InfoNCE loss (not given by the paper)."}
    )
    epsilon: float = field(
        default=1e-3, metadata={"help": "epsilon in the InfoNCE denominator (paper: 1e-3)."}
    )
    anchor: str = field(
        default="random",
        metadata={
            "choices": ANCHORS,
            "help": "'random': one random activated expert per token (Algorithm 1); 'all': Eq. 12.",
        },
    )
    num_negatives: int | None = field(
        default=None,
        metadata={"help": "None: every inactive expert is a negative; an int m: sample m per token."},
    )
    contrastive_form: str = field(
        default="gram",
        metadata={
            "choices": CONTRASTIVE_FORMS,
            "help": "'gram': exact loss from the rank-r codes; 'materialized': the paper's way (reference).",
        },
    )
    balance_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the Switch/Mixtral load-balancing loss (the paper uses none)."},
    )
    expert_path: str = field(
        default="auto",
        metadata={
            "choices": EXPERT_PATHS,
            "help": "'dense' codes, 'grouped' sorted tokens (only the selected experts' work), or 'auto' "
            "(dense: grouped was never faster where measured, CPU or H200).",
        },
    )
    router_init_std: float = field(
        default=0.02, metadata={"help": "Std of the router's normal initialisation."}
    )
    norm_eps: float = field(
        default=1e-6,
        metadata={
            "help": "Floor on expert-output norms in the cosine; keeps the first steps from B=0 finite."
        },
    )
    # Bookkeeping, as PEFT's peft_version: the comoe version that made this config, or that saved the
    # adapter_config.json it was read from (this version for a file saved before comoe wrote it). Not a
    # setting: left out of equality, method_dict and RunConfig.
    comoe_version: str | None = field(
        default=None,
        compare=False,
        metadata={"help": "The comoe version that made or saved this config (bookkeeping)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # PEFT's: checks task_type, records peft_version
        self.peft_type = COMOE
        if self.comoe_version is None:
            self.comoe_version = current_version()
        # first: the range checks below may then compare numbers safely
        check_field_types(self, own_fields() | {"base_model_name_or_path"})
        _check(self.r > 0, f"r must be a positive integer, got {self.r!r}")
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check(
            self.num_experts >= 1,
            f"num_experts must be an integer >= 1, got {self.num_experts!r}",
        )
        _check(
            1 <= self.top_k <= self.num_experts,
            f"top_k must be an integer in 1..num_experts={self.num_experts}, got {self.top_k!r}",
        )
        _check(self.routing in ROUTERS, f"routing must be one of {tuple(ROUTERS)}, got {self.routing!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(self.placement in PLACEMENTS, f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        _check(
            not (self.placement == "ffn" and self.use_dora),
            "use_dora with placement='ffn' (DoRA FFN experts, MixDoRA) is not supported; use placement='linear' "
            "for DoRA experts, or LoRA FFN experts",
        )
        _check(self.anchor in ANCHORS, f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        _check(
            self.expert_path in EXPERT_PATHS,
            f"expert_path must be one of {EXPERT_PATHS}, got {self.expert_path!r}",
        )
        _check(
            self.contrastive_form in CONTRASTIVE_FORMS,
            f"contrastive_form must be one of {CONTRASTIVE_FORMS}, got {self.contrastive_form!r}",
        )
        _check(
            self.contrastive_weight >= 0, f"contrastive_weight must be >= 0, got {self.contrastive_weight!r}"
        )
        _check(self.balance_weight >= 0, f"balance_weight must be >= 0, got {self.balance_weight!r}")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature!r}")
        _check(self.epsilon >= 0, f"epsilon must be >= 0 (0 drops it), got {self.epsilon!r}")
        _check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps!r}")
        _check(self.router_init_std >= 0, f"router_init_std must be >= 0, got {self.router_init_std!r}")
        _check(
            isinstance(self.target_modules, str) or (bool(self.target_modules) and all(self.target_modules)),
            f"target_modules must be a non-empty list of names or a regex string, got {self.target_modules!r}",
        )
        self._check_regex()
        self._check_layers()
        self._check_negatives()
        if self.contrastive_weight > 0:
            self._check_contrastive()

    def _check_regex(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(
                    f"target_modules {self.target_modules!r} is not a valid regular expression ({err}): "
                    f"give a list of module names or a valid regex"
                ) from None

    def _check_layers(self) -> None:
        if self.layers is None:
            return
        if isinstance(self.layers, str):
            _check(
                self.layers in LAYER_GROUPS,
                f"layers must be a list of indices or one of {LAYER_GROUPS}, got {self.layers!r}",
            )
            return
        _check(
            bool(self.layers) and all(i >= 0 for i in self.layers),
            f"layers must be a non-empty list of non-negative indices, got {self.layers!r}",
        )

    def _check_contrastive(self) -> None:
        problem = ROUTERS[self.routing].contrastive_problem(self)
        _check(problem is None, f"{problem}; set contrastive_weight=0 for a plain MoE-LoRA")

    def _check_negatives(self) -> None:
        # Checked whatever contrastive_weight is: routing records compute the loss even at weight 0.
        if self.num_negatives is not None:
            inactive = self.num_experts - self.top_k
            _check(
                1 <= self.num_negatives <= inactive,
                f"num_negatives must be None (all inactive) or an integer in 1..{inactive} "
                f"(num_experts - top_k), got {self.num_negatives!r}",
            )

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (enums as their strings); ``peft_type`` is "COMOE"."""
        return {k: v.value if isinstance(v, Enum) else v for k, v in asdict(self).items()}

    def method_dict(self) -> dict[str, Any]:
        """The method's own fields, without PEFT's bookkeeping: two adapters with equal ``method_dict``
        are interchangeable."""
        own = own_fields()
        return {k: v for k, v in self.to_dict().items() if k in own}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoMoEConfig:
        """A config from ``to_dict``'s output; unknown keys are an error that suggests the closest field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            writer = data.get("comoe_version")
            if _is_newer(writer):
                raise ValueError(
                    f"this adapter was saved by comoe {writer}, newer than this comoe ({current_version()}), "
                    f"with fields {unknown} that this version does not know; upgrade to load it: "
                    f"pip install 'comoe>={writer}'"
                )
            saved_by = f" (saved by comoe {writer})" if isinstance(writer, str) else ""
            raise ValueError(unknown_fields(unknown, known, kind="CoMoEConfig") + saved_by)
        return cls(**{k: v for k, v in data.items() if k in known and k != "peft_type"})

    def save_pretrained(self, directory: str | os.PathLike, **_: object) -> None:
        """Write ``adapter_config.json`` atomically, with the comoe version that writes it (PEFT's keyword
        arguments are accepted and ignored)."""
        data = {**self.to_dict(), "comoe_version": current_version()}
        write_json_atomic(os.path.join(directory, CONFIG_NAME), data, sort_keys=True)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, subfolder: str | None = None, **_: object
    ) -> CoMoEConfig:
        """Read ``adapter_config.json`` from a local adapter directory; every error names the file.

        PEFT's hub keyword arguments are accepted and ignored: comoe reads local directories only."""
        if subfolder:
            directory = os.path.join(directory, subfolder)
        data = read_adapter_config(directory)
        path = os.path.join(directory, CONFIG_NAME)
        if data["peft_type"] != "COMOE":
            raise ValueError(
                f"{path} describes a PEFT {data['peft_type']} adapter, not a CoMoE one; load it with "
                "comoe.training.adapters.load_adapted_model or peft.PeftModel.from_pretrained"
            )
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


DAMAGED = "the adapter directory is damaged: re-save the adapter or restore the file"


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``directory``'s ``adapter_config.json`` (CoMoE's or PEFT's), with its
    ``peft_type``; a missing file is a FileNotFoundError, anything else wrong a ValueError naming the file."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a comoe adapter directory")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {DAMAGED}") from err
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
            type(data), "null"
        )
        raise ValueError(f"{path} holds a JSON {kind}, not an object of adapter settings; {DAMAGED}")
    if not isinstance(data.get("peft_type"), str):
        raise ValueError(
            f'{path} has no "peft_type" ("COMOE" or a PEFT type such as "LORA"), so it is not an '
            f"adapter configuration; {DAMAGED}"
        )
    return data


def own_fields() -> frozenset[str]:
    """The settings CoMoEConfig declares itself (not those it inherits from ``peft.PeftConfig``, nor its
    bookkeeping ``comoe_version``)."""
    return frozenset(CoMoEConfig.__annotations__) - {"comoe_version"}


def current_version() -> str:
    from comoe import __version__

    return __version__


def _is_newer(version: object) -> bool:
    """Whether ``version`` (from a file) names a comoe release after this one."""
    from packaging.version import InvalidVersion, Version

    try:
        return isinstance(version, str) and Version(version) > Version(current_version())
    except InvalidVersion:
        return False


def adapter_readme(config: CoMoEConfig) -> str:
    """The README.md saved beside a CoMoE adapter: what it is and how PEFT loads it (after ``import comoe``:
    PEFT knows the COMOE method only once comoe has registered it, and says ``KeyError: 'COMOE'`` before)."""
    base = config.base_model_name_or_path or "the base model it was trained on"
    return (
        "# CoMoE adapter\n\n"
        f"A comoe adapter (a mixture of LoRA experts) for {base}, saved by comoe {current_version()}. PEFT "
        "loads it once comoe is installed and imported: **`import comoe` first** (without it PEFT stops "
        "with `KeyError: 'COMOE'`).\n\n"
        "```python\n"
        "import comoe  # registers the COMOE method with PEFT\n"
        "from peft import PeftModel\n\n"
        'model = PeftModel.from_pretrained(base_model, "path/to/this/directory")\n'
        "```\n"
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
