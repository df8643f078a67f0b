"""`comoe predict`: a trained adapter applied to the user's inputs (a JSONL file, labels optional), one
output line per input line, in order.

The adapter comes from a run directory (its base model, protocol and lengths as the run used them; one
adapter per task for a single-task run) or from a bare adapter directory (``save_pretrained``, Trainer,
a run's ``adapter/``), whose base is ``--model`` or the ``base_model_name_or_path`` it records. Every
check (the input file, the adapter directories, the output) runs before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comoe.config import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from comoe.data.jsonl import read_jsonl
from comoe.data.schema import Example
from comoe.evaluation.predictions import judged, predict, routing_per_example
from comoe.training.adapters import load_adapted_model
from comoe.training.base_models import check_max_length, load_base_model
from comoe.training.run_config import RunConfig
from comoe.training.run_dir import (
    ADAPTER_DIR,
    ADAPTERS_DIR,
    RUN_CONFIG_NAME,
    check_output_dir,
    is_run_dir,
    saved_run,
)
from comoe.training.run_settings import resolve_run
from comoe.utils.files import write_json_atomic, write_text_atomic

PREDICTIONS_NAME = "predictions.jsonl"  # one JSON object per input line, in order
SUMMARY_NAME = "predictions_summary.json"  # what was predicted with what, and accuracy where labelled


@dataclass(frozen=True)
class PredictionSource:
    """What ``comoe predict`` applies: the run settings it predicts with and the adapter of each task
    (``None`` as the task: one adapter for every input)."""

    run: RunConfig
    adapters: dict[str | None, Path]
    description: str

    def adapter_for(self, example: Example) -> Path:
        return self.adapters.get(None) or self.adapters[example.task]


def prediction_source(path: Path, overrides: dict[str, Any]) -> PredictionSource:
    """The run settings and adapters of ``path`` (a run directory or an adapter directory), with the
    ``overrides`` of the command line (model, protocol, eval_batch_size, max_length)."""
    if is_run_dir(path):
        run = saved_run(path, **overrides)
        if run.setting == "multi":
            adapters: dict[str | None, Path] = {None: path / ADAPTER_DIR}
        else:
            root = path / ADAPTERS_DIR
            found = (
                sorted(p.name for p in root.iterdir() if (p / ADAPTER_DIR).is_dir()) if root.is_dir() else []
            )
            adapters = {task: root / task / ADAPTER_DIR for task in found}
        missing = [p for p in adapters.values() if not (p / WEIGHTS_NAME).is_file()]
        if missing or not adapters:
            where = f" at {missing[0]}" if missing else ""
            raise ValueError(
                f"{path} has no trained adapter{where}: the run did not finish (continue it with "
                f"`comoe train --resume {path}`)"
            )
        return PredictionSource(run, adapters, f"run {path}")
    if (path / CONFIG_NAME).is_file():
        if not (path / WEIGHTS_NAME).is_file():
            raise ValueError(
                f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}: not a complete adapter directory"
            )
        fields = dict(overrides)
        if "model" not in fields:
            base = read_adapter_config(path).get("base_model_name_or_path")
            if not base:
                raise ValueError(
                    f"{path / CONFIG_NAME} does not name its base model (base_model_name_or_path): "
                    "give it with --model"
                )
            fields["model"] = base
        return PredictionSource(resolve_run(("command line", fields)), {None: path}, f"adapter {path}")
    what = "does not exist" if not path.exists() else f"holds neither {RUN_CONFIG_NAME} nor {CONFIG_NAME}"
    raise ValueError(
        f"{path} {what}: give a run directory written by `comoe train` or an adapter directory "
        "(adapter_config.json + adapter_model.safetensors)"
    )


def check_tasks_have_adapters(source: PredictionSource, examples: list[Example], input_path: Path) -> None:
    """Refuse inputs whose task has no adapter in a single-task run (one adapter per task)."""
    if None in source.adapters:
        return
    for ex in examples:
        if ex.task not in source.adapters:
            raise ValueError(
                f"{input_path}:{ex.line}: task {ex.task!r} has no adapter in {source.description}, which "
                f"trained one per task ({', '.join(source.adapters)}); name one of them in the line's "
                '"task" field'
            )


def predict_job(
    source_path: Path,
    input_path: Path,
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
    *,
    max_new_tokens: int = 32,
    score_answers: bool = False,
    routing: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every line of ``input_path`` with the adapter(s) of ``source_path``; writes
    ``out_dir/predictions.jsonl`` and ``out_dir/predictions_summary.json``; returns the summary."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    examples = read_jsonl(input_path, labelled=False)
    source = prediction_source(source_path, overrides or {})
    check_tasks_have_adapters(source, examples, input_path)
    check_output_dir(out_dir, resume=True)  # an existing directory (a run's too) may take predictions
    if (out_dir / PREDICTIONS_NAME).exists():
        raise ValueError(f"{out_dir / PREDICTIONS_NAME} exists; choose another --output-dir or remove it")
    run = source.run
    rows: list[dict[str, Any]] = [{} for _ in examples]
    groups: dict[Path, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(source.adapter_for(ex), []).append(i)
    for adapter, indices in groups.items():
        base, tokenizer = load_base_model(run.model, quantize=run.quantize)
        check_max_length(base, run.max_length)
        model = load_adapted_model(base, adapter)
        picked = [examples[i] for i in indices]
        kwargs = dict(batch_size=run.eval_batch_size, max_length=run.max_length, progress=progress)
        predicted = predict(
            model, tokenizer, picked, protocol=run.protocol, max_new_tokens=max_new_tokens, **kwargs
        )
        routed = routing_per_example(model, tokenizer, picked, **kwargs) if routing else None
        for j, i in enumerate(indices):
            rows[i] = predicted[j] | ({"routing": routed[j]} if routed is not None else {})
    if score_answers:
        for row, correct in zip(rows, judged(examples, rows), strict=True):
            if correct is not None:
                row["correct"] = correct
    lines = [_output_line(ex, row) for ex, row in zip(examples, rows, strict=True)]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / PREDICTIONS_NAME, "".join(json.dumps(line) + "\n" for line in lines))
    summary = _summary(source, input_path, examples, rows, score_answers)
    write_json_atomic(out_dir / SUMMARY_NAME, summary)
    return summary


def _output_line(example: Example, row: dict[str, Any]) -> dict[str, Any]:
    """The input's line number, its id if it has one, its task, then the prediction."""
    head: dict[str, Any] = {"line": example.line}
    if "id" in example.meta:
        head["id"] = example.meta["id"]
    return head | {"task": example.task} | row


def _summary(
    source: PredictionSource,
    input_path: Path,
    examples: list[Example],
    rows: list[dict[str, Any]],
    score_answers: bool,
) -> dict[str, Any]:
    run = source.run
    summary: dict[str, Any] = {
        "source": source.description,
        "input": str(input_path),
        "n": len(examples),
        "model": run.model,
        "protocol": run.protocol,
        "max_length": run.max_length,
    }
    if score_answers:
        per_task: dict[str, list[bool]] = {}
        for ex, row in zip(examples, rows, strict=True):
            if "correct" in row:
                per_task.setdefault(ex.task, []).append(row["correct"])
        summary["scored"] = {
            task: {"n": len(hits), "correct": sum(hits), "accuracy": sum(hits) / len(hits)}
            for task, hits in per_task.items()
        }
    return summary
