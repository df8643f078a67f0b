"""Builds the built-in suite's files from the PyPI sdist ``bigbench==1.0.0`` (a tool, not the library).

``scripts/build_suite.py`` runs this and writes ``comoe/data/suite/<task>.jsonl``. The conversion is
deterministic (no RNG; every choice comes from SHA-1 hashes of the text), so rebuilding on any machine
gives byte-identical files.

Split rule: examples are grouped (identical inputs, or one Winograd sentence with its many reasons,
must not straddle train and test), groups are ordered by SHA-1 of ``task + group key``, and test takes
whole groups in that order until it holds ``test_size`` examples; train is the rest, capped.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from comoe.data.suites import SuiteTask, normalize_space

SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_REQUIREMENT = "bigbench==1.0.0"
TASKS_ROOT = "bigbench/benchmark_tasks"

# Trailing answer cues ("A:", "Answer:", ...) that would double the "Answer:" our prompt format adds.
_TRAILING_CUE = re.compile(
    r"(?:^|\s)(?:A|Q|Answer|Ans|Output|Label|Relation|Target|Choices?|Options?)\s*:\s*$", re.I
)


def clean_text(text: str) -> str:
    """Normalise line ends, trim each line's trailing spaces, drop trailing answer cues."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out = "\n".join(lines).strip()
    while True:
        stripped = _TRAILING_CUE.sub("", out).rstrip()
        if stripped == out or not stripped:
            return out
        out = stripped


# MathQA options sometimes keep Python-list debris: "[' 3'", "' 7'", "' 11']" -> "3", "7", "11".
_QUOTED_OPTION = re.compile(r"^\[?'\s*(.*?)\s*'\]?$")


_OPTION_DEBRIS = re.compile(r"^\[?'|'\]?$")


def clean_choice(text: str) -> str:
    """Clean an option text; an option still carrying list debris becomes "" (the example is dropped)."""
    text = clean_text(text)
    match = _QUOTED_OPTION.match(text)
    text = match.group(1) if match else text
    return "" if _OPTION_DEBRIS.search(text) else text


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass
class ConvertStats:
    source: int = 0
    invalid: int = 0  # not exactly one best option, empty or repeated option texts
    duplicates: int = 0  # same input, options and answer as an earlier example
    conflicts: int = 0  # same input and options, different answers: all copies dropped
    filtered: int = 0  # answer outside the task's ``labels``
    shuffled: bool = False


def convert_examples(task: SuiteTask, examples: list[dict]) -> tuple[list[dict], ConvertStats]:
    """BIG-bench ``examples`` -> records ``{"id", "question", "choices", "answer"}`` (no split yet).

    Tasks whose options are a fixed label vocabulary (Yes/No, correct/incorrect, ...) keep BIG-bench's
    label order; tasks with per-example option texts get a per-example order from SHA-1 hashes, since
    some BIG-bench tasks always list the correct option first (or last).
    """
    if task.generative:
        return _convert_generative(task, examples)
    stats = ConvertStats(source=len(examples))
    parsed: list[tuple[int, str, list[str], int]] = []
    for index, example in enumerate(examples):
        scores = example.get("target_scores") or {}
        choices = [clean_choice(str(c)) for c in scores]
        values = list(scores.values())
        best = max(values, default=0)
        if (
            len(choices) < 2
            or values.count(best) != 1
            or best <= min(values)
            or any(not c for c in choices)
            or len(set(choices)) != len(choices)
        ):
            stats.invalid += 1
            continue
        if task.labels:
            answer_text = choices[values.index(best)]
            if answer_text not in task.labels or not set(task.labels) <= set(choices):
                stats.filtered += 1
                continue
            choices = list(task.labels)
            values = [float(c == answer_text) for c in choices]
        question = clean_text(str(example["input"]))
        if task.instruction:
            question = f"{task.instruction}\n{question}"
        if task.suffix:
            question = f"{question}\n{task.suffix}"
        parsed.append((index, question, choices, values.index(best)))

    stats.shuffled = len({tuple(choices) for _, _, choices, _ in parsed}) > 1
    answers_by_key: dict[tuple[str, tuple[str, ...]], set[str]] = {}
    for _, question, choices, answer in parsed:
        key = (normalize_space(question), tuple(sorted(choices)))
        answers_by_key.setdefault(key, set()).add(choices[answer])

    records, seen = [], set()
    for index, question, choices, answer in parsed:
        key = (normalize_space(question), tuple(sorted(choices)))
        if len(answers_by_key[key]) > 1:
            stats.conflicts += 1
            continue
        if key in seen:
            stats.duplicates += 1
            continue
        seen.add(key)
        if stats.shuffled:
            order = sorted(range(len(choices)), key=lambda i: _sha1(f"{task.name}|{index}|{choices[i]}"))
            answer = order.index(answer)
            choices = [choices[i] for i in order]
        records.append({"id": index, "question": question, "choices": choices, "answer": answer})
    return records, stats


