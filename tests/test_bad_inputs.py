"""Bad inputs, table-driven, through the real command line and the Python API.

Every case checks four things: the command exits with status 2 (or the API raises the right exception);
the message names the field, file or line and says what would work (a few fragments of it); the command
line prints no traceback; and nothing was written or changed: no run directory at ``--output-dir``, no new
file under the case's temporary directory, the finished run of the fixture byte-identical, a base model's
weights untouched. Command-line cases run in-process (``comoe.cli.main``); a handful run as real
subprocesses too, to prove that no traceback reaches the terminal.

Guards patched into ``comoe.training.job`` turn "training started" and "evaluation started" into test failures,
and for the cases marked ``model=False`` also "the model was loaded": bad input must fail before any of
these wherever it can.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import comoe
import comoe.training.job as job
import comoe.training.run_dir as run_dir_module
from comoe import CoMoEConfig, CoMoEModel, get_comoe_model
from comoe.cli.app import build_parser, main
from comoe.cli.train import check_method_overrides, requested_fields, run_config_from_args
from comoe.data.jsonl import DataError
from comoe.data.registry import load_run_data, load_task
from comoe.layer import CoMoELayer
from comoe.model import AdapterLoadError
from comoe.training.adapters import load_adapted_model
from comoe.training.run_config import RunConfig
from tests import cli_runs
from tests.tiny_models import build, tiny_comoe_config

pytestmark = pytest.mark.filterwarnings("ignore")


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _finished(model_dir: Path, run_dir: Path, *extra: str) -> Path:
    rc = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--tasks",
            "strategyqa",
            "--train-per-task",
            "8",
            "--test-per-task",
            "4",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
            "--eval-base",
            "false",
            "--output-dir",
            str(run_dir),
            *extra,
        ]
    )
    assert rc == 0 and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    return run_dir


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """One real (2-step) run directory, for --resume and eval cases; no case may change it."""
    return _finished(tiny_model_dir, tmp_path_factory.mktemp("finished") / "run")


@pytest.fixture(scope="module")
def finished_lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """The same with plain LoRA (a PEFT adapter), for the cases marked ``lora=True``; no case may change it."""
    run_dir = _finished(tiny_model_dir, tmp_path_factory.mktemp("finished-lora") / "run", "--method", "lora")
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    return run_dir


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``, with a hash of each file's bytes."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@dataclass
class Ctx:
    """What a case's setup and fragments may refer to: {tmp}, {model}, {run}."""

    tmp: Path
    model: Path
    run: Path
    base: torch.nn.Module | None = None
    lora: Path | None = None  # a finished plain-LoRA run, for the cases marked lora=True

    def sub(self, text: str) -> str:
        return (
            text.replace("{tmp}", str(self.tmp))
            .replace("{model}", str(self.model))
            .replace("{run}", str(self.run))
        )

    def write(self, rel: str, content: str | bytes) -> Path:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(self.sub(content), encoding="utf-8")
        return path


Setup = Callable[[Ctx], object]


def files(mapping: dict[str, str | bytes]) -> Setup:
    return lambda c: [c.write(rel, content) for rel, content in mapping.items()]


def yaml_file(text: str) -> Setup:
    return files({"c.yaml": text})


def rows(*items: dict | str) -> str:
    return "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items)


def mc(i: int, **extra) -> dict:
    return {"question": f"Is {i} an even number?", "choices": ["yes", "no"], "answer": i % 2, **extra}


def jsonl_file(*items: dict | str, name: str = "d.jsonl") -> Setup:
    return files({name: rows(*items)})


def copied_run(rel: str, then: Callable[[Path], object] | None = None, *, lora: bool = False) -> Setup:
    def setup(c: Ctx) -> None:
        shutil.copytree(c.lora if lora else c.run, c.tmp / rel)
        if then is not None:
            then(c.tmp / rel)

    return setup


