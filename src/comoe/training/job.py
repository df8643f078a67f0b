"""The main job: load data and model, score the baselines, train (multi- or single-task), evaluate, and
write a run directory:
run_config.yaml, the adapter(s), train_log.jsonl and metrics.json (the names and what each holds are in
`comoe.training.run_dir`). train_log.jsonl has one line per optimiser step: loss, task, contrastive, balance,
lr (the
rate it used).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed

from comoe.data.batching import check_lengths
from comoe.data.registry import load_run_data, load_splits
from comoe.data.schema import Example
from comoe.evaluation.accuracy_table import print_accuracy_table
from comoe.evaluation.scoring import evaluate_tasks, majority_baseline, with_macro_average
from comoe.ffn import ffn_targets
from comoe.model import find_targets
from comoe.training import zero
from comoe.training.adapters import build_adapted_model, load_adapted_model, save_adapter, trainable_counts
from comoe.training.base_models import check_max_length, load_base_model
from comoe.training.data_notes import data_summary, print_data_warnings
from comoe.training.loop import train_adapter
from comoe.training.run_config import RunConfig
from comoe.training.run_dir import (
    ADAPTER_DIR,
    ADAPTERS_DIR,
    BASE_SCORES_NAME,
    RESULTS_NAME,
    RUN_CONFIG_NAME,
    TRACKING_DIR,
    adapter_dirs,
    check_output_dir,
    eval_scores_name,
    is_run_dir,
    output_dir,
    resumed_run,
    saved_run,
)
from comoe.training.run_settings import resolve_run
from comoe.training.sharding import FsdpPlan, fsdp_launch, save_sharded_adapter, shard_model
from comoe.training.steps import plan_steps
from comoe.training.tracking import make_accelerator, start_tracking
from comoe.utils.deprecation import moved_names
from comoe.utils.files import write_json_atomic
from comoe.utils.threads import CpuThreads


def check_adapter_fits(base: torch.nn.Module, run: RunConfig) -> None:
    """Target modules, layers and MLP blocks (placement='ffn', --method mixlora) that do not exist in the
    base model fail here, before any evaluation."""
    adapter = run.trained_adapter
    if adapter.placement == "ffn":
        ffn_targets(base, adapter)
    else:
        find_targets(base, adapter)


def base_dtype(run: RunConfig) -> torch.dtype:
    """bf16 runs keep the frozen base in bf16 (adapters and routers stay fp32)."""
    return torch.bfloat16 if run.bf16 else torch.float32


def run_job(run: RunConfig, run_dir: Path | None = None, resume: bool = False) -> dict:
    """Train and evaluate as ``run`` says; returns (and writes) the metrics.

    Everything that can be checked (output directory, data, model, target modules, lengths) is checked
    before the run directory is created, so bad input leaves nothing behind.
    """
    run_dir = output_dir(run, run_dir)
    if resume:  # the API path too: a resumed run keeps its training settings (see resumed_run)
        run = resumed_run(
            run_dir, {k: v for k, v in run.to_dict().items() if k != "output_dir"}, report=False
        )
    accelerator = make_accelerator(run, run_dir / TRACKING_DIR)
    plan, zero_plan = sharded_launch(run)
    check_output_dir(run_dir, resume)
    data = load_run_data(
        run.tasks,
        run.train_per_task,
        run.test_per_task,
        run.seed,
        skip_invalid_rows=run.skip_invalid_rows,
        drop_test_overlap=run.drop_test_overlap,
        val_per_task=run.val_per_task,
    )
    train, test = data.train, data.test
    for examples in ([ex for t in train for ex in train[t]],) if run.setting == "multi" else train.values():
        plan_steps(len(examples), run, accelerator.num_processes)
    base, tokenizer = load_base_model(run.model, base_dtype(run), run.quantize, shardable=plan is not None)
    check_adapter_fits(base, run)
    check_max_length(base, run.max_length, report=accelerator.is_main_process)
    check_lengths(
        [ex for examples in train.values() for ex in examples],
        tokenizer,
        run.max_length,
        note_truncation=accelerator.is_main_process,
    )
    if accelerator.is_main_process:
        print_data_warnings(data)
    accelerator.wait_for_everyone()  # every process has passed every check before anything is written
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create output directory {run_dir}: {err.strerror}; give another path"
        ) from None
    run = replace(run, output_dir=str(run_dir))  # a copy: the caller's config is left as given
    if accelerator.is_main_process:
        run.to_yaml(run_dir / RUN_CONFIG_NAME)
    start_tracking(accelerator, run)
    accelerator.print(f"run directory: {run_dir}")
    held = {t: f" / {len(data.val[t])} validation" if data.val else "" for t in train}
    accelerator.print(
        "tasks: " + ", ".join(f"{t} ({len(train[t])} train{held[t]} / {len(test[t])} test)" for t in train)
    )
    if run.gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    if plan is None:
        base.to(accelerator.device)  # an FSDP-sharded base moves there shard by shard
    if accelerator.device.type == "cpu":
        CpuThreads(run.cpu_threads).settle()  # the base's evaluation; training re-measures as it goes
    results: dict = {"majority": majority_baseline(train, test), "data": data_summary(data)}
    if run.eval_base and accelerator.is_main_process and plan is None:
        results["base"] = _cached_base_eval(run, run_dir, base, tokenizer, test)

    started = time.time()
    if run.setting == "multi":
        set_seed(run.seed)  # the adapter's initialisation depends only on the seed
        model = build_adapted_model(base, run)
        results["trainable"], results["total_params"] = trainable_counts(model)
        if plan is not None:
            _shard(model, plan, accelerator, run, run_dir, tokenizer, test, results)
        examples = [ex for t in train for ex in train[t]]
        trained = train_adapter(
            model,
            tokenizer,
            examples,
            list(train),
            run,
            run_dir,
            accelerator,
            resume,
            "train",
            data.val,
            zero_plan,
        )
        results["train"] = asdict(trained)
        core = accelerator.unwrap_model(model)
        _save_trained(core, run_dir / ADAPTER_DIR, accelerator, plan, zero_plan)
        if accelerator.is_main_process or plan or zero_plan:  # a sharded forward needs every process
            results["adapter"] = evaluate_tasks(
                core,
                tokenizer,
                test,
                protocol=run.protocol,
                return_predictions=True,
                batch_size=run.eval_batch_size,
                max_length=run.max_length,
                progress=accelerator.is_main_process,
            )
    else:
        results["adapter"], results["train"] = _single_task(
            run, run_dir, data, accelerator, resume, base, tokenizer, (plan, zero_plan), results
        )
        results["trainable"], results["total_params"] = results["train"].pop("params")
    results["train_seconds"] = time.time() - started + _seconds_before_resume(results["train"])
    accelerator.end_training()  # closes the tracker's files (a no-op without one)

    if accelerator.is_main_process:
        metrics = {
            "run": run.output_dir,
            "method": run.method,
            "setting": run.setting,
            "seed": run.seed,
            "protocol": run.protocol,
            **results,
        }
        write_json_atomic(run_dir / RESULTS_NAME, metrics)
        print_accuracy_table(metrics, title=f"{run.method} ({run.setting}-task) — {run_dir}")
        return metrics
    return {}


def _shard(
    model, plan: FsdpPlan, accelerator, run: RunConfig, run_dir: Path, tokenizer, test, results
) -> None:
    """Shard ``model`` (FSDP2) and, once per run, score the base through it with the adapter disabled: every
    process runs the forwards (the cache of base scores is written, not read: all must run them)."""
    shard_model(model, plan, accelerator.device)
    if run.eval_base and "base" not in results:
        with model.disable_adapter(), torch.random.fork_rng(devices=[]):
            results["base"] = _cached_base_eval(run, run_dir, model, tokenizer, test, read=False)


def sharded_launch(run: RunConfig) -> tuple[FsdpPlan | None, zero.ZeroPlan | None]:
    """The FSDP2 or ZeRO plan of this launch (both None: one process or DDP); what comoe cannot run sharded
    is refused before any work."""
    fsdp, zero_plan = fsdp_launch(), zero.zero_launch()
    if fsdp and run.quantize == "int8":
        raise ValueError(
            "quantize='int8' under FSDP: bitsandbytes' int8 weights lose their quantisation state when "
            "sharded; shard an nf4 base (--quantize nf4), or train the int8 base with DDP or one process"
        )
    if zero_plan and run.quantize is not None:
        raise ValueError(
            f"quantize={run.quantize!r} under DeepSpeed ZeRO-{zero_plan.stage}: comoe does not hand "
            "bitsandbytes' packed weights to DeepSpeed's engine (untested); shard an nf4 base with FSDP2 "
            "(examples/accelerate/fsdp2.yaml), or train it with DDP or one process"
        )
    if zero_plan and zero_plan.stage == 3 and run.compile:
        raise ValueError(
            "compile=true under DeepSpeed ZeRO-3: its parameter gathers run inside the layers, where "
            "torch.compile cannot follow them; drop --compile, or shard with FSDP2 "
            "(examples/accelerate/fsdp2.yaml)"
        )
    return fsdp, zero_plan


def _save_trained(core, directory: Path, accelerator, fsdp: FsdpPlan | None, zero_plan=None) -> None:
    """The main process saves the adapter; a sharded one is first gathered whole (its tensors only)."""
    if zero_plan:
        zero.save_zero_adapter(core, directory, accelerator.is_main_process)
    elif fsdp:
        save_sharded_adapter(core, directory, accelerator.is_main_process)
    elif accelerator.is_main_process:
        save_adapter(core, directory)


def _single_task(run, run_dir, data, accelerator, resume, base, tokenizer, plans=(None, None), results=None):
    """One adapter per task, each on a fresh copy of the base, evaluated on its own task."""
    train, test = data.train, data.test
    plan, zero_plan = plans
    scores, logs, params = {}, {}, (0, 0)
    for i, task in enumerate(train):
        if i > 0:
            base, tokenizer = load_base_model(
                run.model, base_dtype(run), run.quantize, shardable=plan is not None
            )
            if plan is None:
                base.to(accelerator.device)
        set_seed(run.seed)
        model = build_adapted_model(base, run)
        params = trainable_counts(model)
        if plan is not None:
            _shard(model, plan, accelerator, run, run_dir, tokenizer, test, results)
        task_dir = run_dir / ADAPTERS_DIR / task
        task_dir.mkdir(parents=True, exist_ok=True)
        validation = {task: data.val[task]} if data.val else None
        trained = train_adapter(
            model,
            tokenizer,
            train[task],
            [task],
            run,
            task_dir,
            accelerator,
            resume,
            task,
            validation,
            zero_plan,
        )
        logs[task] = asdict(trained)
        core = accelerator.unwrap_model(model)
        _save_trained(core, task_dir / ADAPTER_DIR, accelerator, plan, zero_plan)
        if accelerator.is_main_process or plan or zero_plan:  # a sharded forward needs every process
            scores.update(
                evaluate_tasks(
                    core,
                    tokenizer,
                    {task: test[task]},
                    protocol=run.protocol,
                    return_predictions=True,
                    batch_size=run.eval_batch_size,
                    max_length=run.max_length,
                    progress=accelerator.is_main_process,
                )["tasks"]
            )
    return with_macro_average(run.protocol, scores), {"per_task": logs, "params": params}


def _seconds_before_resume(train: dict) -> float:
    """Training seconds spent before this process resumed the run (0 for a run that was not resumed)."""
    logs = train.get("per_task", {"all": train}).values()
    return sum(log.get("seconds_before_resume", 0.0) for log in logs)


def _cached_base_eval(run, run_dir, base, tokenizer, test, read: bool = True) -> dict:
    """Zero-shot base scores, kept in the run directory so a resumed run does not recompute them.

    The cache is used only for the same model, protocol, length limit and test examples (a resume may
    change the protocol and the test size); with ``read`` false it is only written (by the main process).
    """
    path = run_dir / BASE_SCORES_NAME
    key = _base_eval_key(run, test)
    if read and path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["scores"]
    scores = evaluate_tasks(
        base,
        tokenizer,
        test,
        protocol=run.protocol,
        return_predictions=True,
        batch_size=run.eval_batch_size,
        max_length=run.max_length,
    )
    if read or PartialState().is_main_process:
        write_json_atomic(path, {"key": key, "scores": scores})
    return scores


def _base_eval_key(run: RunConfig, test: dict[str, list[Example]]) -> dict:
    digest = hashlib.sha256()
    for task, examples in test.items():
        for ex in examples:
            digest.update(json.dumps([task, ex.question, ex.choices, ex.answer, ex.target]).encode())
    key = {
        "model": run.model,
        "protocol": run.protocol,
        "max_length": run.max_length,
        "test_examples": digest.hexdigest(),
    }
    if any(not ex.is_multiple_choice for examples in test.values() for ex in examples):
        key["generation_scoring"] = 2  # 2: numbers by value (comoe 0.2); older caches were exact match only
    return key


def eval_job(run_dir: Path | None, *, base_only: bool = False, overrides: dict | None = None) -> dict:
    """Evaluate a finished run's adapter(s) (or, with ``base_only``, the base model) on its test sets.

    ``overrides`` may change the tasks, test size, protocol or model (for ``--base-only``).
    """
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not is_run_dir(run_dir):
            raise ValueError(
                f"{run_dir} is not a comoe run directory (no {RUN_CONFIG_NAME}); give a directory "
                "written by `comoe train`, or --base-only to score the base model"
            )
        run = saved_run(run_dir, **(overrides or {}))
    else:
        run = resolve_run(("command line", overrides or {}))
    test = load_splits(
        run.tasks, run.train_per_task, run.test_per_task, run.seed, skip_invalid_rows=run.skip_invalid_rows
    )[1]
    if run_dir is not None and not base_only:
        adapters = adapter_dirs(run_dir, run.setting, test)
        missing = [a for a in adapters if not a.is_dir()]
        if missing:
            raise ValueError(
                f"{run_dir} has no trained adapter at {missing[0]}: the run did not finish (continue it "
                f"with `comoe train --resume {run_dir}`), or that task was not trained in this run"
            )
    base, tokenizer = load_base_model(run.model, quantize=run.quantize)
    check_max_length(base, run.max_length)
    kwargs = dict(protocol=run.protocol, batch_size=run.eval_batch_size, max_length=run.max_length)
    if base_only:
        metrics = {"base": evaluate_tasks(base, tokenizer, test, **kwargs), "protocol": run.protocol}
    elif run.setting == "multi":
        model = load_adapted_model(base, adapters[0])
        metrics = {"adapter": evaluate_tasks(model, tokenizer, test, **kwargs), "protocol": run.protocol}
    else:
        scores = {}
        for i, (task, adapter) in enumerate(zip(test, adapters, strict=True)):
            if i > 0:
                base, tokenizer = load_base_model(run.model, quantize=run.quantize)
            model = load_adapted_model(base, adapter)
            scores.update(evaluate_tasks(model, tokenizer, {task: test[task]}, **kwargs)["tasks"])
        metrics = {"adapter": with_macro_average(run.protocol, scores), "protocol": run.protocol}
    if run_dir is not None:
        write_json_atomic(run_dir / eval_scores_name(run.protocol), metrics)
    print_accuracy_table(metrics, title=f"{'base model' if base_only else run_dir} — {run.protocol} protocol")
    return metrics


# names that lived here before comoe 0.2 (see comoe.utils.deprecation)
__getattr__ = moved_names(
    __name__,
    {name: f"comoe.training.run_dir:{name}" for name in ("RESUMABLE_FIELDS", "default_run_dir")},
)
