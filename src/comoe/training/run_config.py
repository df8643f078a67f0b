"""`RunConfig`: everything a `comoe train` run needs, from defaults < YAML file < command-line flags.

Each field becomes a command-line flag (``--learning-rate 1e-3``); lists are comma-separated
(``--tasks social_iqa,strategyqa``); ``none`` sets an optional field to None. The resolved config is
written to the run directory as ``run_config.yaml`` and is enough to reproduce or evaluate the run.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from comoe.config import ALL_LINEAR, ANCHORS, ATTENTION_MODULES, EXPERT_PATHS, CoMoEConfig
from comoe.data.registry import BUILTIN_SUITE, JSONL_PREFIX, SUITE_NAMES, canonical_task_key, suite_name
from comoe.training.base_models import QUANTIZATIONS, check_quantization_available
from comoe.utils.files import write_text_atomic
from comoe.utils.validation import check_field_types, describe_hint, did_you_mean

METHODS = ("comoe", "moe-lora", "soft-moe", "lora")
SETTINGS = ("multi", "single")
PROTOCOLS = ("label", "loglik")
# What a run directory holds (`comoe train` writes it; eval, analyze, compare and --resume read it).
RUN_CONFIG_NAME = "run_config.yaml"
METRICS_NAME = "metrics.json"  # written last: a run with it is finished
ADAPTER_DIR = "adapter"  # multi-task; single-task runs have ADAPTERS_DIR/<task>/ADAPTER_DIR
ADAPTERS_DIR = "adapters"
CHECKPOINTS_DIR = "checkpoints"
TRAIN_LOG_NAME = "train_log.jsonl"
NAME_LISTS = ("tasks", "target_modules")  # a string is read as comma-separated names


def _doc(text: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A field's documentation: its ``--help`` text (and allowed values), read by the CLI's parser."""
    return {"help": text, **({"choices": choices} if choices else {})}