def saved_lora_adapter(rel: str, then: Callable[[Path], object] | None = None) -> Setup:
    """A PEFT LoRA adapter saved from a fresh tiny Llama."""

    def setup(c: Ctx) -> None:
        get_peft_model(
            build("llama", seed=1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        ).save_pretrained(c.tmp / rel)
        if then is not None:
            then(c.tmp / rel)

    return setup


def _reshaped_tensors(directory: Path) -> None:
    """Valid safetensors whose LoRA tensors have the wrong shapes."""
    path = directory / "adapter_model.safetensors"
    save_file({name: torch.zeros(3, 3) for name in load_file(path)}, path)


def saved_adapter(
    rel: str, hidden: int = 32, then: Callable[[Path], object] | None = None, **config
) -> Setup:
    """An adapter saved from a fresh tiny Llama of width ``hidden``."""

    def setup(c: Ctx) -> None:
        get_comoe_model(
            build("llama", seed=1, hidden=hidden), tiny_comoe_config("llama", **config)
        ).save_pretrained(c.tmp / rel)
        if then is not None:
            then(c.tmp / rel)

    return setup


HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def save_gpt2_with_real_tokenizer(directory: Path) -> None:
    """A 2-layer random GPT-2 with 64 learned positions (n_positions) and SmolLM2's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from comoe.training.base_models import load_tokenizer

    tokenizer = load_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64, **ids)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


# --- the command line: in-process cases --------------------------------------------------------------
TRAIN = [
    "train",
    "--model",
    "{model}",
    "--tasks",
    "strategyqa",
    "--train-per-task",
    "8",
    "--test-per-task",
    "4",
    "--batch-size",
    "4",
    "--max-steps",
    "1",
    "--eval-base",
    "false",
    "--output-dir",
    "{tmp}/out",
]
YAML = ["train", "--config", "{tmp}/c.yaml", "--output-dir", "{tmp}/out"]  # no flag hides a YAML value
JSONL = [*TRAIN, "--tasks", "jsonl:{tmp}/d.jsonl"]


@dataclass
class CliCase:
    argv: list[str]
    fragments: list[str]
    setup: Setup | None = None
    model: bool = False  # may the model be loaded before the refusal?
    lora: bool = False  # does the setup need the finished LoRA run?


def cli(
    id: str,
    argv: list[str],
    fragments: list[str],
    setup: Setup | None = None,
    *,
    model: bool = False,
    lora: bool = False,
    marks=(),
) -> pytest.param:
    return pytest.param(CliCase(argv, fragments, setup, model, lora), id=id, marks=marks)


def train(*extra: str) -> list[str]:
    return [*TRAIN, *extra]  # argparse: the last value of a repeated flag wins


CLI_CASES = [
    # --- YAML configuration files -----------------------------------------------------------------
    cli(
        "yaml-learning-rate-word",
        YAML,
        ["learning_rate must be a number", "'fast'"],
        yaml_file("learning_rate: fast\n"),
    ),
    cli(
        "yaml-batch-size-quoted",
        YAML,
        ["{tmp}/c.yaml: batch_size must be an integer", "the string '8'", "write 8 without quotes"],
        yaml_file('batch_size: "8"\n'),
    ),
    cli(
        "yaml-learning-rate-inf",
        YAML,
        ["{tmp}/c.yaml: learning_rate must be a finite number, got inf"],
        yaml_file("learning_rate: .inf\n"),
    ),
    cli(
        "yaml-epochs-nan",
        YAML,
        ["{tmp}/c.yaml: epochs must be a finite number, got nan"],
        yaml_file("epochs: .nan\nmax_steps: null\n"),
    ),
    cli(
        "yaml-batch-size-float",
        YAML,
        ["batch_size must be an integer", "8.0", "(write 8)"],
        yaml_file("batch_size: 8.0\n"),
    ),
    cli(
        "yaml-eval-base-word",
        YAML,
        ["eval_base must be true or false", "'no'"],
        yaml_file('eval_base: "no"\n'),
    ),
    cli(
        "yaml-tasks-numbers",
        YAML,
        ["tasks must be a list of strings", "item 0 is the integer 1"],
        yaml_file("tasks: [1, 2]\n"),
    ),
    cli(
        "yaml-unknown-field",
        YAML,
        ["{tmp}/c.yaml", "unknown fields ['learning_rat']", "did you mean 'learning_rate'"],
        yaml_file("learning_rat: 0.1\n"),
    ),
    cli(
        "yaml-invalid-syntax",
        YAML,
        ["{tmp}/c.yaml is not valid YAML at line 3", "fix the file there"],
        yaml_file("r: 4\nlearning_rate: [1, 2\nseed: 3\n"),
    ),
    cli(
        "yaml-list-not-mapping",
        YAML,
        ["{tmp}/c.yaml", "expected a mapping of RunConfig fields, got list"],
        yaml_file("- r\n- 4\n"),
    ),
    cli(
        "yaml-scalar-not-mapping",
        YAML,
        ["{tmp}/c.yaml", "expected a mapping of RunConfig fields, got str"],
        yaml_file("just some words\n"),
    ),
    cli(
        "yaml-missing-file",
        [*YAML[:2], "{tmp}/nope.yaml", *YAML[3:]],
        ["no such config file", "{tmp}/nope.yaml"],
    ),
    cli(
        "yaml-output-dir-is-file",
        YAML[:3],
        ["output directory {tmp}/afile is an existing file", "give a directory path"],
        files({"c.yaml": "output_dir: {tmp}/afile\n", "afile": "x"}),
    ),
    # --- flags ---------------------------------------------------------------------------------------
    cli("max-steps-0", train("--max-steps", "0"), ["max_steps must be >= 1", "or none", "got 0"]),
    cli("max-steps-negative", train("--max-steps", "-1"), ["max_steps must be >= 1", "got -1"]),
    cli("max-length-1", train("--max-length", "1"), ["max_length", "--max-length 3"], model=True),
    cli(
        "max-length-2",
        train("--max-length", "2"),
        ["max_length=2 is too short", "task 'strategyqa'", "give --max-length 3 or more"],
        model=True,
    ),
    cli(
        "tasks-twice",
        train("--tasks", "winowhy,winowhy"),
        ["task 'winowhy' is named twice", "name each task once"],
    ),
    cli(
        "tasks-twice-other-case",
        train("--tasks", "strategyqa,StrategyQA"),
        ["named twice", "are the same task"],
    ),
    cli(
        "tasks-suite-and-its-task",
        train("--tasks", "suite:hard,StrategyQA"),
        [
            "task 'StrategyQA' is named twice",
            "'suite:hard' and 'StrategyQA' both name it",
            "name each task once",
        ],
    ),
    cli("tasks-empty-list", train("--tasks", ","), ["tasks is empty", "comoe tasks"]),
    cli("jsonl-empty-path", train("--tasks", "jsonl:"), ["task 'jsonl:' names no file", "write jsonl:PATH"]),
    cli(
        "jsonl-directory",
        train("--tasks", "jsonl:{tmp}/data"),
        ["{tmp}/data is a directory", "name a JSONL file in it"],
        files({"data/readme.txt": "x"}),
    ),
    cli(
        "jsonl-missing-file",
        train("--tasks", "jsonl:{tmp}/missing.jsonl"),
        ["no such JSONL file: {tmp}/missing.jsonl", "relative paths start at {tmp}"],
    ),
    cli(
        "jsonl-missing-file-no-prefix",
        train("--tasks", "mine.jsonl"),
        ["no such JSONL file: mine.jsonl", "relative paths start at {tmp}"],
    ),
    cli(
        "unknown-task",
        train("--tasks", "nosuchtask"),
        ["unknown task 'nosuchtask'", "built-in suite", "(offline)", "strategyqa", "jsonl:PATH"],
    ),
    cli(
        "hub-task-offline",
        train("--tasks", "arc_e"),
        [
            "paper benchmark 'arc_e'",
            "HF_HUB_OFFLINE=1",
            "Offline alternatives",
            "built-in suite",
            "jsonl:PATH",
        ],
    ),
    cli(
        "method-unknown",
        train("--method", "foo"),
        ["method must be one of comoe, moe-lora, soft-moe, mixlora, lora", "'foo'"],
    ),
    cli("setting-unknown", train("--setting", "both"), ["setting must be one of multi, single", "'both'"]),
    cli("protocol-unknown", train("--protocol", "exact"), ["protocol must be one of label, loglik"]),
    cli(
        "scheduler-unknown", train("--scheduler", "foo"), ["scheduler must be one of linear, cosine", "'foo'"]
    ),
    cli(
        "expert-path-unknown",
        train("--expert-path", "fast"),
        ["expert_path must be one of", "'dense'", "'fast'"],
    ),
    cli("anchor-unknown", train("--anchor", "first"), ["anchor must be one of", "'random'", "'first'"]),
    cli(
        "top-k-above-experts",
        train("--top-k", "9"),
        ["top_k must be an integer in 1..num_experts=4", "got 9"],
    ),
    cli(
        "num-experts-below-top-k",
        train("--num-experts", "1"),
        ["top_k must be an integer in 1..num_experts=1"],
    ),
    cli(
        "num-negatives-too-many",
        train("--num-negatives", "5"),
        ["num_negatives", "1..2 (num_experts - top_k)", "got 5"],
    ),
    cli(
        "learning-rate-word",
        train("--learning-rate", "abc"),
        ["argument --learning-rate", "cannot read 'abc' as a number"],
    ),
    cli("learning-rate-zero", train("--learning-rate", "0"), ["learning_rate must be > 0", "got 0.0"]),
    cli("seed-float", train("--seed", "1.5"), ["argument --seed", "cannot read '1.5' as an integer"]),
    cli("bf16-word", train("--bf16", "maybe"), ["argument --bf16", "cannot read 'maybe' as true or false"]),
    cli("batch-size-0", train("--batch-size", "0"), ["batch_size must be >= 1", "got 0"]),
    cli("grad-accum-0", train("--grad-accum", "0"), ["grad_accum must be >= 1", "got 0"]),
    cli("eval-batch-size-0", train("--eval-batch-size", "0"), ["eval_batch_size must be >= 1", "got 0"]),
    cli("train-per-task-0", train("--train-per-task", "0"), ["train_per_task must be >= 1 or none", "got 0"]),
    cli("epochs-0", train("--epochs", "0", "--max-steps", "none"), ["epochs must be > 0", "got 0.0"]),
    cli(
        "epochs-inf",
        train("--epochs", "inf", "--max-steps", "none"),
        ["epochs must be a finite number, got inf"],
    ),
    cli(
        "learning-rate-nan",
        train("--learning-rate", "nan"),
        ["learning_rate must be a finite number, got nan"],
    ),
    cli(
        "tasks-twice-by-alias",
        train("--tasks", "arc_easy,arc_e"),
        ["task 'arc_e' is named twice", "'arc_easy' and 'arc_e' are the same task"],
    ),
    cli("warmup-ratio-2", train("--warmup-ratio", "2"), ["warmup_ratio must be in [0, 1]", "got 2.0"]),
    cli(
        "compile-with-checkpointing",
        train("--compile", "--gradient-checkpointing", "true"),
        ["compile and gradient_checkpointing", "the layers would run eagerly"],
    ),
    cli("r-0", train("--r", "0"), ["r must be a positive integer", "got 0"]),
    cli("lora-dropout-1.5", train("--lora-dropout", "1.5"), ["lora_dropout must be in [0, 1)", "got 1.5"]),
    cli(
        "contrastive-weight-negative",
        train("--contrastive-weight", "-1"),
        ["contrastive_weight must be >= 0"],
    ),
    cli("temperature-0", train("--temperature", "0"), ["temperature must be > 0"]),
    cli(
        "layers-unknown-group",
        train("--layers", "middle+low"),
        ["layers must be a list of indices or one of", "'low+high'", "'middle+low'"],
    ),
    cli(
        "target-modules-no-match",
        train("--target-modules", "nosuch"),
        ["target_modules=['nosuch'] matched no", "q_proj", "down_proj"],
        model=True,
    ),
    cli(
        "target-modules-no-match-lora",
        train("--method", "lora", "--target-modules", "nosuch"),
        ["target_modules=['nosuch'] matched no", "v_proj"],
        model=True,
    ),
    cli(
        "layers-beyond-model",
        train("--layers", "7"),
        ["layers [7] do not exist", "2 layers (0..1)"],
        model=True,
    ),
    cli(
        "model-missing-dir",
        train("--model", "/no/such/dir"),
        ["no such model directory: /no/such/dir", "smollm2-135m"],
        model=True,
    ),  # checked by load_base_model, before it loads anything
    cli(
        "model-dir-without-config",
        train("--model", "{tmp}/empty"),
        ["model directory {tmp}/empty has no config.json", "save_pretrained"],
        files({"empty/notes.txt": "x"}),
        model=True,
    ),
    cli(
        "model-is-file",
        train("--model", "{tmp}/weights.bin"),
        ["'{tmp}/weights.bin' is a file", "give a model directory (with config.json)"],
        files({"weights.bin": "x"}),
        model=True,
    ),
    cli(
        "output-dir-is-file",
        train("--output-dir", "{tmp}/afile"),
        ["output directory {tmp}/afile is an existing file", "give a directory path"],
        files({"afile": "x"}),
    ),
    cli(
        "output-dir-under-file",
        train("--output-dir", "{tmp}/afile/sub"),
        ["{tmp}/afile is a file, not a directory", "give another path"],
        files({"afile": "x"}),
    ),
    cli(
        "output-dir-holds-a-run",
        train("--output-dir", "{run}"),
        ["{run} already holds a run", "comoe train --resume {run}", "another --output-dir"],
    ),
    # --- JSONL content ---------------------------------------------------------------------------
    cli(
        "jsonl-malformed-line",
        JSONL,
        ["{tmp}/d.jsonl:2: invalid JSON", "one complete JSON object"],
        jsonl_file(mc(1), '{"question": "q", "choices": ["a", "b"], "answer": 0', mc(3)),
    ),
    cli(
        "jsonl-not-an-object",
        JSONL,
        ["{tmp}/d.jsonl:2: expected a JSON object, got array"],
        jsonl_file(mc(1), "[1, 2]"),
    ),
    cli(
        "jsonl-missing-answer",
        JSONL,
        ["{tmp}/d.jsonl:2: missing field 'answer'", "0-based index"],
        jsonl_file(mc(1), {"question": "q", "choices": ["a", "b"]}),
    ),
    cli(
        "jsonl-missing-everything",
        JSONL,
        ["{tmp}/d.jsonl:1: missing fields", "'question', 'choices', 'answer'", "'prompt', 'target'"],
        jsonl_file({"text": "hello"}),
    ),
    cli(
        "jsonl-answer-index-out-of-range",
        JSONL,
        ["{tmp}/d.jsonl:2: answer index 2 out of range for 2 choices (0..1)"],
        jsonl_file(mc(1), {"question": "q", "choices": ["a", "b"], "answer": 2}),
    ),
    cli(
        "jsonl-answer-letter-out-of-range",
        JSONL,
        ["{tmp}/d.jsonl:1: answer letter 'C'", "(A..B)"],
        jsonl_file({"question": "q", "choices": ["a", "b"], "answer": "C"}),
    ),
    cli(
        "jsonl-answer-not-a-choice",
        JSONL,
        ["{tmp}/d.jsonl:1: answer 'maybe' is not one of the choices", "A..B"],
        jsonl_file({"question": "q", "choices": ["yes", "no"], "answer": "maybe"}),
    ),
    cli(
        "jsonl-answer-float",
        JSONL,
        ["{tmp}/d.jsonl:1: 'answer' must be an integer index, an option's text or a letter"],
        jsonl_file({"question": "q", "choices": ["yes", "no"], "answer": 1.0}),
    ),
    cli(
        "jsonl-duplicate-choice",
        JSONL,
        ["{tmp}/d.jsonl:1: choice 'a' appears twice", "must be distinct"],
        jsonl_file({"question": "q", "choices": ["a", "a"], "answer": 0}),
    ),
    cli(
        "jsonl-one-choice",
        JSONL,
        ["{tmp}/d.jsonl:1: 'choices' needs at least 2 options, got 1"],
        jsonl_file({"question": "q", "choices": ["a"], "answer": 0}),
    ),
    cli(
        "jsonl-choices-string",
        JSONL,
        ["{tmp}/d.jsonl:1: 'choices' must be a list of strings, got string"],
        jsonl_file({"question": "q", "choices": "a,b", "answer": 0}),
    ),
    cli(
        "jsonl-question-wrong-type",
        JSONL,
        ["{tmp}/d.jsonl:1: 'question' must be a string, got integer"],
        jsonl_file({"question": 3, "choices": ["a", "b"], "answer": 0}),
    ),
    cli(
        "jsonl-choices-and-target",
        JSONL,
        ["{tmp}/d.jsonl:1:", "'choices' + 'answer' (multiple choice) or 'target'"],
        jsonl_file({"question": "q", "choices": ["a", "b"], "answer": 0, "target": "a"}),
    ),
    cli(
        "jsonl-empty-file",
        JSONL,
        ["{tmp}/d.jsonl:1: empty file", "one JSON object per line"],
        files({"d.jsonl": ""}),
    ),
    cli(
        "jsonl-blank-lines-only",
        JSONL,
        ["{tmp}/d.jsonl:1: empty file", "one JSON object per line"],
        files({"d.jsonl": "\n   \n\n"}),
    ),
    cli(
        "jsonl-invalid-utf8",
        JSONL,
        ["{tmp}/d.jsonl:2: not valid UTF-8"],
        files(
            {
                "d.jsonl": rows(mc(1)).encode()
                + b'{"question": "caf\xe9", "choices": ["a", "b"], "answer": 0}\n'
            }
        ),
    ),
    cli(
        "jsonl-mixed-kinds",
        JSONL,
        ["{tmp}/d.jsonl:3: task 'd' mixes multiple choice (line 1) and generation", "its own file"],
        jsonl_file(mc(1), mc(2), {"prompt": "Say hi", "target": "hi"}, {"prompt": "Say yo", "target": "yo"}),
    ),
    cli(
        "jsonl-same-stem-two-dirs",
        train("--tasks", "jsonl:{tmp}/x/same.jsonl,jsonl:{tmp}/y/same.jsonl"),
        [
            "'jsonl:{tmp}/x/same.jsonl' and 'jsonl:{tmp}/y/same.jsonl' both hold a task named 'same'",
            'rename a file or set "task"',
        ],
        files(
            {
                "x/same.jsonl": rows(*(mc(i) for i in range(6))),
                "y/same.jsonl": rows(*(mc(i + 10) for i in range(6))),
            }
        ),
    ),
    cli(
        "jsonl-named-like-builtin",
        train("--tasks", "strategyqa,jsonl:{tmp}/strategyqa.jsonl"),
        ["both hold a task named 'strategyqa'", "rename a file"],
        files({"strategyqa.jsonl": rows(*(mc(i) for i in range(6)))}),
    ),
    cli(
        "jsonl-same-file-twice",
        train("--tasks", "jsonl:{tmp}/d.jsonl,{tmp}/d.jsonl"),
        ["is named twice", "are the same file", "name each task once"],
        jsonl_file(*(mc(i) for i in range(6))),
    ),
    cli(
        "jsonl-partial-splits",
        JSONL,
        [
            '{tmp}/d.jsonl:2: this line has no "split" but line 1 has one',
            'give every line a "split" or none',
            "{tmp}/d.jsonl:4: this line",
        ],
        jsonl_file(mc(1, split="train"), mc(2), mc(3, split="test"), mc(4)),
    ),
    cli(
        "jsonl-task-path-like",
        JSONL,
        [
            "{tmp}/d.jsonl:2: 'task' '../escape' is not a plain name",
            "letters, digits, '_', '.' and '-'",
            "without '..'",
        ],
        jsonl_file(mc(1, task="a"), mc(2, task="../escape"), mc(3, task="a")),
    ),
    cli(
        "jsonl-task-absolute-path",
        JSONL,
        ["{tmp}/d.jsonl:1: 'task' '/tmp/x' is not a plain name"],
        jsonl_file(mc(1, task="/tmp/x")),
    ),
    cli(
        "jsonl-task-one-input-without-splits",
        JSONL,
        [
            "{tmp}/d.jsonl: task 'b' has 1 distinct input",
            "at least 2 distinct inputs per task",
            "add lines to that task",
        ],
        jsonl_file(*(mc(i, task="a") for i in range(6)), mc(1, task="b")),
    ),
    cli(
        "jsonl-all-lines-train",
        JSONL,
        ["{tmp}/d.jsonl: no lines with split 'test'", "the file has train", '"split": "test"'],
        jsonl_file(*(mc(i, split="train") for i in range(6))),
    ),
    cli(
        "jsonl-one-task-without-test",
        JSONL,
        ["task 'b' of 'jsonl:{tmp}/d.jsonl' has train examples but no test", '"split": "test"'],
        jsonl_file(
            mc(1, task="a", split="train"), mc(2, task="a", split="test"), mc(3, task="b", split="train")
        ),
    ),
    # --- --resume ----------------------------------------------------------------------------------
    cli(
        "resume-not-a-run",
        ["train", "--resume", "{tmp}/notrun"],
        ["--resume {tmp}/notrun", "no run_config.yaml", "written by `comoe train`"],
        files({"notrun/x": "x"}),
    ),
    cli(
        "resume-missing-dir",
        ["train", "--resume", "{tmp}/nowhere"],
        ["--resume {tmp}/nowhere", "no run_config.yaml"],
    ),
    cli(
        "resume-learning-rate-changed",
        ["train", "--resume", "{run}", "--learning-rate", "0.5"],
        ["--resume {run}", "learning_rate: 0.001 -> 0.5", "drop those flags", "eval_batch_size"],
    ),
    cli(
        "resume-tasks-changed",
        ["train", "--resume", "{run}", "--tasks", "winowhy"],
        ["tasks: ['strategyqa'] -> ['winowhy']", "start a new run without --resume"],
    ),
    cli(
        "resume-adapter-field-changed",
        ["train", "--resume", "{run}", "--num-experts", "6"],
        ["--resume {run}", "adapter.num_experts: 4 -> 6", "drop those flags"],
    ),
    cli(
        "resume-nested-adapter-field-changed",
        ["train", "--resume", "{run}", "--config", "{tmp}/c.yaml"],
        ["adapter.temperature: 0.1 -> 0.5", "drop those flags"],
        yaml_file("adapter:\n  temperature: 0.5\n"),
    ),
    cli(
        "resume-output-dir-elsewhere",
        ["train", "--resume", "{run}", "--output-dir", "{tmp}/elsewhere"],
        ["--resume {run} continues the run in its own directory", "drop --output-dir {tmp}/elsewhere"],
    ),
    cli(
        "resume-max-steps-none",
        ["train", "--resume", "{run}", "--max-steps", "none"],
        ["--resume {run}", "max_steps: 2 -> None", "drop those flags"],
    ),  # `none` is a value given, not ignored
    cli(
        "resume-bad-value",
        ["train", "--resume", "{run}", "--eval-batch-size", "0"],
        ["eval_batch_size must be >= 1", "got 0"],
    ),
    cli(
        "resume-config-unknown-field",
        ["train", "--resume", "{run}", "--config", "{tmp}/c.yaml"],
        ["{tmp}/c.yaml: unknown fields ['eval_bach_size']", "did you mean 'eval_batch_size'"],
        yaml_file("eval_bach_size: 4\n"),
    ),
    # --- comoe eval --------------------------------------------------------------------------------
    cli(
        "eval-not-a-run",
        ["eval", "{tmp}/notrun"],
        ["{tmp}/notrun is not a comoe run directory", "written by `comoe train`", "--base-only"],
        files({"notrun/x": "x"}),
    ),
    cli("eval-no-run-dir", ["eval"], ["give a RUN_DIR", "--base-only"]),
    cli(
        "eval-adapter-missing",
        ["eval", "{tmp}/r"],
        ["{tmp}/r has no trained adapter at {tmp}/r/adapter", "comoe train --resume {tmp}/r"],
        copied_run("r", lambda r: shutil.rmtree(r / "adapter")),
    ),
    cli(
        "eval-adapter-config-corrupted",
        ["eval", "{tmp}/r"],
        ["{tmp}/r/adapter/adapter_config.json is not valid JSON", "re-save the adapter or restore the file"],
        copied_run("r", lambda r: (r / "adapter" / "adapter_config.json").write_text('{"r": 4,')),
        model=True,
    ),
    cli(
        "eval-adapter-weights-corrupted",
        ["eval", "{tmp}/r"],
        [
            "{tmp}/r/adapter/adapter_model.safetensors",
            "not a readable safetensors file",
            "nothing was loaded",
        ],
        copied_run("r", lambda r: (r / "adapter" / "adapter_model.safetensors").write_bytes(b"garbage")),
        model=True,
    ),
    cli(
        "eval-lora-weights-garbage",
        ["eval", "{tmp}/r"],
        [
            "{tmp}/r/adapter/adapter_model.safetensors",
            "not a readable safetensors file",
            "nothing was loaded",
        ],
        copied_run(
            "r", lambda r: (r / "adapter" / "adapter_model.safetensors").write_bytes(b"garbage"), lora=True
        ),
        model=True,
        lora=True,
    ),
    cli(
        "eval-lora-config-array",
        ["eval", "{tmp}/r"],
        ["{tmp}/r/adapter/adapter_config.json holds a JSON array", "re-save the adapter or restore the file"],
        copied_run("r", lambda r: (r / "adapter" / "adapter_config.json").write_text("[1, 2]"), lora=True),
        model=True,
        lora=True,
    ),
    cli(
        "eval-lora-config-no-peft-type",
        ["eval", "{tmp}/r"],
        ['{tmp}/r/adapter/adapter_config.json has no "peft_type"', "re-save the adapter"],
        copied_run("r", lambda r: (r / "adapter" / "adapter_config.json").write_text('{"r": 4}'), lora=True),
        model=True,
        lora=True,
    ),
    cli(
        "eval-lora-weights-wrong-shapes",
        ["eval", "{tmp}/r"],
        ["{tmp}/r/adapter: PEFT could not load this LORA adapter", "size mismatch", "re-save the adapter"],
        copied_run("r", lambda r: _reshaped_tensors(r / "adapter"), lora=True),
        model=True,
        lora=True,
    ),
    cli(
        "eval-run-config-corrupted",
        ["eval", "{tmp}/r"],
        ["{tmp}/r/run_config.yaml is not valid YAML at line 3", "fix the file there"],
        copied_run("r", lambda r: (r / "run_config.yaml").write_text("r: 4\ntasks: [strategyqa\n")),
    ),
    cli(
        "eval-unknown-task",
        ["eval", "{run}", "--tasks", "nosuch"],
        ["unknown task 'nosuch'", "built-in suite"],
    ),
    cli(
        "eval-protocol-unknown",
        ["eval", "{run}", "--protocol", "exact"],
        ["command line: protocol must be one of label, loglik, got 'exact'"],
    ),
    cli(
        "eval-with-eval-batch-size-0",
        ["eval", "{run}", "--eval-batch-size", "0"],
        ["eval_batch_size must be >= 1"],
    ),
    # --- flags a method overrides, abbreviations, config sources --------------------------------------
    cli(
        "method-moe-lora-contrastive-weight",
        train("--method", "moe-lora", "--contrastive-weight", "0.5"),
        [
            "--contrastive-weight 0.5: method 'moe-lora' sets contrastive_weight itself (to 0.0)",
            "the flag would not apply",
            "drop the flag",
        ],
    ),
    cli(
        "method-soft-moe-routing-topk",
        train("--method", "soft-moe", "--routing", "topk"),
        ["--routing topk: method 'soft-moe' sets routing itself (to 'soft')"],
    ),
    cli(
        "method-lora-num-negatives",
        train("--method", "lora", "--num-negatives", "1"),
        ["--num-negatives 1: method 'lora' sets num_negatives itself (to None)"],
    ),
    cli(
        "quantize-nf4-narrow-layers",
        train("--quantize", "nf4"),
        [
            "--quantize nf4: layer model.layers.0.self_attn.q_proj is 32 wide",
            "multiples of its block size 64",
            "at least 64 wide",
        ],
        model=True,
        marks=pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes"),
    ),
    cli(
        "max-length-beyond-learned-positions",
        train("--model", "{tmp}/gpt2", "--target-modules", "c_attn,c_proj", "--max-length", "128"),
        [
            "--max-length 128 is longer than the model's 64 positions (n_positions=64)",
            "--max-length 64 or less",
        ],
        lambda c: save_gpt2_with_real_tokenizer(c.tmp / "gpt2"),
        model=True,
    ),
    cli(
        "eval-max-length-beyond-learned-positions",
        ["eval", "--base-only", "--model", "{tmp}/gpt2", "--tasks", "strategyqa", "--test-per-task", "4"],
        ["--max-length 256 is longer than the model's 64 positions", "--max-length 64 or less"],
        lambda c: save_gpt2_with_real_tokenizer(c.tmp / "gpt2"),
        model=True,
    ),
    cli(
        "jsonl-invalid-line-offers-skipping",
        JSONL,
        ["{tmp}/d.jsonl:2: choice 'a' appears twice", "give --skip-invalid-rows"],
        jsonl_file(mc(1), {"question": "q", "choices": ["a", "a"], "answer": 0}, mc(3)),
    ),
    cli(
        "jsonl-skip-invalid-rows-every-line-invalid",
        [*JSONL, "--skip-invalid-rows"],
        ["{tmp}/d.jsonl: every line is invalid (2 skipped; the first: {tmp}/d.jsonl:1: 'choices'"],
        jsonl_file({"question": "q", "choices": "a,b", "answer": 0}, {"text": "hello"}),
    ),
    cli(
        "jsonl-skip-invalid-rows-partial-splits",
        [*JSONL, "--skip-invalid-rows"],
        ['{tmp}/d.jsonl:2: this line has no "split" but line 1 has one'],
        jsonl_file(mc(1, split="train"), mc(2), mc(3, split="test")),
    ),  # a problem of the whole file is not a line to skip
    cli(
        "jsonl-drop-test-overlap-leaves-nothing",
        [*JSONL, "--drop-test-overlap"],
        ["task 'd' of 'jsonl:{tmp}/d.jsonl': every training example is also a test example"],
        jsonl_file(*(mc(i, split="train") for i in range(4)), *(mc(i, split="test") for i in range(4))),
    ),
    cli(
        "abbreviation-of-two-flags",
        train("--eval", "4"),
        ["ambiguous option: --eval could match --eval-steps, --eval-batch-size, --eval-base"],
    ),
    cli(
        "yaml-config-is-a-directory",
        [*YAML[:2], "{tmp}/confs", *YAML[3:]],
        ["config file {tmp}/confs is a directory", "give a YAML file"],
        files({"confs/c.yaml": "r: 4\n"}),
    ),
]


@pytest.fixture
def guarded(monkeypatch, tmp_path):
    """Offline, in the case's own working directory, with training and evaluation turned into failures."""
    cli_runs.go_offline(monkeypatch)
    monkeypatch.delenv("COMOE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)

    def fail(what):
        def guard(*args, **kwargs):
            raise AssertionError(f"{what} started: the bad input was not refused before it")

        return guard

    monkeypatch.setattr(job, "train_adapter", fail("training"))
    monkeypatch.setattr(job, "evaluate_tasks", fail("evaluation"))
    return monkeypatch


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse
        return exit.code


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_bad_input(
    case: CliCase, tiny_model_dir, finished_run, finished_lora_run, tmp_path, guarded, capsys
):
    lora = finished_lora_run if case.lora else None  # module-scoped: made before `guarded` stops training
    ctx = Ctx(tmp_path, tiny_model_dir, finished_run, lora=lora)
    if case.setup is not None:
        case.setup(ctx)
    if not case.model:
        guarded.setattr(
            job, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded before the refusal")
        )
    before_tmp, before_run = snapshot(tmp_path), snapshot(finished_run)
    before_lora = snapshot(lora) if lora else None
    capsys.readouterr()

    rc = run_cli([ctx.sub(arg) for arg in case.argv])

    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for fragment in case.fragments:
        assert ctx.sub(fragment) in err, f"{fragment!r} not in the message:\n{err}"
    assert not (tmp_path / "out").exists(), "a run directory was created"
    assert snapshot(tmp_path) == before_tmp, "files were written or changed"
    assert snapshot(finished_run) == before_run, "the finished run was changed"
    assert lora is None or snapshot(lora) == before_lora, "the finished LoRA run was changed"


def test_cli_refuses_an_unwritable_output_directory(tiny_model_dir, tmp_path, guarded, capsys):
    """Tests run as root, where everything is writable: ``os.access`` says no for one directory instead."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    guarded.setattr(
        run_dir_module.os,
        "access",
        lambda path, mode, *a, **k: False if Path(path) == locked else real_access(path, mode, *a, **k),
    )
    guarded.setattr(
        job, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded before the refusal")
    )
    ctx = Ctx(tmp_path, tiny_model_dir, Path("/nonexistent-run"))
    before = snapshot(tmp_path)
    capsys.readouterr()

    rc = run_cli([ctx.sub(arg) for arg in train("--output-dir", "{tmp}/locked/out")])

    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert (
        ctx.sub(
            "output directory {tmp}/locked/out: {tmp}/locked is not writable; give a path you can write to"
        )
        in err
    )
    assert snapshot(tmp_path) == before and not any(locked.iterdir()), "files were written"


# --- what must work ------------------------------------------------------------------------------
def test_yaml_tasks_as_one_string_is_a_list(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("tasks: winowhy\n")
    assert RunConfig.from_yaml(config).tasks == ["winowhy"]
    args = build_parser().parse_args(["train", "--config", str(config)])
    assert run_config_from_args(args).tasks == ["winowhy"]


def test_max_steps_none_on_the_command_line_overrides_the_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 100\nepochs: 2\n")
    args = build_parser().parse_args(["train", "--config", str(config), "--max-steps", "none"])
    assert run_config_from_args(args).max_steps is None  # trains `epochs` epochs, as asked
    assert requested_fields(args)["max_steps"] is None  # what a --resume compares with the run
    args = build_parser().parse_args(["train", "--config", str(config)])
    assert run_config_from_args(args).max_steps == 100 and requested_fields(args)["max_steps"] == 100


def test_resume_may_change_the_eval_batch_size(finished_run, capsys):
    before = snapshot(finished_run)
    config = run_dir_module.resumed_run(finished_run, {"eval_batch_size": 4})
    assert config.eval_batch_size == 4
    assert config.output_dir == str(finished_run)
    assert "eval_batch_size = 4 (was 16)" in capsys.readouterr().out
    assert snapshot(finished_run) == before


def test_an_abbreviated_flag_with_two_spellings_is_that_flag():
    """--output-dir and --output_dir are one flag: --output names it, as argparse abbreviations do."""
    assert build_parser().parse_args(["train", "--output", "x"]).output_dir == "x"
    assert build_parser().parse_args(["train", "--learning", "0.5"]).learning_rate == 0.5


def test_config_from_a_pipe_is_read_once(tmp_path):
    """``--config <(...)`` is a pipe: readable once, and every reading of the command sees its fields."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("method: moe-lora\nlearning_rate: 0.005\n"))
    writer.start()
    args = build_parser().parse_args(["train", "--config", str(fifo), "--seed", "3"])
    run = run_config_from_args(args)
    writer.join(timeout=10)
    assert (run.method, run.learning_rate, run.seed) == ("moe-lora", 0.005, 3)
    assert requested_fields(args)["learning_rate"] == 0.005  # read again: the same text
    check_method_overrides(args, run.method)


def test_a_config_file_value_that_the_method_replaces_is_named_in_a_warning(tmp_path, capsys):
    """A --config file keeps its settings as given, so one file trains every method (a run's run_config.yaml,
    `comoe compare`'s cells): a value the method replaces is a warning, not a refusal; defaults pass quietly."""
    RunConfig(method="comoe", adapter={"contrastive_weight": 0.5}).to_yaml(tmp_path / "run_config.yaml")
    args = build_parser().parse_args(
        ["train", "--config", str(tmp_path / "run_config.yaml"), "--method", "moe-lora"]
    )
    check_method_overrides(args, run_config_from_args(args).method)
    assert (
        f"warning: {tmp_path / 'run_config.yaml'} sets contrastive_weight: 0.5, which method 'moe-lora' "
        "replaces with 0.0" in capsys.readouterr().err
    )
    RunConfig(method="moe-lora").to_yaml(tmp_path / "moe.yaml")  # every adapter field, at its default
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "moe.yaml")])
    check_method_overrides(args, run_config_from_args(args).method)
    args = build_parser().parse_args(["train", "--method", "moe-lora", "--contrastive-weight", "0"])
    check_method_overrides(args, "moe-lora")  # the value the method trains with
    assert capsys.readouterr().err == ""