def _convert_generative(task: SuiteTask, examples: list[dict]) -> tuple[list[dict], ConvertStats]:
    """BIG-bench ``examples`` -> records ``{"id", "prompt", "target"}``: the answer is generated."""
    stats = ConvertStats(source=len(examples))
    parsed = []
    for index, example in enumerate(examples):
        target = example.get("target")
        target = target[0] if isinstance(target, list) and target else target
        target = clean_choice(str(target)) if isinstance(target, (str, int, float)) else ""
        if not target:
            stats.invalid += 1
            continue
        prompt = clean_text(str(example["input"]))
        if task.instruction:
            prompt = f"{task.instruction}\n{prompt}"
        parsed.append((index, prompt, target))
    targets_by_prompt: dict[str, set[str]] = {}
    for _, prompt, target in parsed:
        targets_by_prompt.setdefault(normalize_space(prompt), set()).add(target)
    records, seen = [], set()
    for index, prompt, target in parsed:
        key = normalize_space(prompt)
        if len(targets_by_prompt[key]) > 1:
            stats.conflicts += 1
        elif key in seen:
            stats.duplicates += 1
        else:
            seen.add(key)
            records.append({"id": index, "prompt": prompt, "target": target})
    return records, stats


def _input_of(record: dict) -> str:
    return record["question"] if "question" in record else record["prompt"]


def assign_splits(
    task: SuiteTask, records: list[dict], test_size: int | None = None, train_cap: int | None = None
) -> list[dict]:
    """Add ``"split"`` to each record; drop train records past the cap. Order: train, then test.

    Small tasks give at most a quarter of their examples to test. ``test_size`` and ``train_cap`` default
    to the task's own.
    """
    test_size = task.test_size if test_size is None else test_size
    train_cap = task.train_cap if train_cap is None else train_cap
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(task.group(_input_of(record)), []).append(record)
    ordered = sorted(groups.items(), key=lambda kv: _sha1(f"{task.name}\x00{kv[0]}"))
    test_size = min(test_size, len(records) // 4)
    test: list[dict] = []
    train: list[dict] = []
    for _, members in ordered:
        if len(test) + len(members) <= test_size:
            test.extend(members)
        else:
            train.extend(members)
    train = train[:train_cap]
    return [{"id": r["id"], "split": "train", **_body(r)} for r in train] + [
        {"id": r["id"], "split": "test", **_body(r)} for r in test
    ]


def _body(record: dict) -> dict:
    if "target" in record:
        return {"prompt": record["prompt"], "target": record["target"]}
    return {"question": record["question"], "choices": record["choices"], "answer": record["answer"]}


def read_task_files(sdist: str | Path, task_paths: Iterable[str]) -> dict[str, dict]:
    """Read only the named ``task.json`` members of the sdist tarball (one streaming pass)."""
    wanted = {f"{TASKS_ROOT}/{p}/task.json": p for p in task_paths}
    found: dict[str, dict] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            # Members are "bigbench-1.0.0/bigbench/benchmark_tasks/<path>/task.json".
            inner = member.name.split("/", 1)[-1]
            if member.isfile() and inner in wanted:
                handle = tar.extractfile(member)
                assert handle is not None
                found[wanted[inner]] = json.load(handle)
                if len(found) == len(wanted):
                    break
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise FileNotFoundError(f"{sdist}: no task.json for {', '.join(missing)}")
    return found


def dump_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)


def split_stats(records: list[dict]) -> dict[str, dict]:
    """Per split: count, and the majority-class rate (share of the most frequent answer index, or target)."""
    out = {}
    for split in ("train", "test"):
        answers = Counter(
            r["answer"] if "answer" in r else r["target"] for r in records if r["split"] == split
        )
        n = sum(answers.values())
        out[split] = {"count": n, "majority": (max(answers.values()) / n) if n else 0.0}
    return out
