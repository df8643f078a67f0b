"""The main job: load data and model, score the baselines, train (multi- or single-task), evaluate, and
write a run directory:

    RUN_DIR/run_config.yaml     the resolved RunConfig
    RUN_DIR/adapter/            adapter_config.json + adapter_model.safetensors (multi-task)
    RUN_DIR/adapters/TASK/      one adapter per task (single-task setting)
    RUN_DIR/train_log.jsonl     one line per optimiser step: loss, task, con, bal, lr (per task dir if single)
    RUN_DIR/metrics.json        per-task accuracy of the adapter, the zero-shot base and the majority class
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import set_seed

from comoe.adapters import build_adapted_model, load_adapted_model, save_adapter, trainable_counts
from comoe.data.registry import load_task
from comoe.data.schema import Example
from comoe.evaluate import evaluate_tasks, majority_baseline, summarise
from comoe.files import write_json_atomic
from comoe.models import load_base_model
from comoe.report import print_accuracy_table
from comoe.runconfig import RUN_CONFIG_NAME, RunConfig
from comoe.train import make_accelerator, train_adapter

METRICS_NAME = "metrics.json"


def load_splits(run: RunConfig) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """Train and test examples per task; every file is validated before any model is loaded."""
    train = {t: load_task(t, "train", limit=run.train_per_task, seed=run.seed) for t in run.tasks}
    test = {t: load_task(t, "test", limit=run.test_per_task, seed=0) for t in run.tasks}
    return train, test


def base_dtype(run: RunConfig) -> torch.dtype:
    """bf16 runs keep the frozen base in bf16 (adapters and routers stay fp32)."""
    return torch.bfloat16 if run.bf16 else torch.float32


def default_run_dir(run: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{run.method}-{run.setting}-seed{run.seed}"


def run_job(run: RunConfig, run_dir: Path | None = None, resume: bool = False) -> dict:
    """Train and evaluate as ``run`` says; returns (and writes) the metrics."""
    run_dir = Path(run_dir or run.output_dir or default_run_dir(run))
    run_dir.mkdir(parents=True, exist_ok=True)
    run.output_dir = str(run_dir)
    accelerator = make_accelerator(run)
    if accelerator.is_main_process:
        run.to_yaml(run_dir / RUN_CONFIG_NAME)
    train, test = load_splits(run)
    accelerator.print(f"run directory: {run_dir}")
    accelerator.print("tasks: " + ", ".join(f"{t} ({len(train[t])} train / {len(test[t])} test)" for t in run.tasks))

    base, tokenizer = load_base_model(run.model, dtype=base_dtype(run))
    if run.gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    base.to(accelerator.device)
    results: dict = {"majority": majority_baseline(train, test)}
    if run.eval_base and accelerator.is_main_process:
        results["base"] = _cached_base_eval(run, run_dir, base, tokenizer, test)

    started = time.time()
    if run.setting == "multi":
        set_seed(run.seed)  # the adapter's initialisation depends only on the seed
        model = build_adapted_model(base, run)
        results["trainable"], results["total_params"] = trainable_counts(model)
        examples = [ex for t in run.tasks for ex in train[t]]
        trained = train_adapter(model, tokenizer, examples, run.tasks, run, run_dir, accelerator, resume, desc="train")
        results["train"] = asdict(trained)
        core = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            save_adapter(core, run_dir / "adapter")
            results["adapter"] = evaluate_tasks(core, tokenizer, test, protocol=run.protocol, return_predictions=True,
                                                batch_size=run.eval_batch_size, max_length=run.max_length)
    else:
        results["adapter"], results["train"] = _single_task(run, run_dir, train, test, accelerator, resume, base, tokenizer)
        results["trainable"], results["total_params"] = results["train"].pop("params")
    results["train_seconds"] = time.time() - started

    if accelerator.is_main_process:
        metrics = {"run": run.output_dir, "method": run.method, "setting": run.setting, "seed": run.seed,
                   "protocol": run.protocol, **results}
        write_json_atomic(run_dir / METRICS_NAME, metrics)
        print_accuracy_table(metrics, title=f"{run.method} ({run.setting}-task) — {run_dir}")
        return metrics
    return {}


def _single_task(run, run_dir, train, test, accelerator, resume, base, tokenizer):
    """One adapter per task, each on a fresh copy of the base, evaluated on its own task."""
    scores, logs, params = {}, {}, (0, 0)
    for i, task in enumerate(run.tasks):
        if i > 0:
            base, tokenizer = load_base_model(run.model, dtype=base_dtype(run))
            base.to(accelerator.device)
        set_seed(run.seed)
        model = build_adapted_model(base, run)
        params = trainable_counts(model)
        task_dir = run_dir / "adapters" / task
        task_dir.mkdir(parents=True, exist_ok=True)
        trained = train_adapter(model, tokenizer, train[task], [task], run, task_dir, accelerator, resume, desc=task)
        logs[task] = asdict(trained)
        core = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            save_adapter(core, task_dir / "adapter")
            scores.update(evaluate_tasks(core, tokenizer, {task: test[task]}, protocol=run.protocol,
                                         return_predictions=True, batch_size=run.eval_batch_size, max_length=run.max_length)["tasks"])
    return summarise(run.protocol, scores), {"per_task": logs, "params": params}


def _cached_base_eval(run, run_dir, base, tokenizer, test) -> dict:
    """Zero-shot base scores, kept in the run directory so a resumed run does not recompute them."""
    path = run_dir / "base_metrics.json"
    if path.is_file():
        return json.loads(path.read_text())
    scores = evaluate_tasks(base, tokenizer, test, protocol=run.protocol, return_predictions=True,
                            batch_size=run.eval_batch_size,
                            max_length=run.max_length)
    write_json_atomic(path, scores)
    return scores


def eval_job(run_dir: Path | None, *, base_only: bool = False, overrides: dict | None = None) -> dict:
    """Evaluate a finished run's adapter(s) (or, with ``base_only``, the base model) on its test sets.

    ``overrides`` may change the tasks, test size, protocol or model (for ``--base-only``).
    """
    if run_dir is not None:
        run = RunConfig.from_yaml(Path(run_dir) / RUN_CONFIG_NAME, **(overrides or {}))
    else:
        run = RunConfig.from_dict(overrides or {}, source="command line")
    test = load_splits(run)[1]
    base, tokenizer = load_base_model(run.model)
    kwargs = dict(protocol=run.protocol, batch_size=run.eval_batch_size, max_length=run.max_length)
    if base_only:
        metrics = {"base": evaluate_tasks(base, tokenizer, test, **kwargs), "protocol": run.protocol}
    elif run.setting == "multi":
        model = load_adapted_model(base, Path(run_dir) / "adapter")
        metrics = {"adapter": evaluate_tasks(model, tokenizer, test, **kwargs), "protocol": run.protocol}
    else:
        scores = {}
        for i, task in enumerate(run.tasks):
            if i > 0:
                base, tokenizer = load_base_model(run.model)
            model = load_adapted_model(base, Path(run_dir) / "adapters" / task / "adapter")
            scores.update(evaluate_tasks(model, tokenizer, {task: test[task]}, **kwargs)["tasks"])
        metrics = {"adapter": summarise(run.protocol, scores), "protocol": run.protocol}
    if run_dir is not None:
        (Path(run_dir) / f"eval_{run.protocol}.json").write_text(json.dumps(metrics, indent=2))
    print_accuracy_table(metrics, title=f"{'base model' if base_only else run_dir} — {run.protocol} protocol")
    return metrics