def test_stale_checkpoint_writes_are_removed_and_nothing_else(tmp_path):
    from comoe.training.checkpoint import list_checkpoints, remove_stale_writes

    for name in ("step-000002/adapter", ".step-000004.4242-1.tmp/adapter", "notes"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / ".train_log.jsonl.4242-1.tmp").write_text("x")  # another writer's: not a checkpoint
    assert [p.name for p in remove_stale_writes(tmp_path)] == [".step-000004.4242-1.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".train_log.jsonl.4242-1.tmp",
        "notes",
        "step-000002",
    ]
    assert list_checkpoints(tmp_path) == [tmp_path / "step-000002"]


@pytest.mark.slow
def test_one_step_moves_the_adapter_and_the_log_gives_the_rate_it_used(tiny_model_dir, tmp_path):
    """--max-steps 1: its one step is the warm-up, run at half the learning rate (not at 0); a stale
    checkpoint write that a killed process left in the output directory is removed."""
    stale = tmp_path / "run" / "checkpoints" / ".step-000050.4242-1.tmp"
    (stale / "adapter").mkdir(parents=True)
    run_dir = _finished(tiny_model_dir, tmp_path / "run", "--max-steps", "1", "--learning-rate", "0.002")
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    b = [tensor for name, tensor in weights.items() if name.endswith("comoe_B")]
    assert b and any(tensor.abs().max() > 0 for tensor in b), "the adapter's B matrices are still zero"
    assert [(row["step"], row["lr"]) for row in cli_runs.read_log(run_dir)] == [(1, pytest.approx(0.001))]
    assert not stale.exists() and not any((run_dir / "checkpoints").iterdir())


