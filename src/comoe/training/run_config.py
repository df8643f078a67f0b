"""`RunConfig`: everything a `comoe train` run needs, from defaults < YAML file < command-line flags.

Each field becomes a command-line flag (``--learning-rate 1e-3``); lists are comma-separated
(``--tasks social_iqa,strategyqa``); ``none`` sets an optional field to None. The resolved config is
written to the run directory as ``run_config.yaml`` and is enough to reproduce or evaluate the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from comoe.config import CoMoEConfig
from comoe.data.registry import BUILTIN_SUITE, JSONL_PREFIX, SUITE_NAMES, canonical_task_key, suite_name
from comoe.training.base_models import QUANTIZATIONS, check_quantization_available
from comoe.training.methods import DEFAULT_METHOD, METHOD_NAMES, method_help
from comoe.training.run_adapter import given_adapter, method_adapter, split_names
from comoe.training.tracking import REPORTERS, reporter_problem
from comoe.utils.deprecation import moved_names
from comoe.utils.validation import check_field_types, doc
from comoe.utils.yaml_files import load_yaml_mapping, write_yaml

SETTINGS = ("multi", "single")
PROTOCOLS = ("label", "loglik")


@dataclass
class RunConfig:
    """One `comoe train` run: data, method, adapter, optimisation, evaluation. Every field is a flag."""

    # what to train
    model: str = field(
        default="smollm2-135m",
        metadata=doc(
            "Base model: an alias (smollm2-135m, offline), a local directory, or a hub id (needs network)."
        ),
    )
    tasks: list[str] = field(
        default_factory=lambda: list(BUILTIN_SUITE),
        metadata=doc(
            "Comma-separated task names, suite:NAME for a whole built-in suite, or jsonl:PATH for your own file "
            "(see `comoe tasks`)."
        ),
    )
    train_per_task: int | None = field(
        default=280, metadata=doc("Training examples per task (a seeded sample); none = all.")
    )
    test_per_task: int | None = field(
        default=100, metadata=doc("Test examples per task (the first ones); none = all.")
    )
    val_per_task: int = field(
        default=0,
        metadata=doc(
            "Training examples per task held out for validation (seeded, never trained on), scored every "
            "--eval-steps steps; 0 = none."
        ),
    )
    skip_invalid_rows: bool = field(
        default=False,
        metadata=doc(
            "Leave out the invalid lines of JSONL files (each printed with its line number, counted in "
            "metrics.json) instead of stopping at the first file that has one."
        ),
    )
    drop_test_overlap: bool = field(
        default=False,
        metadata=doc(
            "Drop the training examples whose input (task, question, options) is also a test example's; "
            "without it they are kept, with a warning that counts them."
        ),
    )
    method: str = field(
        default=DEFAULT_METHOD,
        metadata=doc(
            method_help(),
            METHOD_NAMES,
        ),
    )
    setting: str = field(
        default="multi",
        metadata=doc("multi: one adapter for all tasks; single: one adapter per task.", SETTINGS),
    )
    adapter: CoMoEConfig = field(
        default_factory=dict,  # the settings given (none): the method's defaults fill the rest
        metadata=doc(
            "The adapter's settings (CoMoEConfig's fields, documented there): a mapping under `adapter:` in "
            "YAML, one flag per field on the command line. The method fixes some of them (see `method`)."
        ),
    )
    lora_r: int | None = field(
        default=None,
        metadata=doc(
            "Rank of the plain-LoRA baseline (--method lora); none = matched to CoMoE's trainable parameters."
        ),
    )
    # optimisation
    learning_rate: float = field(default=1e-3, metadata=doc("AdamW learning rate (peak of the schedule)."))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW weight decay."))
    epochs: float = field(default=1.0, metadata=doc("Passes over the training examples (may be fractional)."))
    max_steps: int | None = field(
        default=None, metadata=doc("Optimiser steps; overrides --epochs. none = train for --epochs epochs.")
    )
    batch_size: int = field(default=8, metadata=doc("Examples per micro-batch (per process)."))
    grad_accum: int = field(
        default=1,
        metadata=doc("Micro-batches per optimiser step; the step's loss is normalised by all its tokens."),
    )
    warmup_ratio: float = field(
        default=0.05,
        metadata=doc(
            "Share of the steps (rounded up) spent warming the learning rate up; warm-up step i of w runs "
            "at lr·(i+1)/(w+1), so no step runs at 0."
        ),
    )
    scheduler: str = field(
        default="linear",
        metadata=doc("Learning-rate schedule (transformers' get_scheduler): linear, cosine, constant, ..."),
    )
    max_length: int = field(
        default=256,
        metadata=doc("Token limit per example; longer prompts lose their start (the answer is kept)."),
    )
    train_on_prompt: bool = field(
        default=False, metadata=doc("Also train on the prompt tokens, not only on the answer.")
    )
    seed: int = field(default=0, metadata=doc("Seeds the data sample, order, initialisation and dropout."))
    bf16: bool = field(
        default=False,
        metadata=doc("Frozen base in bfloat16 with bf16 autocast; adapters and routers stay fp32."),
    )
    quantize: str | None = field(
        default=None,
        metadata=doc(
            "Load the frozen base quantised by bitsandbytes (adapters stay fp32); needs comoe[quant].",
            QUANTIZATIONS,
        ),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=doc("Recompute activations in backward: less memory, more time.")
    )
    compile: bool = field(
        default=False,
        metadata=doc(
            "Compile each decoder layer's forward with torch.compile while training (the first steps "
            "compile). Validation and evaluation run eagerly."
        ),
    )
    max_grad_norm: float | None = field(
        default=1.0,
        metadata=doc("Clip the gradient's norm to this, as Trainer does; none = no clipping."),
    )
    save_steps: int = field(
        default=50, metadata=doc("Checkpoint every this many steps (resume with --resume).")
    )
    # watching the run
    report_to: str = field(
        default="none",
        metadata=doc(
            "Also send the logged scalars to a tracker (accelerate's): tensorboard writes event files in "
            "RUN_DIR/tracking; wandb and mlflow take their own settings (e.g. WANDB_MODE=offline).",
            REPORTERS,
        ),
    )
    routing_health_steps: int = field(
        default=10,
        metadata=doc(
            "Every this many steps, log each routed layer's routing health (load entropy, busiest and "
            "idlest expert's share, experts with no token); 0 = never."
        ),
    )
    eval_steps: int = field(
        default=0,
        metadata=doc(
            "Every this many steps and at the last, log the held-out examples' (--val-per-task) task loss "
            "and accuracy; 0 = never."
        ),
    )
    cpu_threads: int | None = field(
        default=None,
        metadata=doc(
            "CPU threads for torch; none = one per core that other processes leave free, re-measured "
            "every few seconds (a busy machine slows a run by its share of the cores, not tenfold)."
        ),
    )
    # evaluation
    protocol: str = field(
        default="label",
        metadata=doc(
            "label: score the answer letters; loglik: score each choice's text by log-likelihood.", PROTOCOLS
        ),
    )
    eval_batch_size: int = field(default=16, metadata=doc("Sequences per evaluation batch."))
    eval_base: bool = field(
        default=True, metadata=doc("Also score the zero-shot base model (cached in the run directory).")
    )
    # where
    output_dir: str | None = field(
        default=None, metadata=doc("Run directory; none = runs/<time>-<method>-<setting>-seed<seed>.")
    )

    def __post_init__(self) -> None:
        self.tasks = split_names("tasks", self.tasks)
        # first: the range checks below may then compare numbers safely
        check_field_types(self, {f.name for f in fields(self)} - {"adapter"})
        _one_of("method", self.method, METHOD_NAMES)
        self.adapter = given_adapter(self.method, self.adapter)
        _one_of("setting", self.setting, SETTINGS)
        _one_of("protocol", self.protocol, PROTOCOLS)
        _one_of("scheduler", self.scheduler, _scheduler_names())
        if self.quantize is not None:
            _one_of("quantize", self.quantize, QUANTIZATIONS)
            check_quantization_available(self.quantize)
        _one_of("report_to", self.report_to, REPORTERS)
        _check(reporter_problem(self.report_to) is None, reporter_problem(self.report_to) or "")
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm must be > 0, or none for no clipping, got {self.max_grad_norm!r}",
        )
        _check(
            not (self.compile and self.gradient_checkpointing),
            "compile and gradient_checkpointing: torch's activation checkpointing runs each layer with the "
            "compiler off, so the layers would run eagerly; set one of them false",
        )
        _check(
            self.eval_steps == 0 or self.val_per_task > 0,
            f"eval_steps={self.eval_steps} needs held-out examples to score: set val_per_task "
            "(e.g. --val-per-task 20), or eval_steps 0",
        )
        for name in ("routing_health_steps", "eval_steps", "val_per_task"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum", "save_steps", "eval_batch_size"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("train_per_task", "test_per_task", "lora_r", "cpu_threads"):
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

    @property
    def trained_adapter(self) -> CoMoEConfig:
        """The adapter ``method`` trains from these settings (see `method_adapter`)."""
        return method_adapter(self.method, self.adapter)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, the adapter's as a mapping of its own fields (what ``run_config.yaml`` holds)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "tasks": list(self.tasks), "adapter": self.adapter.method_dict()}

    def to_yaml(self, path: str | Path) -> None:
        write_yaml(path, self.to_dict())

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        """Read a YAML file of fields; ``overrides`` (fields, flat or nested) win over it."""
        from comoe.training.run_settings import resolve_run  # it builds RunConfigs

        data = load_yaml_mapping(path, "RunConfig fields")
        return resolve_run((str(path), data), ("overrides", overrides), source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> RunConfig:
        """A config from a mapping of fields (see `nest_fields`); errors name ``source``."""
        from comoe.training.run_settings import nest_fields  # it reads RunConfig's fields

        try:
            return cls(**nest_fields(data, source))
        except ValueError as err:
            message = str(err)
            raise ValueError(
                message if message.startswith(f"{source}: ") else f"{source}: {message}"
            ) from None


def _scheduler_names() -> tuple[str, ...]:
    from transformers import SchedulerType  # here: importing it costs seconds, only a RunConfig needs it

    return tuple(s.value for s in SchedulerType)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# names that lived here before comoe 0.2 (see comoe.utils.deprecation)
_RUN_DIR, _SETTINGS, _METHODS = (
    "comoe.training.run_dir",
    "comoe.training.run_settings",
    "comoe.training.methods",
)
__getattr__ = moved_names(
    __name__,
    {
        "METHODS": f"{_METHODS}:METHOD_NAMES",
        "METHOD_FIXED": f"{_METHODS}:FIXED_FIELDS",
        "MIXLORA_DEFAULTS": f"{_METHODS}:MIXLORA_DEFAULTS",
        **{name: f"{_RUN_DIR}:{name}" for name in ("RUN_CONFIG_NAME", "ADAPTER_DIR", "ADAPTERS_DIR")},
        **{name: f"{_RUN_DIR}:{name}" for name in ("CHECKPOINTS_DIR", "TRAIN_LOG_NAME")},
        "METRICS_NAME": f"{_RUN_DIR}:RESULTS_NAME",
        **{name: f"{_SETTINGS}:{name}" for name in ("nest_fields", "merge_fields", "flat_fields")},
        "load_yaml": "comoe.utils.yaml_files:load_yaml",
        "parse_field_value": f"{_SETTINGS}:parse_field_value",
        **{
            name: f"comoe.training.run_adapter:{name}"
            for name in ("ADAPTER_FIELDS", "NAME_LISTS", "method_overrides")
        },
    },
)
