"""The BIG-bench -> suite conversion and scripts/build_suite.py, on a small fake sdist."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from comoe.data.jsonl import parse_jsonl
from comoe.data.suites import (
    BUILTIN_TASKS,
    SUITE_NAMES,
    SUITE_TASKS,
    SuiteTask,
)
from comoe.tools.suite_builder import (
    assign_splits,
    clean_choice,
    clean_text,
    convert_examples,
    read_task_files,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_suite.py"
PLAIN = SuiteTask(name="toy", path="toy", what="", source="", license="")


def test_clean_text_strips_trailing_answer_cues_only():
    assert clean_text("Is it?\nA:") == "Is it?"
    assert clean_text("Is it?  Answer: \n") == "Is it?"
    assert clean_text("Q: Is it?\nA:  \r\n") == "Q: Is it?"
    dialog = "A: hi there\nB: hello"
    assert clean_text(dialog) == dialog
    assert clean_text("Answer:") == "Answer:"  # nothing would be left: keep the text
    assert clean_text("line one   \r\nline two  ") == "line one\nline two"


def test_clean_choice_removes_list_debris():
    assert [clean_choice(c) for c in ["[' 3'", "' 7'", "' 11']", " 4 kg "]] == ["3", "7", "11", "4 kg"]
    assert clean_choice("' $ 1") == ""  # unrecoverable: the example gets dropped


def _mc(text: str, choices: list[str], correct: int) -> dict:
    return {"input": text, "target_scores": {c: int(i == correct) for i, c in enumerate(choices)}}


def test_convert_drops_bad_duplicate_and_conflicting_examples():
    examples = [
        _mc("q1", ["Yes", "No"], 0),
        _mc("q1 ", ["Yes", "No"], 0),  # duplicate after cleaning
        _mc("q2", ["Yes", "No"], 0),
        _mc("q2", ["Yes", "No"], 1),  # conflicts with the previous one: both dropped
        {"input": "q3", "target_scores": {"Yes": 1, "No": 1}},  # two best options
        {"input": "q4", "target_scores": {"Yes": 0, "No": 0}},  # no best option
        _mc("q5", ["Yes", "Yes "], 0),  # repeated option after cleaning
        _mc("q6\nA:", ["Yes", "No"], 1),
    ]
    records, stats = convert_examples(PLAIN, examples)
    assert [(r["id"], r["question"], r["answer"]) for r in records] == [(0, "q1", 0), (7, "q6", 1)]
    assert (stats.invalid, stats.duplicates, stats.conflicts, stats.shuffled) == (3, 1, 2, False)
    assert all(r["choices"] == ["Yes", "No"] for r in records)


def test_convert_shuffles_per_example_options_deterministically():
    examples = [_mc(f"question {i}", [f"wrong {i}", f"other {i}", f"right {i}"], 2) for i in range(300)]
    records, stats = convert_examples(PLAIN, examples)
    assert stats.shuffled
    positions = Counter(r["answer"] for r in records)
    assert max(positions.values()) / len(records) < 0.45
    assert all(r["choices"][r["answer"]] == f"right {r['id']}" for r in records)
    assert convert_examples(PLAIN, examples)[0] == records


def test_instruction_and_suffix():
    task = SuiteTask(name="t", path="t", what="", source="", license="", instruction="Do it.", suffix="Well?")
    (record,), _ = convert_examples(task, [_mc("body", ["a", "b"], 0)])
    assert record["question"] == "Do it.\nbody\nWell?"


def test_labels_keep_only_examples_answered_by_them_and_offer_only_them():
    task = SuiteTask(name="p", path="p", what="", source="", license="", labels=("positive", "negative"))
    examples = [
        _mc("great", ["neutral", "positive", "negative", "ambivalent"], 1),
        _mc(
            "meh", ["neutral", "positive", "negative", "ambivalent"], 0
        ),  # answer outside the labels: dropped
        _mc("awful", ["neutral", "positive", "negative", "ambivalent"], 2),
        _mc("no such label", ["yes", "no"], 0),  # options lack the labels: dropped
    ]
    records, stats = convert_examples(task, examples)
    assert [(r["question"], r["choices"], r["answer"]) for r in records] == [
        ("great", ["positive", "negative"], 0),
        ("awful", ["positive", "negative"], 1),
    ]
    assert stats.filtered == 2 and not stats.shuffled


def test_assign_splits_groups_caps_and_determinism():
    task = SuiteTask(name="g", path="g", what="", source="", license="", group=lambda q: q.split("|")[0])
    records = [
        {"id": i, "question": f"s{i // 4}|r{i}", "choices": ["a", "b"], "answer": i % 2} for i in range(4000)
    ]
    out = assign_splits(task, records, test_size=300, train_cap=1500)
    test = [r for r in out if r["split"] == "test"]
    train = [r for r in out if r["split"] == "train"]
    assert len(test) == 300 and len(train) == 1500
    assert not {r["question"].split("|")[0] for r in test} & {r["question"].split("|")[0] for r in train}
    assert [r["split"] for r in out] == ["train"] * 1500 + ["test"] * 300
    small = assign_splits(task, records[:40])
    assert sum(r["split"] == "test" for r in small) <= 10


def test_generative_tasks_keep_their_target_and_drop_conflicts():
    task = SuiteTask(
        name="sum", path="sum", what="", source="", license="", generative=True, instruction="Add."
    )
    examples = [
        {"input": "What is 1 plus 2?", "target": "3"},
        {"input": "What is 1 plus 2?", "target": "3"},  # duplicate
        {"input": "What is 2 plus 2?", "target": "4"},
        {"input": "What is 2 plus 2? ", "target": "5"},  # conflicting copy: both dropped
        {"input": "What is 5 plus 5?", "target": ["10", "ten"]},  # a list: its first target
        {"input": "What is 6 plus 6?", "target": ""},  # no target: invalid
    ]
    records, stats = convert_examples(task, examples)
    assert records == [
        {"id": 0, "prompt": "Add.\nWhat is 1 plus 2?", "target": "3"},
        {"id": 4, "prompt": "Add.\nWhat is 5 plus 5?", "target": "10"},
    ]
    assert (stats.duplicates, stats.conflicts, stats.invalid) == (1, 2, 1)
    split = assign_splits(task, records * 1, test_size=1)
    assert [list(r) for r in split] == [["id", "split", "prompt", "target"]] * 2


def test_split_does_not_depend_on_input_order():
    records = [{"id": i, "question": f"q{i}", "choices": ["a", "b"], "answer": 0} for i in range(2000)]
    a = assign_splits(PLAIN, records)
    b = assign_splits(PLAIN, list(reversed(records)))
    assert {r["id"] for r in a if r["split"] == "test"} == {r["id"] for r in b if r["split"] == "test"}


def _fake_sdist(path: Path, n: int = 60) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for task in SUITE_TASKS:
            examples = [
                _mc(f"{task.name} question {i}?", [f"opt{i}", f"alt{i}", "third"], i % 3) for i in range(n)
            ]
            if task.labels:  # every third example is answered by a label outside the task's: filtered out
                examples = [
                    _mc(f"{task.name} sentence {i}.", [*task.labels, "neutral"], i % 3) for i in range(n)
                ]
            if task.generative:  # BIG-bench's arithmetic: an input and its target, options for scoring only
                examples = [
                    {"input": f"What is {i} plus 7?", "target": str(i + 7), "target_scores": {str(i + 7): 1}}
                    for i in range(n)
                ]
            if task.name == "winowhy":
                examples = [
                    _mc(f"S{i // 3}. The 'it' refers to x because r{i}.", ["correct", "incorrect"], i % 2)
                    for i in range(n)
                ]
            data = json.dumps({"name": task.name, "examples": examples}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task.path}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        readme = tarfile.TarInfo("bigbench-1.0.0/README.md")
        tar.addfile(readme, io.BytesIO(b""))
    return path


def test_read_task_files_reports_missing(tmp_path):
    sdist = _fake_sdist(tmp_path / "bb.tar.gz")
    found = read_task_files(sdist, ["social_iqa", "elementary_math_qa/question_only"])
    assert set(found) == {"social_iqa", "elementary_math_qa/question_only"}
    with pytest.raises(FileNotFoundError, match="nope"):
        read_task_files(sdist, ["nope"])


def test_build_script_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("build_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sdist = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    out = tmp_path / "suite"
    (out).mkdir()
    (out / "stale.jsonl").write_text("{}\n")
    assert module.main(["--sdist", str(sdist), "--out", str(out)]) == 0
    assert not (out / "stale.jsonl").exists()
    for task in SUITE_TASKS:
        examples = parse_jsonl((out / f"{task.name}.jsonl").read_bytes(), task.name, task.name)
        assert {e.meta["split"] for e in examples} == {"train", "test"}
    assert "| `winowhy` |" in (out / "SOURCES.md").read_text()
    assert module.main(["--sdist", str(sdist), "--out", str(out), "--check"]) == 0
    (out / "strategyqa.jsonl").write_text("")
    assert module.main(["--sdist", str(sdist), "--out", str(out), "--check"]) == 1


def _load_script():
    spec = importlib.util.spec_from_file_location("build_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_sdist(path: Path) -> Path:
    """A fake sdist holding just two task.json files: a label-set task and one with per-example options."""
    tasks = {
        "mood": [_mc(f"I feel {w} number {i}.", ["happy", "sad"], i % 2) for i, w in enumerate(["ok"] * 40)],
        "sums/two": [_mc(f"What is {i} plus 1?", [str(i + 1), str(i + 7), "banana"], 0) for i in range(50)],
    }
    with tarfile.open(path, "w:gz") as tar:
        for task_path, examples in tasks.items():
            data = json.dumps({"name": task_path, "examples": examples}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task_path}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_build_two_suites_from_a_tiny_fixture(tmp_path):
    module = _load_script()
    sdist = _tiny_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    mood = SuiteTask(
        name="mood",
        path="mood",
        what="w",
        source="s",
        license="CC-BY-4.0 (x)",
        instruction="How?",
        test_size=8,
        train_cap=20,
    )
    sums = SuiteTask(name="sums", path="sums/two", what="w", source="s", license="Apache-2.0 (BIG-bench)")
    suites = {"learnable": (mood,), "hard": (sums,)}
    files = module.build(sdist, suites)
    assert set(files) == {"mood.jsonl", "sums.jsonl", "SOURCES.md"}
    assert module.build(sdist, suites) == files  # byte-identical on a rebuild
    rows = {
        name: [json.loads(line) for line in files[f"{name}.jsonl"].splitlines()] for name in ("mood", "sums")
    }
    # mood: 40 examples, test capped at 8 (its own test_size), train capped at 20 (its own train_cap).
    assert Counter(r["split"] for r in rows["mood"]) == {"train": 20, "test": 8}
    # sums: 50 examples, the default test size is capped at a quarter of a small task.
    assert Counter(r["split"] for r in rows["sums"]) == {"train": 38, "test": 12}
    for name, records in rows.items():
        assert [r["split"] for r in records] == sorted(
            (r["split"] for r in records), key=["train", "test"].index
        )
        train = {r["question"] for r in records if r["split"] == "train"}
        assert not train & {r["question"] for r in records if r["split"] == "test"}
        examples = parse_jsonl(files[f"{name}.jsonl"].encode(), name, name)
        assert all(0 <= e.answer < len(e.choices) for e in examples)
    assert all(
        r["question"].startswith("How?\nI feel") and r["choices"] == ["happy", "sad"] for r in rows["mood"]
    )
    assert all(r["choices"][r["answer"]] == str(r["id"] + 1) for r in rows["sums"])
    assert len({r["answer"] for r in rows["sums"]}) > 1  # per-example options are shuffled
    sources = files["SOURCES.md"]
    assert "### Suite `learnable` (the default)" in sources and "### Suite `hard`\n" in sources
    assert "| `mood` | `bigbench/benchmark_tasks/mood` | 20 | 8 |" in sources
    assert "CC-BY-4.0 (x)" in sources and "test up to 8 examples, train capped at 20" in sources


def test_build_refuses_a_suite_over_the_size_budget(tmp_path, monkeypatch):
    module = _load_script()
    sdist = _tiny_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    monkeypatch.setattr(module, "MAX_SUITE_BYTES", 100)
    sums = SuiteTask(name="sums", path="sums/two", what="", source="", license="")
    with pytest.raises(SystemExit, match="byte budget"):
        module.build(sdist, {"learnable": (sums,)})


def test_build_script_writes_both_suites(tmp_path):
    module = _load_script()
    sdist = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    out = tmp_path / "suite"
    assert module.main(["--sdist", str(sdist), "--out", str(out)]) == 0
    names = sorted(p.name[: -len(".jsonl")] for p in out.glob("*.jsonl"))
    assert names == sorted(BUILTIN_TASKS)
    sources = (out / "SOURCES.md").read_text()
    for suite, tasks in SUITE_NAMES.items():
        assert f"### Suite `{suite}`" in sources and all(f"| `{t}` |" in sources for t in tasks)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert module.main(["--sdist", str(sdist), "--out", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