@pytest.mark.slow
def test_max_length_beyond_rotary_positions_warns_and_runs(tiny_model_dir, tmp_path, capsys):
    """The tiny Llama has max_position_embeddings=512 and rotary positions: a longer limit runs, warned."""
    capsys.readouterr()
    _finished(tiny_model_dir, tmp_path / "run", "--max-length", "1024")
    err = capsys.readouterr().err
    assert "warning: --max-length 1024 is beyond the model's max_position_embeddings=512" in err, err


def test_train_examples_that_are_test_examples_are_found_with_their_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        rows(*(mc(i, split="train") for i in range(6)), *(mc(i, split="test") for i in (4, 5, 9)))
    )
    data = load_run_data([f"jsonl:{path}"], None, None, 0)
    assert [(a.line, b.line) for a, b in data.overlap["d"]] == [(5, 7), (6, 8)]
    dropped = load_run_data([f"jsonl:{path}"], None, None, 0, drop_test_overlap=True)
    assert [ex.line for ex in dropped.train["d"]] == [1, 2, 3, 4] and len(dropped.overlap["d"]) == 2
    assert len(dropped.test["d"]) == 3


@pytest.mark.slow
def test_flawed_rows_are_skipped_on_request_listed_and_recorded(tiny_model_dir, tmp_path, capsys):
    """--skip-invalid-rows: the run goes on without the flawed lines, each printed with its line number
    and recorded (with their count) in metrics.json."""
    lines = [mc(i) for i in range(10)]
    lines[2] = {"question": "q", "choices": ["a", "a"], "answer": 0}
    lines[7] = '{"question": "q", "choices": ["a", "b"]'
    (tmp_path / "d.jsonl").write_text(rows(*lines))
    capsys.readouterr()
    run_dir = _finished(
        tiny_model_dir, tmp_path / "run", "--tasks", f"jsonl:{tmp_path / 'd.jsonl'}", "--skip-invalid-rows"
    )
    err = capsys.readouterr().err
    assert "warning: skipped 2 invalid lines (--skip-invalid-rows)" in err, err
    assert f"{tmp_path / 'd.jsonl'}:3: choice 'a' appears twice" in err
    assert f"{tmp_path / 'd.jsonl'}:8: invalid JSON" in err
    skipped = json.loads((run_dir / "metrics.json").read_text())["data"]["skipped_rows"]
    assert skipped["count"] == 2 and [line.split(": ")[0] for line in skipped["lines"]] == [
        f"{tmp_path / 'd.jsonl'}:3",
        f"{tmp_path / 'd.jsonl'}:8",
    ]


