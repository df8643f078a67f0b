"""load_task: name resolution, seeded subsets, user files and their splits."""

from __future__ import annotations

import json

import pytest

from comoe.data import PAPER_BENCHMARKS, list_tasks, load_task
from comoe.data.hub_access import HubUnavailableError
from comoe.data.registry import subset
from comoe.data.suites import BUILTIN_TASKS


def test_list_tasks():
    assert list_tasks() == ("suite:learnable", "suite:hard", "suite:math") + BUILTIN_TASKS + PAPER_BENCHMARKS
    commonsense = ("arc_e", "arc_c", "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande")
    math = ("gsm8k", "svamp", "multiarith", "addsub", "singleeq", "aqua")
    assert (*commonsense, *math) == PAPER_BENCHMARKS


def test_unknown_name_lists_what_exists():
    with pytest.raises(ValueError) as info:
        load_task("no_such_task")
    message = str(info.value)
    assert all(name in message for name in list_tasks()) and "jsonl:PATH" in message


def test_limit_is_a_seeded_ordered_subset():
    full = load_task("strategyqa", "test")
    a = load_task("strategyqa", "test", limit=50, seed=1)
    assert a == load_task("strategyqa", "test", limit=50, seed=1)
    assert a != load_task("strategyqa", "test", limit=50, seed=2)
    positions = [full.index(e) for e in a]
    assert len(a) == 50 and positions == sorted(positions)
    assert load_task("strategyqa", "test", limit=10_000) == full
    assert load_task("strategyqa", "test", limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        subset(full, -1)


def test_paper_names_and_aliases_route_to_the_hub(monkeypatch):
    """Names and aliases reach the hub loader of the right benchmark. The hub call itself is replaced by
    what `datasets` raises offline without a cached copy: huggingface_hub reads HF_HUB_OFFLINE when it is
    first imported, so setting it inside a test process would let it try the network."""
    from comoe.data import hub

    asked = []

    def offline(bench, hub_split, cache_dir):
        asked.append((bench.name, hub_split))
        raise RuntimeError("no cached copy")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_load_hub", offline)
    for name in ("arc_e", "ARC-Easy", "openbookqa", "social_i_qa", "gsm8k"):
        with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE=1 is set"):
            load_task(name, "test")
    assert asked == [
        ("arc_e", "test"),
        ("arc_e", "test"),
        ("obqa", "test"),
        ("siqa", "validation"),
        ("gsm8k", "test"),
    ]


def test_data_files_only_for_paper_benchmarks(tmp_path):
    with pytest.raises(ValueError, match="data_files"):
        load_task("strategyqa", data_files=str(tmp_path / "x.jsonl"))


def test_user_jsonl_with_and_without_splits(tmp_path):
    rows = [
        {"question": "q1", "choices": ["a", "b"], "answer": 0, "split": "train"},
        {"question": "q2", "choices": ["a", "b"], "answer": "b", "split": "test"},
        {"question": "q3", "choices": ["a", "b"], "answer": "A", "split": "train"},
    ]
    with_splits = tmp_path / "mine.jsonl"
    with_splits.write_text("\n".join(json.dumps(r) for r in rows))
    train = load_task(f"jsonl:{with_splits}")
    assert [e.question for e in train] == ["q1", "q3"] and {e.task for e in train} == {"mine"}
    assert [e.question for e in load_task(str(with_splits), "test")] == ["q2"]
    with pytest.raises(ValueError, match="no lines with split 'validation'"):
        load_task(str(with_splits), "validation")

    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "split"}) for r in rows))
    assert len(load_task(str(plain), "test")) == 1 and len(load_task(str(plain), "train")) == 2


def test_a_file_without_splits_holds_out_a_fifth_of_its_inputs_whatever_the_line_order(tmp_path):
    rows = [
        {"question": f"q{i % 40}", "choices": ["a", "b"], "answer": i % 2} for i in range(50)
    ]  # 10 repeats
    (tmp_path / "f").mkdir(), (tmp_path / "b").mkdir()
    forward, backward = tmp_path / "f" / "t.jsonl", tmp_path / "b" / "t.jsonl"
    forward.write_text("\n".join(json.dumps(r) for r in rows))
    backward.write_text("\n".join(json.dumps(r) for r in reversed(rows)))
    train, test = load_task(str(forward), "train"), load_task(str(forward), "test")
    assert len({e.question for e in test}) == 8 and len(train) + len(test) == 50
    assert not {e.question for e in train} & {e.question for e in test}  # a repeated input stays on one side
    assert {e.question for e in load_task(str(backward), "test")} == {e.question for e in test}
    with pytest.raises(ValueError, match="only the splits"):
        load_task(str(forward), "validation")
    single = tmp_path / "one.jsonl"
    single.write_text(json.dumps(rows[0]))
    with pytest.raises(ValueError, match="at least 2 distinct inputs"):
        load_task(str(single), "train")

    with pytest.raises(FileNotFoundError):
        load_task("jsonl:" + str(tmp_path / "missing.jsonl"))
