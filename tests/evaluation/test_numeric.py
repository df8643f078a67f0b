"""The numeric answer extractor on a table of tricky answers."""

from __future__ import annotations

import pytest

from comoe.evaluation.numeric import extract_number, is_number, numbers_match


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("109", 109),
        ("109.", 109),
        ("The answer is 42.", 42),
        ("$1,234", 1234),
        ("1,234,567 dollars", 1234567),
        ("It costs $5.50 in total", 5.5),
        ("25%", 25),
        ("-3", -3),
        ("The temperature fell to −7 degrees", -7),
        ("5-3=2", 2),
        ("5 - 3 = 2", 2),
        ("The difference is -12.", -12),
        ("3/4", 0.75),
        ("He ate 1/2 of the pie, so 6 slices are left", 6),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72),
        ("0.5", 0.5),
        (".5", 0.5),
        ("1, 2 and 3", 3),
        ("1,23", 23),  # not a thousands separator: the last number is 23
        ("x2 y7", None),  # digits glued to words are not numbers
        ("no number here", None),
        ("", None),
        ("(4)", 4),
        ("1/0", None),
    ],
)
def test_extract_number(text, expected):
    value = extract_number(text)
    assert (value is None and expected is None) or value == pytest.approx(expected)


@pytest.mark.parametrize(
    ("answer", "reference", "match"),
    [
        ("109", "109", True),
        ("109 apples", "109", True),
        ("The answer is $1,200.00", "1200", True),
        ("18.0", "18", True),
        ("0.3333", "1/3", True),
        ("0.33", "1/3", False),
        ("108", "109", False),
        ("", "109", False),
        ("-5", "5", False),
    ],
)
def test_numbers_match(answer, reference, match):
    assert numbers_match(answer, reference) is match


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("109", True),
        ("-3.5", True),
        ("1,200", True),
        ("3/4", True),
        ("109 apples", False),
        ("", False),
        ("yes", False),
    ],
)
def test_is_number(text, number):
    assert is_number(text) is number


def test_a_generation_task_with_numeric_references_is_scored_by_number():
    from comoe.data.schema import Example
    from comoe.evaluation.generation import generation_result

    numeric = [Example("m", "q", target=t) for t in ("1200", "12", "3")]
    result = generation_result(["$1,200.", "12 apples", "4"], numeric, keep=False)
    assert (result["metric"], result["correct"]) == ("numeric_match", 2)
    words = [Example("w", "q", target=t) for t in ("chat", "12")]
    result = generation_result(["Chat.", "12 apples"], words, keep=False)
    assert (result["metric"], result["correct"]) == ("exact_match", 1)  # a mixed task stays exact match


def test_the_paired_statistics_judge_generated_answers_as_the_accuracy_does():
    from comoe.data.schema import Example
    from comoe.evaluation.generation import generation_result
    from comoe.experiments.stats import correct_vectors

    examples = [Example("m", "q", target=t) for t in ("109", "12")]
    scores = generation_result(["109.", "The answer is 13"], examples, keep=True)
    vectors = correct_vectors({"adapter": {"tasks": {"m": scores}}}, ["m"])
    assert vectors["m"].tolist() == [True, False] and scores["correct"] == 1