def _adapter_doc(name: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The documentation of the CoMoEConfig field of the same name: written once, there."""
    return _doc(next(f.metadata["help"] for f in fields(CoMoEConfig) if f.name == name), choices)


@dataclass
class RunConfig:
    """One `comoe train` run: data, method, adapter, optimisation, evaluation. Every field is a flag."""

    # what to train
    model: str = field(
        default="smollm2-135m",
        metadata=_doc(
            "Base model: an alias (smollm2-135m, offline), a local directory, or a hub id (needs network)."
        ),
    )
    tasks: list[str] = field(
        default_factory=lambda: list(BUILTIN_SUITE),
        metadata=_doc(
            "Comma-separated task names, suite:NAME for a whole built-in suite, or jsonl:PATH for your own file "
            "(see `comoe tasks`)."
        ),
    )
    train_per_task: int | None = field(
        default=280, metadata=_doc("Training examples per task (a seeded sample); none = all.")
    )
    test_per_task: int | None = field(
        default=100, metadata=_doc("Test examples per task (the first ones); none = all.")
    )
    method: str = field(
        default="comoe",
        metadata=_doc(
            "comoe (experts + contrastive loss), moe-lora (the same experts, λ = 0), soft-moe (every expert, "
            "soft gates), lora (plain PEFT LoRA, parameter-matched unless --lora-r).",
            METHODS,
        ),
    )
    setting: str = field(
        default="multi",
        metadata=_doc("multi: one adapter for all tasks; single: one adapter per task.", SETTINGS),
    )
    # the adapter (documented once, in CoMoEConfig)
    r: int = field(default=16, metadata=_adapter_doc("r"))
    lora_alpha: float = field(default=32.0, metadata=_adapter_doc("lora_alpha"))
    lora_dropout: float = field(default=0.05, metadata=_adapter_doc("lora_dropout"))
    num_experts: int = field(default=4, metadata=_adapter_doc("num_experts"))
    top_k: int = field(default=2, metadata=_adapter_doc("top_k"))
    target_modules: list[str] | str = field(
        default_factory=lambda: list(ATTENTION_MODULES), metadata=_adapter_doc("target_modules")
    )
    layers: list[int] | str | None = field(default=None, metadata=_adapter_doc("layers"))
    contrastive_weight: float = field(default=0.01, metadata=_adapter_doc("contrastive_weight"))
    temperature: float = field(default=0.1, metadata=_adapter_doc("temperature"))
    epsilon: float = field(default=1e-3, metadata=_adapter_doc("epsilon"))
    anchor: str = field(default="random", metadata=_adapter_doc("anchor", ANCHORS))
    num_negatives: int | None = field(default=None, metadata=_adapter_doc("num_negatives"))
    balance_weight: float = field(default=0.0, metadata=_adapter_doc("balance_weight"))
    expert_path: str = field(default="auto", metadata=_adapter_doc("expert_path", EXPERT_PATHS))
    lora_r: int | None = field(
        default=None,
        metadata=_doc(
            "Rank of the plain-LoRA baseline (--method lora); none = matched to CoMoE's trainable parameters."
        ),
    )
    # optimisation
    learning_rate: float = field(default=1e-3, metadata=_doc("AdamW learning rate (peak of the schedule)."))
    weight_decay: float = field(default=0.0, metadata=_doc("AdamW weight decay."))
    epochs: float = field(
        default=1.0, metadata=_doc("Passes over the training examples (may be fractional).")
    )
    max_steps: int | None = field(
        default=None, metadata=_doc("Optimiser steps; overrides --epochs. none = train for --epochs epochs.")
    )
    batch_size: int = field(default=8, metadata=_doc("Examples per micro-batch (per process)."))
    grad_accum: int = field(
        default=1,
        metadata=_doc("Micro-batches per optimiser step; the step's loss is normalised by all its tokens."),
    )
    warmup_ratio: float = field(
        default=0.05, metadata=_doc("Share of the steps spent warming the learning rate up.")
    )
    scheduler: str = field(
        default="linear",
        metadata=_doc("Learning-rate schedule (transformers' get_scheduler): linear, cosine, constant, ..."),
    )
    max_length: int = field(
        default=256,
        metadata=_doc("Token limit per example; longer prompts lose their start (the answer is kept)."),
    )
    train_on_prompt: bool = field(
        default=False, metadata=_doc("Also train on the prompt tokens, not only on the answer.")
    )
    seed: int = field(default=0, metadata=_doc("Seeds the data sample, order, initialisation and dropout."))
    bf16: bool = field(
        default=False,
        metadata=_doc("Frozen base in bfloat16 with bf16 autocast; adapters and routers stay fp32."),
    )
    quantize: str | None = field(
        default=None,
        metadata=_doc(
            "Load the frozen base quantised by bitsandbytes (adapters stay fp32); needs comoe[quant].",
            QUANTIZATIONS,
        ),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_doc("Recompute activations in backward: less memory, more time.")
    )
    save_steps: int = field(
        default=50, metadata=_doc("Checkpoint every this many steps (resume with --resume).")
    )
    # evaluation
    protocol: str = field(
        default="label",
        metadata=_doc(
            "label: score the answer letters; loglik: score each choice's text by log-likelihood.", PROTOCOLS
        ),
    )
    eval_batch_size: int = field(default=16, metadata=_doc("Sequences per evaluation batch."))
    eval_base: bool = field(
        default=True, metadata=_doc("Also score the zero-shot base model (cached in the run directory).")
    )
    # where
    output_dir: str | None = field(
        default=None, metadata=_doc("Run directory; none = runs/<time>-<method>-<setting>-seed<seed>.")
    )

    def __post_init__(self) -> None:
        for name in NAME_LISTS:
            setattr(self, name, split_names(name, getattr(self, name)))
        check_field_types(self)  # first: the range checks below may then compare numbers safely
        _one_of("method", self.method, METHODS)
        _one_of("setting", self.setting, SETTINGS)
        _one_of("protocol", self.protocol, PROTOCOLS)
        _one_of("scheduler", self.scheduler, _scheduler_names())
        if self.quantize is not None:
            _one_of("quantize", self.quantize, QUANTIZATIONS)
            check_quantization_available(self.quantize)
        for name in ("batch_size", "grad_accum", "save_steps", "eval_batch_size"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("train_per_task", "test_per_task", "lora_r"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1 or none, got {value!r}")
        # The real minimum depends on the tokenizer and the answers: batching.check_lengths names it.
        _check(self.max_length >= 1, f"max_length must be >= 1 token, got {self.max_length!r}")
        _check(
            self.max_steps is None or self.max_steps >= 1,
            f"max_steps must be >= 1, or none to train for `epochs` epochs, got {self.max_steps!r}",
        )
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}")
        _check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate!r}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(0 <= self.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        self._check_tasks()
        if self.method != "lora":
            self.comoe_config()  # fail now, not after the model has loaded

    def _check_tasks(self) -> None:
        _check(bool(self.tasks), "tasks is empty: name at least one task (see `comoe tasks`)")
        _check(
            all(name.strip() for name in self.tasks),
            f"tasks has an empty name: {self.tasks!r}; name each task (see `comoe tasks`)",
        )
        self.tasks = [name.strip() for name in self.tasks]
        seen: dict[str, str] = {}  # canonical key -> the spec that named it (a suite names each of its tasks)
        for spec in self.tasks:
            suite = suite_name(spec)
            for name in SUITE_NAMES[suite] if suite else [spec]:
                key = canonical_task_key(name)
                if key in seen:
                    first, what = seen[key], "file" if key.startswith(JSONL_PREFIX) else "task"
                    if first == spec:
                        note = ""
                    elif suite or suite_name(first):
                        note = f" ({first!r} and {spec!r} both name it)"
                    else:
                        note = f" ({first!r} and {spec!r} are the same {what})"
                    raise ValueError(
                        f"task {name!r} is named twice in tasks: {self.tasks!r}{note}; name each task once"
                    )
                seen[key] = spec

    def comoe_config(self) -> CoMoEConfig:
        """The adapter config this run's method implies."""
        weight = self.contrastive_weight if self.method == "comoe" else 0.0
        return CoMoEConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            num_experts=self.num_experts,
            top_k=self.num_experts if self.method == "soft-moe" else self.top_k,
            target_modules=self.target_modules,
            layers=self.layers,
            routing="soft" if self.method == "soft-moe" else "topk",
            contrastive_weight=weight,
            temperature=self.temperature,
            epsilon=self.epsilon,
            anchor=self.anchor,
            num_negatives=self.num_negatives if weight > 0 else None,
            balance_weight=self.balance_weight,
            expert_path=self.expert_path,
        )

    def to_yaml(self, path: str | Path) -> None:
        write_text_atomic(path, yaml.dump(asdict(self), Dumper=_YamlDumper, sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        """Read a YAML file of fields (see `load_yaml`); ``overrides`` win over the file."""
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of RunConfig fields, got {type(data).__name__}")
        return cls.from_dict({**data, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        """A config from a mapping of fields; unknown keys are an error that suggests the closest field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ValueError(
                f"{source}: unknown fields {unknown}{did_you_mean(unknown, known)}; known fields: {sorted(known)}"
            )
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent forms without a dot (``1e-3``, ``5E+4``) as floats, not strings."""


class _YamlDumper(yaml.SafeDumper):
    """SafeDumper that quotes strings such as '1e5', so that `_YamlLoader` reads them back as strings."""


for _cls in (_YamlLoader, _YamlDumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+.0123456789"),
    )


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely, reading ``1e-3`` as a float (YAML 1.2) rather than a string (YAML 1.1).

    A missing file is a FileNotFoundError and invalid YAML a ValueError, both naming the file (and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or err
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None:
            problem = f"{problem}, {context} at line {context_mark.line + 1}"
        raise ValueError(f"{path} is not valid YAML{where}: {problem}; fix the file there") from None


def split_names(name: str, value: Any) -> Any:
    """A comma-separated string of names as a list (``'a, b'`` → ``['a', 'b']``); 'all-linear' stays a string."""
    if not isinstance(value, str):
        return value
    if name == "target_modules" and value.strip() == ALL_LINEAR:
        return ALL_LINEAR
    return [part.strip() for part in value.split(",") if part.strip()]


def _scheduler_names() -> tuple[str, ...]:
    from transformers import SchedulerType  # here: importing it costs seconds, only a RunConfig needs it

    return tuple(s.value for s in SchedulerType)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# --- a field's value from text (flags, --set FIELD=VALUE) -------------------------------------------
_HINTS = typing.get_type_hints(RunConfig)


def parse_field_value(name: str, text: str) -> Any:
    """Read a command-line string as the type of RunConfig field ``name``; a ValueError names the flag."""
    hint = _HINTS[name]
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if type(None) in members and text.strip().lower() == "none":
        return None
    if name in NAME_LISTS:
        return split_names(name, text)
    for member in members:
        try:
            if typing.get_origin(member) is list:
                item = typing.get_args(member)[0]
                return [item(part.strip()) for part in text.split(",") if part.strip()]
            if member is bool:
                return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[
                    text.lower()
                ]
            if member is not type(None):
                return member(text)
        except (ValueError, KeyError):
            continue
    raise ValueError(f"--{name.replace('_', '-')}: cannot read {text!r} as {describe_hint(hint)}")