@pytest.mark.slow
def test_train_test_duplicates_warn_with_counts_and_drop_on_request(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(
        rows(*(mc(i, split="train") for i in range(8)), *(mc(i, split="test") for i in (6, 7, 20, 21)))
    )
    flags = ("--tasks", f"jsonl:{path}", "--test-per-task", "none")
    capsys.readouterr()
    kept = _finished(tiny_model_dir, tmp_path / "kept", *flags)
    err = capsys.readouterr().err
    assert "warning: task 'd': 2 of 8 training examples are also test examples" in err, err
    assert "train lines 7 (test line 9), 8 (test line 10)" in err and "--drop-test-overlap" in err
    data = json.loads((kept / "metrics.json").read_text())["data"]
    assert data["train_test_overlap"] == {"d": 2} and not data["test_overlap_dropped"]

    dropped = _finished(tiny_model_dir, tmp_path / "dropped", *flags, "--drop-test-overlap")
    out = capsys.readouterr()
    assert "note: task 'd': dropped 2 training examples that are also test examples" in out.err
    assert "d (6 train / 4 test)" in out.out
    data = json.loads((dropped / "metrics.json").read_text())["data"]
    assert data["train_test_overlap"] == {"d": 2} and data["test_overlap_dropped"]


@pytest.mark.slow
def test_config_from_stdin_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "comoe",
            "train",
            "--config",
            "/dev/stdin",
            "--output-dir",
            str(tmp_path / "o"),
        ],
        input="max_steps: 0\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "/dev/stdin: max_steps must be >= 1" in proc.stderr, proc.stderr
    assert "no such config file" not in proc.stderr and not (tmp_path / "o").exists()


# --- the command line in real subprocesses: no traceback reaches the terminal ---------------------------
SUBPROCESS_CASES = {
    "yaml-invalid-syntax": (
        yaml_file("r: 4\nlearning_rate: [1, 2\nseed: 3\n"),
        YAML,
        ["{tmp}/c.yaml is not valid YAML at line 3"],
    ),
    "jsonl-mixed-kinds": (
        jsonl_file(mc(1), {"prompt": "Say hi", "target": "hi"}),
        JSONL,
        ["{tmp}/d.jsonl:2: task 'd' mixes multiple choice (line 1) and generation"],
    ),
    "hub-model-offline": (
        None,
        train("--model", "no-such-org/no-such-model"),
        ["model 'no-such-org/no-such-model' could not be loaded", "Give a local model directory"],
    ),
    "eval-adapter-config-corrupted": (
        copied_run("r", lambda r: (r / "adapter" / "adapter_config.json").write_text("{")),
        ["eval", "{tmp}/r"],
        ["{tmp}/r/adapter/adapter_config.json is not valid JSON"],
    ),
    "max-length-beyond-learned-positions": (
        lambda c: save_gpt2_with_real_tokenizer(c.tmp / "gpt2"),
        train("--model", "{tmp}/gpt2", "--target-modules", "c_attn,c_proj", "--max-length", "128"),
        ["--max-length 128 is longer than the model's 64 positions"],
    ),
    "method-moe-lora-contrastive-weight": (
        None,
        train("--method", "moe-lora", "--contrastive-weight", "0.5"),
        ["method 'moe-lora' sets contrastive_weight itself"],
    ),
    **(
        {
            "quantize-nf4-narrow-layers": (
                None,
                train("--quantize", "nf4"),
                ["--quantize nf4: layer model.layers.0.self_attn.q_proj is 32 wide"],
            )
        }
        if HAS_BNB
        else {}
    ),
}


