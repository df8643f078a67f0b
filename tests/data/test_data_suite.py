"""The built-in offline suites as shipped: loads, sizes, valid answers, disjoint deterministic splits."""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files

import pytest

from comoe.data import DEFAULT_SUITE_TASKS, load_task
from comoe.data.prompts import format_prompt
from comoe.data.suites import (
    BUILTIN_TASKS,
    DEFAULT_SUITE,
    HARD_TASKS,
    LEARNABLE_CANDIDATES,
    SUITE_NAMES,
    SUITE_TASKS,
    SUITES,
    normalize_space,
)
from comoe.evaluation.numeric import is_number

SUITE_DIR = files("comoe.data").joinpath("suite")
TASK = {task.name: task for task in SUITE_TASKS}
HARD = (
    "social_iqa",
    "strategyqa",
    "winowhy",
    "epistemic_reasoning",
    "logical_fallacy_detection",
    "elementary_math_qa",
)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in SUITE_DIR.joinpath(f"{name}.jsonl").read_text("utf-8").splitlines()]


def test_suite_files_match_the_task_list():
    on_disk = sorted(p.name[: -len(".jsonl")] for p in SUITE_DIR.iterdir() if p.name.endswith(".jsonl"))
    assert on_disk == sorted(BUILTIN_TASKS)
    assert len(set(BUILTIN_TASKS)) == len(BUILTIN_TASKS)
    sources = SUITE_DIR.joinpath("SOURCES.md").read_text("utf-8")
    for task in SUITE_TASKS:
        assert f"`{task.name}`" in sources and task.path in sources and task.license in sources
    for suite in SUITES:
        assert f"### Suite `{suite}`" in sources
    assert "scripts/build_suite.py" in sources and "Apache-2.0" in sources


def test_the_suites():
    assert DEFAULT_SUITE == "learnable" and SUITE_NAMES["learnable"] == DEFAULT_SUITE_TASKS
    assert list(SUITE_NAMES) == ["learnable", "hard", "math"]  # the default suite first
    assert SUITE_NAMES["hard"] == HARD  # the first suite keeps its tasks, names and order
    assert tuple(task.name for task in HARD_TASKS) == HARD
    assert len(SUITE_NAMES["learnable"]) >= 6
    assert not set(SUITE_NAMES["learnable"]) & set(HARD)
    assert all(task in LEARNABLE_CANDIDATES for task in SUITES["learnable"])
    assert sorted(BUILTIN_TASKS) == sorted(set(SUITE_NAMES["learnable"] + HARD + SUITE_NAMES["math"]))
    math = [TASK[name] for name in SUITE_NAMES["math"]]
    assert sum(task.generative for task in math) >= 6 and "elementary_math_qa" in SUITE_NAMES["math"]
    # the learnable suite's arithmetic tasks come from the same BIG-bench files: the math suite leaves them out
    assert not {task.path for task in math} & {task.path for task in SUITES["learnable"]}


def test_suite_size_budget():
    total = sum(len(SUITE_DIR.joinpath(f"{name}.jsonl").read_bytes()) for name in BUILTIN_TASKS)
    assert total <= 5_000_000


@pytest.mark.parametrize("suite", list(SUITE_NAMES))
def test_a_whole_suite_loads_by_name(suite):
    test = load_task(f"suite:{suite}", "test")
    assert list(dict.fromkeys(e.task for e in test)) == list(SUITE_NAMES[suite])
    assert test == [e for name in SUITE_NAMES[suite] for e in load_task(name, "test")]
    small = load_task(f" Suite:{suite} ", "train", limit=3)
    assert Counter(e.task for e in small) == {name: 3 for name in SUITE_NAMES[suite]}


def test_unknown_suite_names_the_suites():
    with pytest.raises(ValueError, match="suite:learnable, suite:hard, suite:math"):
        load_task("suite:easy")


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_task_loads_with_valid_examples(name):
    train, test = load_task(name, "train"), load_task(name, "test")
    assert 0 < len(train) <= TASK[name].train_cap
    assert min(100, TASK[name].test_size) <= len(test) <= TASK[name].test_size  # a quarter of a small task
    assert len(train) >= min(TASK[name].train_cap, 2 * len(test))
    if TASK[name].generative:  # a prompt and the number to generate
        for example in train + test:
            assert example.task == name and example.question.strip() and not example.is_multiple_choice
            assert is_number(example.target) and format_prompt(example).endswith("?\n")
        return
    for example in train + test:
        assert example.task == name
        assert example.question.strip() and example.is_multiple_choice
        assert len(example.choices) >= 2 and len(set(example.choices)) == len(example.choices)
        assert all(c.strip() for c in example.choices)
        assert 0 <= example.answer < len(example.choices)
        assert not example.question.rstrip().endswith(("Answer:", "A:"))
        assert format_prompt(example).endswith("\nAnswer:")


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_splits_are_disjoint_and_stable(name):
    rows = _rows(name)
    assert [r["split"] for r in rows] == sorted((r["split"] for r in rows), key=["train", "test"].index)
    text = "prompt" if TASK[name].generative else "question"
    fields = (
        ["id", "split", "prompt", "target"]
        if TASK[name].generative
        else ["id", "split", "question", "choices", "answer"]
    )
    assert list(rows[0]) == fields
    train_q = {normalize_space(r[text]).lower() for r in rows if r["split"] == "train"}
    test_q = {normalize_space(r[text]).lower() for r in rows if r["split"] == "test"}
    assert not train_q & test_q
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert load_task(name, "test") == load_task(name, "test")


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_majority_class_is_not_trivial(name):
    test = load_task(name, "test")
    top = Counter(e.answer if e.is_multiple_choice else e.target for e in test).most_common(1)[0][1]
    assert top / len(test) < 0.7


def test_winowhy_keeps_each_winograd_sentence_in_one_split():
    task = next(t for t in SUITE_TASKS if t.name == "winowhy")
    splits: dict[str, set[str]] = {}
    for row in _rows("winowhy"):
        splits.setdefault(task.group(row["question"]), set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())


def test_suite_rejects_unknown_split():
    with pytest.raises(ValueError, match="train, test"):
        load_task("strategyqa", "validation")


def test_the_old_name_of_the_default_suite_tasks_warns_and_still_reads():
    import comoe.data

    with pytest.warns(FutureWarning, match="comoe.data.DEFAULT_SUITE_TASKS"):
        assert comoe.data.BUILTIN_SUITE == DEFAULT_SUITE_TASKS
