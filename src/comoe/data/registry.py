"""One entry point for every task: the built-in offline suite, the paper's benchmarks, your own files.

>>> train = load_task("strategyqa", "train", limit=200)
>>> test = load_task("arc_e", "test")                  # Hugging Face hub (network)
>>> mine = load_task("jsonl:data/my_task.jsonl")       # schema: comoe.data.jsonl
>>> hard = load_task("suite:hard", "test")              # every task of a built-in suite, each by its name
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from comoe.data.hub import BENCHMARKS, PAPER_BENCHMARKS, load_benchmark
from comoe.data.jsonl import parse_jsonl, read_jsonl
from comoe.data.schema import Example
from comoe.data.suites import BUILTIN_TASKS, DEFAULT_SUITE, DEFAULT_SUITE_TASKS, SUITE_NAMES

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_SUITE_TASKS",
    "PAPER_BENCHMARKS",
    "SUITE_NAMES",
    "SUITE_PREFIX",
    "SUITE_SPLITS",
    "list_tasks",
    "load_task",
    "subset",
    "suite_specs",
]

# The old name of DEFAULT_SUITE_TASKS, read by comoe.training.run_config; comoe.data.BUILTIN_SUITE warns
BUILTIN_SUITE = DEFAULT_SUITE_TASKS
SUITE_SPLITS = ("train", "test")
JSONL_PREFIX = "jsonl:"
SUITE_PREFIX = "suite:"  # "suite:hard" names every task of a built-in suite
HELD_OUT_SHARE = 0.2  # of a JSONL file without `split` fields, the share of distinct inputs kept for "test"
_SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation", "eval": "test"}
_NAME_ALIASES = {
    "arc_easy": "arc_e",
    "arc_challenge": "arc_c",
    "openbookqa": "obqa",
    "social_i_qa": "siqa",
}


def suite_specs() -> tuple[str, ...]:
    """The built-in suites as ``--tasks`` names: ``suite:learnable`` (the default), ``suite:hard``."""
    return tuple(SUITE_PREFIX + name for name in SUITE_NAMES)


def list_tasks() -> tuple[str, ...]:
    """Everything ``--tasks`` can name: the built-in suites, their tasks (offline), the paper benchmarks (hub)."""
    return suite_specs() + BUILTIN_TASKS + PAPER_BENCHMARKS


def load_task(
    name: str,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    *,
    data_files: str | Path | list | dict | None = None,
    skipped: list[str] | None = None,
) -> list[Example]:
    """Load one split of a task as a list of :class:`Example`.

    ``name``: a built-in task (``BUILTIN_TASKS``, splits train/test, offline), a whole built-in suite as
    ``suite:NAME`` (``SUITE_NAMES``: "learnable", the default tasks ``DEFAULT_SUITE_TASKS``, "hard" and "math"; its
    tasks' examples one after another, ``limit`` applied per task), a paper benchmark
    (``PAPER_BENCHMARKS``, splits train/validation/test, from the Hugging Face hub or from
    ``data_files`` in the hub's schema), or a JSONL file as ``jsonl:PATH`` or a path ending in
    ``.jsonl`` (see :func:`held_out_split` for a file without ``split`` fields). ``limit`` keeps a
    seeded random subset of that many examples, in file order. Given a list as ``skipped``, the invalid
    lines of a JSONL file are left out and their messages appended to it, instead of refused.
    """
    split = _SPLIT_ALIASES.get(split, split)
    suite = suite_name(name)
    if suite is not None:
        return [e for task in SUITE_NAMES[suite] for e in load_task(task, split, limit, seed)]
    if is_jsonl_spec(name):
        examples = _load_user_file(jsonl_path(name), split, skipped)
    else:
        key = name.strip().lower().replace("-", "_")
        key = _NAME_ALIASES.get(key, key)
        if data_files is not None and key not in BENCHMARKS:
            raise ValueError(f"data_files= is only for the paper benchmarks ({', '.join(PAPER_BENCHMARKS)})")
        if key in BUILTIN_TASKS:
            examples = _load_suite(key, split)
        elif key in BENCHMARKS:
            examples = load_benchmark(key, split, data_files=data_files)
        else:
            raise ValueError(_unknown(name))
    return subset(examples, limit, seed)


def load_splits(
    specs: list[str],
    train_per_task: int | None,
    test_per_task: int | None,
    seed: int,
    **options: bool,
) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """Train and test examples per task name (see `load_run_data`, which takes the same ``options``)."""
    data = load_run_data(specs, train_per_task, test_per_task, seed, **options)
    return data.train, data.test


@dataclass
class RunData:
    """A run's examples per task, and what was noticed loading them."""

    train: dict[str, list[Example]]
    test: dict[str, list[Example]]
    origin: dict[str, str]  # task -> the --tasks spec that holds it
    skipped: list[str] = field(default_factory=list)  # "path:line: what is wrong" of each skipped line
    # task -> (training example, the test example with the same input): in training, or dropped from it
    overlap: dict[str, list[tuple[Example, Example]]] = field(default_factory=dict)
    dropped_overlap: bool = False
    val: dict[str, list[Example]] = field(default_factory=dict)  # held out of the training examples


def load_run_data(
    specs: list[str],
    train_per_task: int | None,
    test_per_task: int | None,
    seed: int,
    *,
    skip_invalid_rows: bool = False,
    drop_test_overlap: bool = False,
    val_per_task: int = 0,
) -> RunData:
    """Train and test examples per task name: a seeded subset of train, the test examples by a fixed
    seed; every file is validated before any model is loaded.

    A task's name is its built-in name, or for a JSONL file the ``task`` field of its lines or else the
    file name without ``.jsonl``; one file may hold several tasks, and two specs may not share a name.
    ``skip_invalid_rows`` leaves out a JSONL file's invalid lines (listed in ``skipped``) instead of
    refusing the file. Training examples whose input (task, question, options) is also a chosen test
    example's are listed in ``overlap``; ``drop_test_overlap`` drops them before the training subset is
    drawn. ``val_per_task`` examples of each task are held out of the training examples (seeded, before
    the training subset is drawn) as its validation examples.
    """
    found: dict[str, dict[str, list[Example]]] = {"train": {}, "test": {}}
    origin: dict[str, str] = {}
    skipped: list[str] | None = [] if skip_invalid_rows else None
    for spec in specs:
        for split in ("train", "test"):
            for name, examples in _by_task(load_task(spec, split, skipped=skipped)).items():
                if origin.setdefault(name, spec) != spec:
                    raise ValueError(
                        f"tasks {origin[name]!r} and {spec!r} both hold a task named {name!r} (a JSONL task is named "
                        'by its lines\' "task" field, else by its file name): rename a file or set "task"'
                    )
                found[split][name] = examples
    for name in set(found["train"]) ^ set(found["test"]):
        has, lacks = ("train", "test") if name in found["train"] else ("test", "train")
        raise ValueError(
            f"task {name!r} of {origin[name]!r} has {has} examples but no {lacks} examples; "
            f'give some of its lines "split": "{lacks}"'
        )
    data = RunData({}, {}, origin, list(dict.fromkeys(skipped or [])), dropped_overlap=drop_test_overlap)
    for name, examples in found["train"].items():
        test = data.test[name] = subset(found["test"][name], test_per_task, 0)
        tested = {_input_key(ex): ex for ex in test}
        if drop_test_overlap:
            kept = [ex for ex in examples if _input_key(ex) not in tested]
            if not kept:
                raise ValueError(
                    f"task {name!r} of {origin[name]!r}: every training example is also a test example, so "
                    "--drop-test-overlap leaves none; give it training examples of its own"
                )
            pairs = [(ex, tested[_input_key(ex)]) for ex in examples if _input_key(ex) in tested]
            examples = kept
        if val_per_task:
            data.val[name], examples = _hold_out(
                examples, val_per_task, seed, f"task {name!r} of {origin[name]!r}"
            )
        data.train[name] = subset(examples, train_per_task, seed)
        if not drop_test_overlap:
            pairs = [(ex, tested[_input_key(ex)]) for ex in data.train[name] if _input_key(ex) in tested]
        if pairs:
            data.overlap[name] = pairs
    return data


def _by_task(examples: list[Example]) -> dict[str, list[Example]]:
    grouped: dict[str, list[Example]] = {}
    for example in examples:
        grouped.setdefault(example.task, []).append(example)
    return grouped


def _hold_out(
    examples: list[Example], count: int, seed: int, what: str
) -> tuple[list[Example], list[Example]]:
    """(``count`` examples drawn by ``seed``, the others), each in their original order."""
    if count >= len(examples):
        raise ValueError(
            f"{what}: val_per_task={count} holds out all {len(examples)} of its training examples; "
            "lower --val-per-task so that some are left to train on"
        )
    held = set(random.Random(f"validation-{seed}").sample(range(len(examples)), count))
    return (
        [ex for i, ex in enumerate(examples) if i in held],
        [ex for i, ex in enumerate(examples) if i not in held],
    )


def subset(examples: list[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """A seeded random subset of ``limit`` examples, kept in their original order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def _load_suite(name: str, split: str) -> list[Example]:
    if split not in SUITE_SPLITS:
        raise ValueError(f"built-in task {name!r} has splits {', '.join(SUITE_SPLITS)}, not {split!r}")
    resource = files("comoe.data").joinpath("suite", f"{name}.jsonl")
    examples = parse_jsonl(resource.read_bytes(), source=f"comoe/data/suite/{name}.jsonl", default_task=name)
    return [e for e in examples if e.meta.get("split") == split]


def suite_name(name: str) -> str | None:
    """The built-in suite a ``suite:NAME`` spec names (None for any other name); unknown suites raise."""
    text = name.strip().lower()
    if not text.startswith(SUITE_PREFIX):
        return None
    suite = text[len(SUITE_PREFIX) :].strip().replace("-", "_")
    if suite not in SUITE_NAMES:
        raise ValueError(
            f"unknown suite {name.strip()!r}: the built-in suites are {', '.join(suite_specs())} "
            f"({DEFAULT_SUITE!r} holds the default tasks)"
        )
    return suite


def is_jsonl_spec(name: str) -> bool:
    """Whether a task name names a user's JSONL file (``jsonl:PATH`` or a path ending in ``.jsonl``)."""
    name = name.strip()
    return name.startswith(JSONL_PREFIX) or name.endswith(".jsonl")


def jsonl_path(name: str) -> Path:
    """The file a JSONL task spec names; a clear error for an empty spec."""
    text = name.strip()
    text = text[len(JSONL_PREFIX) :] if text.startswith(JSONL_PREFIX) else text
    if not text.strip():
        raise ValueError(f"task {name!r} names no file: write jsonl:PATH, e.g. jsonl:data/my_task.jsonl")
    return Path(text.strip()).expanduser()


def canonical_task_key(name: str) -> str:
    """What makes two task names the same task: ``jsonl:`` + the resolved path of a JSONL file, else the
    name as ``load_task`` resolves it (lower case, ``-`` as ``_``, aliases such as arc_easy -> arc_e)."""
    if is_jsonl_spec(name):
        return JSONL_PREFIX + str(jsonl_path(name).resolve())
    key = name.strip().lower().replace("-", "_")
    return _NAME_ALIASES.get(key, key)


def held_out_split(examples: list[Example], split: str, source: str) -> list[Example]:
    """The ``split`` ("train" or "test") of a file that has no ``split`` fields.

    Per task of the file: its distinct inputs (question + options) are ordered by a hash of their text
    and the first ``HELD_OUT_SHARE`` of them (at least one) are "test": deterministic, independent of
    the line order, every task has test lines, and no input is in both splits, so a run never scores
    its adapter on examples it trained on. A task with fewer than 2 distinct inputs is refused.
    """
    if split not in SUITE_SPLITS:
        raise ValueError(
            f"{source} has no 'split' fields, so it has only the splits {SUITE_SPLITS} "
            f"(test = {HELD_OUT_SHARE:.0%} of each task's inputs); not {split!r}"
        )
    by_task: dict[str, set[str]] = {}
    for example in examples:
        by_task.setdefault(example.task, set()).add(_input_key(example))
    test_keys: set[str] = set()
    for task, task_keys in by_task.items():
        if len(task_keys) < 2:
            raise ValueError(
                f"{source}: task {task!r} has {len(task_keys)} distinct input; a file without 'split' fields needs "
                "at least 2 distinct inputs per task to hold one out for testing; add lines to that task, or give "
                'every line of the file a "split": "train" or "test"'
            )
        ordered = sorted(task_keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
        test_keys.update(ordered[: max(1, math.floor(HELD_OUT_SHARE * len(ordered)))])
    return [e for e in examples if (_input_key(e) in test_keys) == (split == "test")]


def _input_key(example: Example) -> str:
    return "\x1f".join((example.task, example.question, *example.choices))


def _load_user_file(path: Path, split: str, skipped: list[str] | None = None) -> list[Example]:
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory; name a JSONL file in it, e.g. jsonl:{path / 'my_task.jsonl'}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path} (relative paths start at {Path.cwd()})")
    examples = read_jsonl(path, skipped=skipped)  # refuses a file where only some lines have a "split"
    splits = {e.meta.get("split") for e in examples} - {None}
    if not splits:
        return held_out_split(examples, split, str(path))
    if split not in splits:
        raise ValueError(
            f"{path}: no lines with split {split!r}; the file has {', '.join(sorted(splits))}: give some "
            f'lines "split": "{split}", or drop every "split" to hold out part of the file for test'
        )
    return [e for e in examples if e.meta.get("split") == split]


def _unknown(name: str) -> str:
    suites = "".join(
        f"  built-in suite {suite!r} (offline): {', '.join(tasks)}\n" for suite, tasks in SUITE_NAMES.items()
    )
    return (
        f"unknown task {name!r}.\n"
        f"  a whole built-in suite: {', '.join(suite_specs())}\n"
        f"{suites}"
        f"  paper benchmarks (Hugging Face hub): {', '.join(PAPER_BENCHMARKS)}\n"
        f"  your own file: 'jsonl:PATH' or a path ending in .jsonl (schema: comoe.data.jsonl)"
    )