@pytest.fixture(scope="module")
def subprocess_results(tiny_model_dir, finished_run, tmp_path_factory) -> dict:
    """All subprocess cases at once (imports dominate their time), each in its own directory."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("COMOE_DEBUG", None)
    started = {}
    before_run = snapshot(finished_run)
    for name, (setup, argv, _) in SUBPROCESS_CASES.items():
        ctx = Ctx(tmp_path_factory.mktemp(name), tiny_model_dir, finished_run)
        if setup is not None:
            setup(ctx)
        proc = subprocess.Popen(
            [sys.executable, "-m", "comoe", *map(ctx.sub, argv)],
            cwd=ctx.tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[name] = (ctx, snapshot(ctx.tmp), proc)
    results = {}
    for name, (ctx, before, proc) in started.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (ctx, before, proc.returncode, err)
    return {"cases": results, "run_changed": snapshot(finished_run) != before_run}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_cli_subprocess_prints_one_message_not_a_traceback(name, subprocess_results):
    ctx, before, rc, err = subprocess_results["cases"][name]
    assert rc == 2, err
    assert "Traceback" not in err, err
    for fragment in SUBPROCESS_CASES[name][2]:
        assert ctx.sub(fragment) in err, err
    assert not (ctx.tmp / "out").exists()
    assert snapshot(ctx.tmp) == before
    assert not subprocess_results["run_changed"]


# --- the Python API ------------------------------------------------------------------------------------
def api(
    id: str,
    call: Callable[[Ctx], object],
    exc: type[BaseException],
    fragments: list[str],
    setup: Setup | None = None,
    marks=(),
) -> pytest.param:
    return pytest.param(call, exc, fragments, setup, id=id, marks=marks)


def _corrupt(relpath: str, content: str | bytes) -> Callable[[Path], object]:
    def corrupt(directory: Path) -> None:
        path = directory / relpath
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return corrupt


def _unset_layers(directory: Path) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layers": None}))


def _non_finite(directory: Path) -> None:
    """Two NaN and one Inf in two of the adapter's tensors (written back as valid safetensors)."""
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"{PEFT_PREFIX}{Q_A}"][0, :2] = float("nan")
    tensors[f"{PEFT_PREFIX}{V_B}"][1, 0] = float("inf")
    save_file(tensors, path)


def _non_finite_lora(directory: Path) -> None:
    """One NaN in a PEFT LoRA adapter's first A matrix."""
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    name = next(n for n in sorted(tensors) if "q_proj.lora_A" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path)


Q_A = "model.layers.0.self_attn.q_proj.experts.comoe_A"
V_B = "model.layers.1.self_attn.v_proj.experts.comoe_B"
PEFT_PREFIX = "base_model.model."


