"""Numeric answers: the final number of a generated answer, compared as a number.

Math benchmarks (GSM8K, SVAMP, MultiArith, AddSub, SingleEQ, BIG-bench arithmetic) are scored by the
number a model gives, not by its wording: ``"$1,234."``, ``"1234 dollars"`` and ``"The answer is 1234"``
all answer 1234. As in LLM-Adapters' math evaluation, the last number in the text counts and two numbers
match when they differ by less than 0.001.
"""

from __future__ import annotations

import re

TOLERANCE = 1e-3

# A number: optional sign (not a hyphen between two terms, as in "5-3"), digits with optional thousands
# commas, optional decimals; or a bare decimal (".5"); optionally a fraction "a/b".
_NUMBER = re.compile(
    r"(?<![\w.)])(?P<sign>-)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<den>\d+(?:\.\d+)?))?"
    r"(?![\d,]*\d)"
)


def extract_number(text: str) -> float | None:
    """The last number in ``text`` (None if it holds none), tolerant to formatting.

    Thousands commas, currency signs, units, percent signs and trailing punctuation are ignored; a sign
    counts only where it is not a binary minus; ``a/b`` is a fraction. ``"#### 72"`` (GSM8K's answer line)
    gives 72.
    """
    matches = list(_NUMBER.finditer(text.replace("−", "-")))
    if not matches:
        return None
    last = matches[-1]
    value = float(last["num"].replace(",", ""))
    if last["den"] is not None:
        denominator = float(last["den"])
        if denominator == 0:
            return None
        value /= denominator
    return -value if last["sign"] else value


def is_number(text: str) -> bool:
    """Whether ``text`` is one number and nothing else (a reference answer of a numeric task)."""
    return _NUMBER.fullmatch(text.strip().replace("−", "-")) is not None


def numbers_match(answer: str, reference: str) -> bool:
    """Whether the final number of ``answer`` equals the number ``reference`` (within ``TOLERANCE``)."""
    expected, given = extract_number(reference), extract_number(answer)
    return expected is not None and given is not None and abs(given - expected) < TOLERANCE
