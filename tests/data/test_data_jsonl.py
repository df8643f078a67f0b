"""User JSONL files: every accepted form, and every error naming file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from comoe.data.jsonl import DataError, parse_jsonl, read_jsonl
from comoe.data.registry import load_task

GOOD = {"question": "2 + 2 = ?", "choices": ["3", "4"], "answer": 1}


def _write(tmp_path: Path, lines: list, name: str = "mytask.jsonl") -> Path:
    path = tmp_path / name
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("answer", "expected"),
    [(0, 0), (2, 2), ("red", 0), ("blue", 2), ("B", 1), ("c", 2)],
)
def test_answer_forms(tmp_path, answer, expected):
    path = _write(tmp_path, [{"question": "Pick.", "choices": ["red", "green", "blue"], "answer": answer}])
    (example,) = read_jsonl(path)
    assert example.answer == expected
    assert example.choices == ("red", "green", "blue")
    assert example.task == "mytask"


def test_option_text_wins_over_letter(tmp_path):
    path = _write(
        tmp_path, [{"question": "Which letter comes second?", "choices": ["B", "A"], "answer": "A"}]
    )
    assert read_jsonl(path)[0].answer == 1


def test_generation_forms_and_optional_fields(tmp_path):
    path = _write(
        tmp_path,
        [
            {"prompt": "Say hi", "target": "hi", "task": "greet", "split": "train"},
            "",
            {"question": "Say bye", "target": "bye", "split": "test", "id": 7, "source": "me"},
            {**GOOD, "task": "math", "id": "q1", "split": "train"},
        ],
    )
    hi, bye, math = read_jsonl(path)
    assert (hi.task, hi.question, hi.target, hi.choices, hi.answer) == ("greet", "Say hi", "hi", (), None)
    assert not hi.is_multiple_choice
    assert (bye.task, bye.meta) == ("mytask", {"split": "test", "id": 7, "source": "me"})
    assert (math.task, math.answer, math.meta["id"]) == ("math", 1, "q1")


def test_bom_crlf_and_unicode_line_separator(tmp_path):
    path = tmp_path / "t.jsonl"
    record = {"question": "a\u2028b", "choices": ["x", "y"], "answer": "y"}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(record, ensure_ascii=False).encode() + b"\r\n\r\n")
    (example,) = read_jsonl(path)
    assert example.question == "a\u2028b" and example.answer == 1


BAD_LINES = [
    ('{"question": "q", "choices": ["a", "b"], "answer": 1', "invalid JSON"),
    ('["q", ["a", "b"], 1]', "expected a JSON object, got array"),
    ({"choices": ["a", "b"], "answer": 0}, "missing field 'question'"),
    ({"question": "q", "choices": ["a", "b"]}, "missing field 'answer'"),
    ({"question": "q", "answer": 0}, "missing field 'choices'"),
    ({"question": "q"}, "missing fields"),
    ({"question": 3, "choices": ["a", "b"], "answer": 0}, "'question' must be a string, got integer"),
    ({"question": "  ", "choices": ["a", "b"], "answer": 0}, "'question' is empty"),
    ({"question": "q", "choices": "a b", "answer": 0}, "'choices' must be a list"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "at least 2 options"),
    ({"question": "q", "choices": ["a", 2], "answer": 0}, "choice 1 must be a string"),
    ({"question": "q", "choices": ["a", ""], "answer": 0}, "choice 1 is empty"),
    ({"question": "q", "choices": ["a", "a"], "answer": 0}, "appears twice"),
    ({"question": "q", "choices": [str(i) for i in range(27)], "answer": 0}, "at most 26"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": -1}, "out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "letter 'C' out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": "z z"}, "is not one of the choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": 1.0}, "got number"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "got boolean"),
    ({"question": "q", "choices": ["a", "b"], "answer": None}, "got null"),
    ({"question": "q", "choices": ["a", "b"], "answer": 0, "target": "a"}, "not both"),
    ({"prompt": "p", "question": "q", "target": "t"}, "not both"),
    ({"prompt": "p", "target": 5}, "'target' must be a string"),
    ({"prompt": "p", "target": ""}, "'target' is empty"),
    ({**GOOD, "task": ""}, "'task' is empty"),
    ({**GOOD, "task": "../evil"}, "'task' '../evil' is not a plain name"),
    ({**GOOD, "task": "a/b"}, "is not a plain name: use letters, digits, '_', '.' and '-'"),
    ({**GOOD, "task": "/abs"}, "is not a plain name"),
    ({**GOOD, "task": ".."}, "is not a plain name"),
    ({**GOOD, "task": ".hidden"}, "starting with a letter or digit"),
    ({**GOOD, "task": "a..b"}, "without '..'"),
    ({**GOOD, "task": "my task"}, "is not a plain name"),
    ({**GOOD, "task": "a\\b"}, "is not a plain name"),
    ({**GOOD, "id": [1]}, "'id' must be a string or an integer"),
]


@pytest.mark.parametrize(("line", "what"), BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, line, what):
    path = _write(tmp_path, [GOOD, "", line, GOOD])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert what in str(info.value)
    assert isinstance(info.value, ValueError)


def test_all_problems_are_reported(tmp_path):
    path = _write(tmp_path, [GOOD, "{", GOOD, {"question": "q"}])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert [e.split(": ")[0] for e in info.value.errors] == [f"{path}:2", f"{path}:4"]


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"empty\.jsonl:1: empty file"):
        read_jsonl(path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        read_jsonl(path)


def test_plain_task_names_are_accepted(tmp_path):
    names = ["a", "Task2", "my_task.v1-b", "9lives"]
    path = _write(tmp_path, [{**GOOD, "task": name} for name in names])
    assert [e.task for e in read_jsonl(path)] == names


def test_some_lines_with_a_split_and_some_without_is_refused(tmp_path):
    path = _write(tmp_path, [GOOD, {**GOOD, "split": "train"}, "", GOOD, {**GOOD, "split": "test"}])
    with pytest.raises(DataError) as info:
        load_task(f"jsonl:{path}", "train")
    assert info.value.errors == [
        f'{path}:{line}: this line has no "split" but line 2 has one; give every line a "split" or none'
        for line in (1, 4)
    ]


def _mc(task: str, i: int) -> dict:
    return {"question": f"{task}: is {i} even?", "choices": ["yes", "no"], "answer": i % 2, "task": task}


def test_a_multi_task_file_without_splits_holds_out_inputs_of_every_task(tmp_path):
    path = _write(
        tmp_path, [_mc("a", i) for i in range(20)] + [_mc("b", i) for i in range(3)], name="two.jsonl"
    )
    train, test = load_task(str(path), "train"), load_task(str(path), "test")
    count = lambda examples, task: sum(e.task == task for e in examples)  # noqa: E731
    assert (count(test, "a"), count(test, "b")) == (4, 1)  # a fifth of each task, at least one
    assert (count(train, "a"), count(train, "b")) == (16, 2)
    assert not {e.question for e in train} & {e.question for e in test}
    reordered = _write(
        tmp_path,
        list(reversed([_mc("a", i) for i in range(20)] + [_mc("b", i) for i in range(3)])),
        name="other.jsonl",
    )
    assert {e.question for e in load_task(str(reordered), "test")} == {e.question for e in test}


def test_a_task_with_one_input_in_a_file_without_splits_is_refused(tmp_path):
    path = _write(tmp_path, [_mc("a", i) for i in range(5)] + [_mc("b", 1), _mc("b", 1)])
    with pytest.raises(ValueError) as info:
        load_task(str(path), "test")
    message = str(info.value)
    for fragment in (
        f"{path}: task 'b' has 1 distinct input",
        "at least 2 distinct inputs per task",
        "add lines to that task",
        '"split": "train" or "test"',
    ):
        assert fragment in message, message


def test_inputs_to_predict_may_leave_the_labels_out_and_a_given_label_is_checked():
    lines = [
        {"question": "Q?", "choices": ["a", "b"], "id": 7},
        {"prompt": "Say hi", "task": "greet"},
        {"question": "Q2?", "choices": ["a", "b"], "answer": "b", "split": "test"},  # splits do not matter
        {"prompt": "Say bye", "target": "bye", "task": "greet"},
    ]
    examples = parse_jsonl("\n".join(json.dumps(line) for line in lines), "in.jsonl", "in", labelled=False)
    assert [(ex.task, ex.answer, ex.target) for ex in examples] == [
        ("in", None, None),
        ("greet", None, None),
        ("in", 1, None),
        ("greet", None, "bye"),
    ]
    assert examples[0].meta["id"] == 7 and examples[0].choices == ("a", "b")
    for bad, message in [
        ({"question": "Q?", "choices": ["a", "b"], "answer": 5}, "in.jsonl:1: answer index 5 out of range"),
        ({"question": "Q?", "answer": 1}, "in.jsonl:1: missing field 'choices'"),
        (
            {"id": 3},
            "in.jsonl:1: missing fields: need 'question' and 'choices' (multiple choice) or 'prompt'",
        ),
    ]:
        with pytest.raises(DataError, match=re.escape(message)):
            parse_jsonl(json.dumps(bad), "in.jsonl", "in", labelled=False)
    with pytest.raises(DataError, match="missing fields: need 'question', 'choices', 'answer'"):
        parse_jsonl(json.dumps({"prompt": "Say hi"}), "in.jsonl", "in")  # training data needs its labels