API_CASES = [
    api(
        "config-weight-quoted",
        lambda c: CoMoEConfig(contrastive_weight="0.1"),
        ValueError,
        ["contrastive_weight must be a number", "write 0.1 without quotes"],
    ),
    api(
        "config-target-regex-invalid",
        lambda c: CoMoEConfig(target_modules="q_proj["),
        ValueError,
        [
            "target_modules 'q_proj['",
            "not a valid regular expression",
            "give a list of module names or a valid regex",
        ],
    ),
    api(
        "config-top-k-above-experts",
        lambda c: CoMoEConfig(top_k=5),
        ValueError,
        ["top_k must be an integer in 1..num_experts=4", "got 5"],
    ),
    api("config-rank-float", lambda c: CoMoEConfig(r=4.0), ValueError, ["r must be an integer", "(write 4)"]),
    api(
        "config-top-k-1-contrastive",
        lambda c: CoMoEConfig(top_k=1),
        ValueError,
        ["top_k must be >= 2", "set contrastive_weight=0"],
    ),
    api(
        "config-soft-routing-contrastive",
        lambda c: CoMoEConfig(routing="soft"),
        ValueError,
        ["routing='soft'", "set contrastive_weight=0"],
    ),
    api(
        "config-layers-negative",
        lambda c: CoMoEConfig(layers=[-1]),
        ValueError,
        ["layers must be a non-empty list of non-negative indices", "[-1]"],
    ),
    api(
        "config-targets-empty",
        lambda c: CoMoEConfig(target_modules=[]),
        ValueError,
        ["target_modules must be a non-empty list of names or a regex string"],
    ),
    api(
        "config-from-dict-unknown",
        lambda c: CoMoEConfig.from_dict({"rr": 4}),
        ValueError,
        ["unknown CoMoEConfig fields ['rr']", "did you mean 'r'"],
    ),
    api(
        "config-json-corrupted",
        lambda c: CoMoEConfig.from_pretrained(c.tmp / "a"),
        ValueError,
        ["{tmp}/a/adapter_config.json is not valid JSON", "re-save the adapter or restore the file"],
        files({"a/adapter_config.json": "{not json"}),
    ),
    api(
        "config-json-array",
        lambda c: CoMoEConfig.from_pretrained(c.tmp / "a"),
        ValueError,
        ["{tmp}/a/adapter_config.json holds a JSON array", "re-save the adapter"],
        files({"a/adapter_config.json": "[1]"}),
    ),
    api(
        "config-json-unknown-field",
        lambda c: CoMoEConfig.from_pretrained(c.tmp / "a"),
        ValueError,
        ["{tmp}/a/adapter_config.json", "unknown CoMoEConfig fields ['rr']", "did you mean 'r'"],
        files({"a/adapter_config.json": '{"peft_type": "COMOE", "rr": 4}'}),
    ),
    api(
        "config-dir-missing",
        lambda c: CoMoEConfig.from_pretrained(c.tmp / "nowhere"),
        FileNotFoundError,
        ["no adapter_config.json in {tmp}/nowhere", "not a comoe adapter directory"],
    ),
    api(
        "wrap-targets-match-nothing",
        lambda c: get_comoe_model(c.base, tiny_comoe_config("llama", target_modules=["nosuch"])),
        ValueError,
        ["target_modules=['nosuch'] matched no", "LlamaForCausalLM", "q_proj", "down_proj", "lm_head"],
    ),
    api(
        "wrap-regex-matches-nothing",
        lambda c: get_comoe_model(c.base, tiny_comoe_config("llama", target_modules=r".*\.nosuch")),
        ValueError,
        ["matched no nn.Linear/Conv1D module", "q_proj"],
    ),
    api(
        "wrap-layers-beyond-model",
        lambda c: get_comoe_model(c.base, tiny_comoe_config("llama", layers=[5])),
        ValueError,
        ["layers [5] do not exist", "2 layers (0..1)"],
    ),
    api(
        "load-adapter-shape-mismatch",
        lambda c: CoMoEModel.from_pretrained(c.base, c.tmp / "adapter"),
        AdapterLoadError,
        [
            "{tmp}/adapter/adapter_model.safetensors",
            "has shape (16, 64) but this model expects (16, 32)",
            "nothing was loaded",
        ],
        saved_adapter("adapter", hidden=64),
    ),
    api(
        "load-adapter-tensors-missing",
        lambda c: CoMoEModel.from_pretrained(c.base, c.tmp / "adapter"),
        AdapterLoadError,
        ["does not fit this model", "missing tensors ['model.layers.1.", "nothing was loaded"],
        saved_adapter("adapter", layers=[0], then=_unset_layers),
    ),
    api(
        "load-adapter-weights-garbage",
        lambda c: CoMoEModel.from_pretrained(c.base, c.tmp / "adapter"),
        AdapterLoadError,
        ["{tmp}/adapter/adapter_model.safetensors: not a readable safetensors file"],
        saved_adapter("adapter", then=_corrupt("adapter_model.safetensors", b"garbage")),
    ),
    api(
        "load-adapter-weights-missing",
        lambda c: CoMoEModel.from_pretrained(c.base, c.tmp / "adapter"),
        FileNotFoundError,
        ["no adapter_model.safetensors in {tmp}/adapter"],
        saved_adapter("adapter", then=lambda d: (d / "adapter_model.safetensors").unlink()),
    ),
    api(
        "load-adapted-model-corrupted",
        lambda c: load_adapted_model(c.base, c.tmp / "adapter"),
        ValueError,
        ["{tmp}/adapter/adapter_config.json is not valid JSON", "re-save the adapter"],
        saved_adapter("adapter", then=_corrupt("adapter_config.json", "{")),
    ),
    api(
        "load-adapted-model-lora-weights-garbage",
        lambda c: load_adapted_model(c.base, c.tmp / "adapter"),
        AdapterLoadError,
        ["{tmp}/adapter/adapter_model.safetensors: not a readable safetensors file", "nothing was loaded"],
        saved_lora_adapter("adapter", then=_corrupt("adapter_model.safetensors", b"garbage")),
    ),
    api(
        "load-adapted-model-lora-config-array",
        lambda c: load_adapted_model(c.base, c.tmp / "adapter"),
        ValueError,
        ["{tmp}/adapter/adapter_config.json holds a JSON array", "re-save the adapter"],
        saved_lora_adapter("adapter", then=_corrupt("adapter_config.json", "[1]")),
    ),
    api(
        "load-adapted-model-lora-no-peft-type",
        lambda c: load_adapted_model(c.base, c.tmp / "adapter"),
        ValueError,
        ['{tmp}/adapter/adapter_config.json has no "peft_type"'],
        saved_lora_adapter("adapter", then=_corrupt("adapter_config.json", '{"r": 2}')),
    ),
    api(
        "load-adapted-model-lora-wrong-shapes",
        lambda c: load_adapted_model(c.base, c.tmp / "adapter"),
        AdapterLoadError,
        ["{tmp}/adapter: PEFT could not load this LORA adapter", "size mismatch"],
        saved_lora_adapter("adapter", then=_reshaped_tensors),
    ),  # the base is put back as it was
    api(
        "load-adapted-model-lora-weights-missing",
        lambda c: load_adapted_model(c.base, c.tmp / "adapter"),
        FileNotFoundError,
        ["no adapter_model.safetensors in {tmp}/adapter"],
        saved_lora_adapter("adapter", then=lambda d: (d / "adapter_model.safetensors").unlink()),
    ),
    api(
        "load-task-jsonl-partial-splits",
        lambda c: load_task(f"jsonl:{c.tmp / 'd.jsonl'}"),
        DataError,
        ['{tmp}/d.jsonl:1: this line has no "split" but line 2 has one'],
        jsonl_file(mc(1), mc(2, split="test")),
    ),
    api(
        "load-task-jsonl-task-path-like",
        lambda c: load_task(f"jsonl:{c.tmp / 'd.jsonl'}"),
        DataError,
        ["{tmp}/d.jsonl:1: 'task' 'a/../../b' is not a plain name"],
        jsonl_file(mc(1, task="a/../../b")),
    ),
    api(
        "load-task-jsonl-empty",
        lambda c: load_task("jsonl:"),
        ValueError,
        ["task 'jsonl:' names no file", "write jsonl:PATH"],
    ),
    api(
        "load-task-unknown",
        lambda c: load_task("nosuch"),
        ValueError,
        ["unknown task 'nosuch'", "built-in suite", "jsonl:PATH"],
    ),
    api(
        "load-task-bad-split",
        lambda c: load_task("strategyqa", "validation"),
        ValueError,
        ["built-in task 'strategyqa' has splits train, test", "'validation'"],
    ),
    api(
        "load-task-hub-offline",
        lambda c: load_task("arc_e", "test"),
        ConnectionError,
        ["paper benchmark 'arc_e'", "HF_HUB_OFFLINE=1", "Offline alternatives", "data_files="],
    ),
    api(
        "load-task-bad-line",
        lambda c: load_task(f"jsonl:{c.tmp / 'd.jsonl'}"),
        DataError,
        ["{tmp}/d.jsonl:2: missing field 'answer'"],
        jsonl_file(mc(1), {"question": "q", "choices": ["a", "b"]}),
    ),
    api(
        "runconfig-max-steps-0",
        lambda c: RunConfig(max_steps=0),
        ValueError,
        ["max_steps must be >= 1", "or none"],
    ),
    api(
        "runconfig-tasks-twice",
        lambda c: RunConfig(tasks=["a", "a"]),
        ValueError,
        ["task 'a' is named twice", "name each task once"],
    ),
    api(
        "runconfig-tasks-empty", lambda c: RunConfig(tasks=[]), ValueError, ["tasks is empty", "comoe tasks"]
    ),
    api(
        "runconfig-learning-rate-quoted",
        lambda c: RunConfig(learning_rate="1e-3"),
        ValueError,
        ["learning_rate must be a number", "write 1e-3 without quotes"],
    ),
    api(
        "runconfig-unknown-field",
        lambda c: RunConfig.from_dict({"learning_rat": 1}),
        ValueError,
        ["unknown fields ['learning_rat']", "did you mean 'learning_rate'"],
    ),
    # adapters: values that cannot be right, a second method on top, a newer comoe's file
    api(
        "load-adapter-non-finite",
        lambda c: CoMoEModel.from_pretrained(c.base, c.tmp / "adapter"),
        AdapterLoadError,
        [
            "{tmp}/adapter/adapter_model.safetensors: 3 non-finite values (NaN or Inf) in 2 tensors",
            f"{Q_A} (2)",
            f"{V_B} (1)",
            "nothing was loaded",
            "load an earlier checkpoint",
        ],
        saved_adapter("adapter", then=_non_finite),
    ),
    api(
        "load-adapted-model-non-finite",
        lambda c: load_adapted_model(c.base, c.tmp / "adapter"),
        AdapterLoadError,
        ["3 non-finite values (NaN or Inf) in 2 tensors", f"{Q_A} (2)", "nothing was loaded"],
        saved_adapter("adapter", then=_non_finite),
    ),
    api(
        "load-adapted-model-lora-non-finite",
        lambda c: load_adapted_model(c.base, c.tmp / "adapter"),
        AdapterLoadError,
        [
            "{tmp}/adapter/adapter_model.safetensors: 1 non-finite value (NaN or Inf) in 1 tensor:",
            "q_proj.lora_A.weight (1)",
            "nothing was loaded",
        ],
        saved_lora_adapter("adapter", then=_non_finite_lora),
    ),
    api(
        "peft-load-non-finite",
        lambda c: PeftModel.from_pretrained(c.base, str(c.tmp / "adapter")),
        AdapterLoadError,
        ["the adapter checkpoint: 3 non-finite values (NaN or Inf) in 2 tensors", f"{Q_A} (2)"],
        saved_adapter("adapter", then=_non_finite),
    ),  # PEFT's own loader goes through the tuner's check, which gives the base back as it was
    api(
        "peft-load-shape-mismatch",
        lambda c: PeftModel.from_pretrained(c.base, str(c.tmp / "adapter"), is_trainable=True),
        AdapterLoadError,
        ["the adapter checkpoint: tensor", "has shape (16, 64) but this model expects (16, 32)"],
        saved_adapter("adapter", hidden=64),
    ),
    api(
        "peft-lora-on-a-comoe-model",
        lambda c: get_peft_model(
            get_comoe_model(build("llama"), tiny_comoe_config("llama")),
            LoraConfig(r=2, target_modules=["q_proj"]),
        ),
        ValueError,
        [
            "this model holds a CoMoE adapter",
            "PEFT cannot add a LORA adapter (LoraConfig) on top of it",
            "Apply LoraConfig to the original base model",
            "unload()",
        ],
    ),
    api(
        "config-json-newer-comoe",
        lambda c: CoMoEConfig.from_pretrained(c.tmp / "a"),
        ValueError,
        [
            "{tmp}/a/adapter_config.json",
            f"saved by comoe 9.0.0, newer than this comoe ({comoe.__version__})",
            "['expert_groups']",
            "pip install 'comoe>=9.0.0'",
        ],
        files(
            {
                "a/adapter_config.json": json.dumps(
                    {"peft_type": "COMOE", "comoe_version": "9.0.0", "expert_groups": 2}
                )
            }
        ),
    ),
]


@pytest.mark.parametrize("call, exc, fragments, setup", API_CASES)
def test_api_refuses_bad_input(call, exc, fragments, setup, tmp_path, monkeypatch):
    cli_runs.go_offline(monkeypatch)
    ctx = Ctx(tmp_path, Path("/nonexistent-model"), Path("/nonexistent-run"), base=build("llama"))
    if setup is not None:
        setup(ctx)
    weights = {name: tensor.clone() for name, tensor in ctx.base.state_dict().items()}
    kinds = [type(m) for m in ctx.base.modules()]
    attributes = model_facts(ctx.base)
    before = snapshot(tmp_path)

    with pytest.raises(exc) as info:
        call(ctx)

    for fragment in fragments:
        assert ctx.sub(fragment) in str(info.value)
    assert snapshot(tmp_path) == before, "files were written or changed"
    after = ctx.base.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[name], weights[name]) for name in weights), (
        "the base model's weights changed"
    )
    assert [type(m) for m in ctx.base.modules()] == kinds
    assert not any(isinstance(m, CoMoELayer) for m in ctx.base.modules())
    assert model_facts(ctx.base) == attributes, "the base model's attributes, flags or hooks changed"


