"""One entry point for every task: the built-in offline suite, the paper's benchmarks, your own files.

>>> train = load_task("strategyqa", "train", limit=200)
>>> test = load_task("arc_e", "test")                  # Hugging Face hub (network)
>>> mine = load_task("jsonl:data/my_task.jsonl")       # schema: comoe.data.jsonl
"""

from __future__ import annotations

import hashlib
import math
import random
from importlib.resources import files
from pathlib import Path

from comoe.data.bigbench import BUILTIN_SUITE
from comoe.data.hub import BENCHMARKS, PAPER_BENCHMARKS, load_benchmark
from comoe.data.jsonl import parse_jsonl, read_jsonl
from comoe.data.schema import Example

__all__ = ["BUILTIN_SUITE", "PAPER_BENCHMARKS", "SUITE_SPLITS", "list_tasks", "load_task", "subset"]

SUITE_SPLITS = ("train", "test")
JSONL_PREFIX = "jsonl:"
HELD_OUT_SHARE = 0.2  # of a JSONL file without `split` fields, the share of distinct inputs kept for "test"
_SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation", "eval": "test"}
_NAME_ALIASES = {
    "arc_easy": "arc_e",
    "arc_challenge": "arc_c",
    "openbookqa": "obqa",
    "social_i_qa": "siqa",
}


def list_tasks() -> tuple[str, ...]:
    """Every named task: the built-in suite (offline) first, then the paper benchmarks (hub)."""
    return BUILTIN_SUITE + PAPER_BENCHMARKS


def load_task(
    name: str,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    *,
    data_files: str | Path | list | dict | None = None,
) -> list[Example]:
    """Load one split of a task as a list of :class:`Example`.

    ``name``: a built-in suite task (``BUILTIN_SUITE``, splits train/test, offline), a paper benchmark
    (``PAPER_BENCHMARKS``, splits train/validation/test, from the Hugging Face hub or from
    ``data_files`` in the hub's schema), or a JSONL file as ``jsonl:PATH`` or a path ending in
    ``.jsonl`` (see :func:`held_out_split` for a file without ``split`` fields). ``limit`` keeps a
    seeded random subset of that many examples, in file order.
    """
    split = _SPLIT_ALIASES.get(split, split)
    if is_jsonl_spec(name):
        examples = _load_user_file(jsonl_path(name), split)
    else:
        key = name.strip().lower().replace("-", "_")
        key = _NAME_ALIASES.get(key, key)
        if data_files is not None and key not in BENCHMARKS:
            raise ValueError(f"data_files= is only for the paper benchmarks ({', '.join(PAPER_BENCHMARKS)})")
        if key in BUILTIN_SUITE:
            examples = _load_suite(key, split)
        elif key in BENCHMARKS:
            examples = load_benchmark(key, split, data_files=data_files)
        else:
            raise ValueError(_unknown(name))
    return subset(examples, limit, seed)


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


def is_jsonl_spec(name: str) -> bool:
    """Whether a task name names a user's JSONL file (``jsonl:PATH`` or a path ending in ``.jsonl``)."""
    return name.startswith(JSONL_PREFIX) or name.endswith(".jsonl")


def jsonl_path(name: str) -> Path:
    """The file a JSONL task spec names; a clear error for an empty spec."""
    text = name[len(JSONL_PREFIX):] if name.startswith(JSONL_PREFIX) else name
    if not text.strip():
        raise ValueError(f"task {name!r} names no file: write jsonl:PATH, e.g. jsonl:data/my_task.jsonl")
    return Path(text.strip()).expanduser()


def held_out_split(examples: list[Example], split: str, source: str) -> list[Example]:
    """The ``split`` ("train" or "test") of a file that has no ``split`` fields.

    The distinct inputs (question + options) are ordered by a hash of their text and the first
    ``HELD_OUT_SHARE`` of them (at least one) are "test": deterministic, independent of the line order,
    and no input is in both splits, so a run never scores its adapter on examples it trained on.
    """
    if split not in SUITE_SPLITS:
        raise ValueError(f"{source} has no 'split' fields, so it has only the splits {SUITE_SPLITS} "
                         f"(test = {HELD_OUT_SHARE:.0%} of its inputs); not {split!r}")
    keys = sorted({_input_key(e) for e in examples}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    if len(keys) < 2:
        raise ValueError(f"{source}: a file without 'split' fields needs at least 2 distinct inputs to hold one "
                         "out for testing; add more lines or give each line a \"split\": \"train\" or \"test\"")
    test_keys = set(keys[:max(1, math.floor(HELD_OUT_SHARE * len(keys)))])
    return [e for e in examples if (_input_key(e) in test_keys) == (split == "test")]


def _input_key(example: Example) -> str:
    return "\x1f".join((example.task, example.question, *example.choices))


def _load_user_file(path: Path, split: str) -> list[Example]:
    if path.is_dir():
        raise ValueError(f"{path} is a directory; name a JSONL file in it, e.g. jsonl:{path / 'my_task.jsonl'}")
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path} (relative paths start at {Path.cwd()})")
    examples = read_jsonl(path)
    splits = {e.meta.get("split") for e in examples} - {None}
    if not splits:
        return held_out_split(examples, split, str(path))
    if split not in splits:
        raise ValueError(f"{path}: no lines with split {split!r}; the file has {', '.join(sorted(splits))}: give some "
                         f"lines \"split\": \"{split}\", or drop every \"split\" to hold out part of the file for test")
    return [e for e in examples if e.meta.get("split") == split]


def _unknown(name: str) -> str:
    return (
        f"unknown task {name!r}.\n"
        f"  built-in offline suite: {', '.join(BUILTIN_SUITE)}\n"
        f"  paper benchmarks (Hugging Face hub): {', '.join(PAPER_BENCHMARKS)}\n"
        f"  your own file: 'jsonl:PATH' or a path ending in .jsonl (schema: comoe.data.jsonl)"
    )