def model_facts(model: torch.nn.Module) -> dict:
    """What a refused call must leave as it was: every module's attribute names and hooks, every
    parameter's requires_grad, the training flag."""
    return {
        "attributes": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "hooks": {
            name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()
        },
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": model.training,
    }


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(
            lambda base, tmp: CoMoEModel.from_pretrained(base, tmp / "adapter"),
            id="from-pretrained-shape-mismatch",
        ),
        pytest.param(
            lambda base, tmp: get_comoe_model(base, tiny_comoe_config("llama", target_modules=["nosuch"])),
            id="get-comoe-model-no-match",
        ),
    ],
)
def test_refused_wrap_leaves_the_base_trainable(wrap, tmp_path):
    saved_adapter("adapter", hidden=64)(Ctx(tmp_path, Path(), Path()))
    base = build("llama")
    with pytest.raises(ValueError):
        wrap(base, tmp_path)
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 2 only"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
            "--gradient-checkpointing",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"},
            "ZeRO stages 1, 2 and 3",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"},
            "zero3_init_flag: false",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "nvme"},
            "offload_optimizer_device: 'nvme'",
        ),
    ],
    ids=["fsdp1", "fsdp-activation-checkpointing", "zero-stage-0", "zero3-init", "zero-nvme-offload"],
)
def test_sharded_launches_comoe_cannot_follow_are_refused_before_any_work(
    env, expected, tmp_path, monkeypatch, capsys
):
    """What `accelerate launch` sets for these configs (FSDP2 itself trains: tests/training/test_sharded.py):
    `comoe train` stops at once with one line naming the reason, writing nothing."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    assert main(["train", "--tasks", "winowhy", "--output-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "env, flags, expected",
    [
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
            ["--quantize", "int8"],
            "quantize='int8' under FSDP",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
            ["--quantize", "nf4"],
            "quantize='nf4' under DeepSpeed ZeRO-2",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            ["--compile"],
            "compile=true under DeepSpeed ZeRO-3",
        ),
    ],
    ids=["int8-under-fsdp", "quantize-under-zero", "compile-under-zero3"],
)
def test_what_cannot_run_sharded_is_refused_before_any_work(
    env, flags, expected, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("bitsandbytes" if "--quantize" in flags else "deepspeed")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    assert main(["train", "--tasks", "winowhy", *flags, "--output-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and not run_dir.exists()


def test_other_distributed_types_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """A launch type `comoe train` has no path for (simulated: it cannot be launched here)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.MEGATRON_LM))
    run_dir = tmp_path / "run"
    assert main(["train", "--tasks", "winowhy", "--output-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "one process, with DDP, FSDP2 or DeepSpeed ZeRO" in err and "examples/accelerate" in err
    assert not run_dir.exists()


# --- adapters: stacking, the auxiliary loss left out, old names, a process without `import comoe` -----------
def _batch() -> dict[str, torch.Tensor]:
    ids = torch.arange(1, 25).reshape(2, 12) % 97
    return {"input_ids": ids, "labels": ids}


def test_a_refused_lora_leaves_the_comoe_model_working():
    model = get_comoe_model(build("llama"), tiny_comoe_config("llama"))
    model.eval()
    with torch.no_grad():
        before = model(**_batch()).logits
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="holds a CoMoE adapter"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert [type(m) for m in model.modules()] == kinds
    assert {name: type(c).__name__ for name, c in model.peft_config.items()} == {"default": "CoMoEConfig"}
    with torch.no_grad():
        torch.testing.assert_close(model(**_batch()).logits, before, rtol=0, atol=0)
    model.train()
    assert model(**_batch()).contrastive_loss > 0  # the hooks still read a CoMoEConfig


def _train_steps(model, loss_of, steps: int = 3) -> list[str]:
    """``steps`` optimiser-free training steps with ``loss_of(outputs)`` as the loss; comoe's warnings."""
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            loss_of(model(**_batch())).backward()
    return [str(w.message) for w in caught if str(w.message).startswith("comoe:")]


@pytest.mark.parametrize(
    "loss_of, weight, warns",
    [
        pytest.param(
            lambda out: out.logits.float().logsumexp(-1).mean(), 0.5, True, id="own-loss-without-aux"
        ),
        pytest.param(lambda out: out.loss, 0.5, False, id="outputs-loss"),
        pytest.param(
            lambda out: out.logits.float().logsumexp(-1).mean() + out.aux_loss, 0.5, False, id="own+aux"
        ),
        pytest.param(lambda out: out.logits.float().logsumexp(-1).mean(), 0.0, False, id="lambda-0"),
    ],
)
def test_a_training_loss_without_the_aux_loss_warns_once(loss_of, weight, warns):
    model = get_comoe_model(build("llama"), tiny_comoe_config("llama", contrastive_weight=weight))
    caught = _train_steps(model, loss_of)
    assert len(caught) == (1 if warns else 0), caught
    if warns:
        assert "contrastive_weight=0.5" in caught[0] and "comoe.sft.CoMoESFTTrainer" in caught[0]
        assert "model.get_aux_loss()" in caught[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainer, weight, warns", [("SFTTrainer", 0.5, True), ("CoMoESFTTrainer", 0.5, False)]
)
def test_plain_sft_trainer_warns_that_it_trains_without_the_contrastive_term(
    tiny_model_dir, tmp_path, trainer, weight, warns
):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from comoe.sft import CoMoESFTTrainer

    cls = {"SFTTrainer": SFTTrainer, "CoMoESFTTrainer": CoMoESFTTrainer}[trainer]
    run = cls(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=SFTConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=3,
            per_device_train_batch_size=2,
            max_length=16,
            report_to="none",
            save_strategy="no",
            bf16=False,
        ),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=Dataset.from_dict({"text": ["the cat sat on the mat", "bees make honey"] * 3}),
        peft_config=tiny_comoe_config("llama", contrastive_weight=weight),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.train()
    ours = [str(w.message) for w in caught if str(w.message).startswith("comoe:")]
    assert len(ours) == (1 if warns else 0), ours
    if warns:
        assert "CoMoESFTTrainer" in ours[0]


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("comoe.adapters", "load_adapted_model", "comoe.training.adapters"),
        ("comoe.train", "train_adapter", "comoe.training.loop"),
        ("comoe.runconfig", "RunConfig", "comoe.training.run_config"),
        ("comoe.models", "load_base_model", "comoe.training.base_models"),
        ("comoe.job", "run_job", "comoe.training.job"),
        ("comoe.checkpoint", "save_checkpoint", "comoe.training.checkpoint"),
        ("comoe.evaluate", "evaluate_tasks", "comoe.evaluation.scoring"),
        ("comoe.batching", "collate", "comoe.data.batching"),
        ("comoe.compare", "paired_bootstrap", "comoe.experiments.stats"),
        ("comoe.data.bigbench", "SuiteTask", "comoe.data.suites"),
        ("comoe.analysis", "entropy", "comoe.analysis.metrics"),
        ("comoe.validation", "did_you_mean", "comoe.utils.validation"),
        ("comoe.files", "write_json_atomic", "comoe.utils.files"),
    ],
)
def test_old_module_paths_still_import_with_a_warning_naming_the_new_one(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(FutureWarning, match=f"{old}.{name} is deprecated .* use {new}.{name}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)


def test_every_old_module_path_imports_and_its_homes_exist():
    from comoe.moved import ANALYSIS_MODULES, MOVED

    for old, homes in MOVED.items():
        assert importlib.import_module(old).__name__ == old
        for home in homes:
            importlib.import_module(home)
    for home in ANALYSIS_MODULES:
        importlib.import_module(home)
    with pytest.raises(AttributeError, match="comoe.training.adapters"):
        importlib.import_module("comoe.adapters").no_such_name  # noqa: B018


def test_outputs_aux_losses_still_reads_with_a_warning_naming_the_fields():
    model = get_comoe_model(build("llama"), tiny_comoe_config("llama"))
    model.train()
    out = model(**_batch())
    with pytest.warns(
        FutureWarning, match="read outputs.contrastive_loss instead of outputs.aux_losses.contrastive"
    ):
        contrastive = out.aux_losses.contrastive
    assert contrastive is out.contrastive_loss
    with pytest.warns(FutureWarning, match="outputs.aux_loss"):
        assert out.aux_losses.total is out.aux_loss
    assert "aux_losses" not in out  # an attribute only: wrappers that rebuild outputs drop it


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env)


ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


@pytest.mark.slow
def test_a_process_without_import_comoe_meets_comoe_in_the_adapter_directory(tiny_model_dir, tmp_path):
    """PEFT has no hook that finds a method from outside its source tree, so a process that has not
    imported comoe meets PEFT's own KeyError; what comoe controls is what the user then opens: the
    adapter's files name comoe and its README says to import it first. After ``import comoe`` the three
    ways PEFT loads an adapter work, AutoPeftModelForCausalLM included (from the base class comoe records)."""
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_comoe_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_comoe_config("llama")
    ).save_pretrained(adapter)
    load = (
        "from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        f"print(type(PeftConfig.from_pretrained({str(adapter)!r})).__name__)\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})\n"
        f"print(type(PeftModel.from_pretrained(base, {str(adapter)!r}).base_model).__name__)\n"
        f"print(type(AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r}).base_model).__name__)\n"
    )
    without = _python(load, ROOT)
    assert without.returncode != 0 and "KeyError: 'COMOE'" in without.stderr
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "COMOE" and config["comoe_version"] == comoe.__version__
    first_screen = (adapter / "README.md").read_text().splitlines()[:8]
    assert any("`import comoe` first" in line and "KeyError: 'COMOE'" in line for line in first_screen)
    assert any(line.startswith("import comoe") for line in first_screen)

    with_import = _python("import comoe\n" + load, ROOT)
    assert with_import.returncode == 0, with_import.stderr
    assert with_import.stdout.split() == ["CoMoEConfig", "CoMoETuner", "CoMoETuner"]


@pytest.mark.slow
def test_bitsandbytes_kernel_notice_is_not_printed():
    pytest.importorskip("bitsandbytes")
    notice = "Failed to load CPU gemm_4bit_forward"
    plain = _python("import bitsandbytes", ROOT)
    if notice not in plain.stderr:
        pytest.skip("this machine's bitsandbytes prints no kernel notice (no AVX512-BF16 CPU kernel path)")
    cli = subprocess.Popen(  # beside the next one: imports dominate both
        [sys.executable, "-m", "comoe", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    quant = _python(
        "import torch, comoe\n"
        "from comoe.training.base_models import quantization_config\n"
        "import bitsandbytes\n"
        "print(type(quantization_config('nf4', torch.float32)).__name__)\n",
        ROOT,
    )
    assert quant.returncode == 0 and quant.stdout.strip() == "BitsAndBytesConfig", quant.stderr
    assert notice not in quant.stdout + quant.stderr
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0 and notice not in out + err
