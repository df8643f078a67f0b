"""Your own tasks as JSON Lines files: one JSON object per line, UTF-8; blank lines are skipped.

Multiple choice::

    {"question": "Which gas do plants absorb?", "choices": ["Oxygen", "Carbon dioxide"], "answer": 1}

- ``question``: non-empty string: everything shown before the options (passage + question).
- ``choices``: a list of 2 to 26 distinct, non-empty strings.
- ``answer``: the correct option, as a 0-based integer index (``1``), as the exact text of one
  option (``"Carbon dioxide"``), or as a letter (``"B"``; ``"A"`` is the first option). Text is
  matched before letters, so options that are themselves letters work as expected.

Generation::

    {"prompt": "Translate to French: cat", "target": "chat"}

- ``prompt`` (or ``question``, not both): non-empty string; ``target``: non-empty string.

Optional in both kinds:

- ``task``: a plain name (letters, digits, ``_``, ``.``, ``-``; starting with a letter or digit; no
  ``..``) naming the task of this line, so one file can hold several tasks; it becomes a directory
  name in a run (``adapters/<task>``). Without it the task is the file name without ``.jsonl``.
- ``split``: non-empty string such as ``"train"`` or ``"test"``, on every line of the file or on
  none. With splits, ``load_task(path, split=...)`` returns only the lines of that split; without,
  a fifth of each task's distinct inputs is held out as "test"
  (``comoe.data.registry.held_out_split``), so that a run never scores its adapter on the examples
  it trained on.
- ``id``: string or integer, kept in ``Example.meta["id"]``.
- any other field is kept, unchecked, in ``Example.meta``.

Inputs to predict (``read_jsonl(path, labelled=False)``, what ``comoe predict`` reads) follow the same
schema without the labels: ``answer`` (multiple choice) and ``target`` (generation) may be left out, and a
line with only ``prompt`` (or ``question``) is a generation input. A label that is given is checked.

The whole file is checked before anything is returned. Every problem is reported as
``"{path}:{line}: {what is wrong}"`` in a :class:`DataError` (a ``ValueError``), one line per
problem (at most 20 are listed). Given a list as ``skipped``, invalid lines are skipped instead and
their messages appended to it (``--skip-invalid-rows``); problems of the file as a whole (lines with and
without "split") still stop it.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from comoe.data.prompts import LETTERS
from comoe.data.schema import Example

MAX_REPORTED = 20
_KNOWN = {"question", "prompt", "choices", "answer", "target", "task", "split", "id"}
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a "task" value names a directory of a run


SKIP_HINT = "(to leave the invalid lines out instead, listing them, give --skip-invalid-rows)"


class DataError(ValueError):
    """A data file or row that does not follow its schema; ``errors`` holds one message per problem."""

    def __init__(self, errors: list[str], hint: str | None = None):
        self.errors = list(errors)
        shown = self.errors[:MAX_REPORTED]
        if len(self.errors) > MAX_REPORTED:
            shown.append(f"... and {len(self.errors) - MAX_REPORTED} more problems")
        super().__init__("\n".join(shown + ([hint] if hint else [])))


class _RowError(Exception):
    pass


def read_jsonl(
    path: str | Path,
    default_task: str | None = None,
    *,
    skipped: list[str] | None = None,
    labelled: bool = True,
) -> list[Example]:
    """Read and validate a whole JSONL file (see the module docstring for the schema, ``skipped`` and
    ``labelled``)."""
    path = Path(path)
    return parse_jsonl(
        path.read_bytes(),
        source=str(path),
        default_task=default_task or _stem(path.name),
        skipped=skipped,
        labelled=labelled,
    )


def parse_jsonl(
    data: bytes | str,
    source: str,
    default_task: str,
    *,
    skipped: list[str] | None = None,
    labelled: bool = True,
) -> list[Example]:
    """Validate and convert JSONL content; ``source`` names it in error messages. With a list as
    ``skipped``, invalid lines are left out and their messages appended to it; with ``labelled`` false,
    the labels may be left out (inputs to predict)."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="surrogateescape")
    if data.startswith("\ufeff"):
        data = data[1:]
    examples: list[Example] = []
    errors: list[str] = []
    invalid = errors if skipped is None else []  # the lines that are wrong on their own
    first_of_task: dict[str, tuple[int, bool]] = {}  # task -> (line, is multiple choice) of its first line
    has_split: list[tuple[int, bool]] = []  # (line, has a "split") of every valid line
    # Split on "\n" only: str.splitlines() also breaks at U+2028 and friends, which JSON strings may hold.
    for lineno, line in enumerate(data.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            example = replace(parse_record(_load_line(line), default_task, labelled), line=lineno)
        except _RowError as exc:
            invalid.append(f"{source}:{lineno}: {exc}")
            continue
        first_line, first_mc = first_of_task.setdefault(example.task, (lineno, example.is_multiple_choice))
        if example.is_multiple_choice != first_mc:
            kinds = {True: "multiple choice", False: "generation"}
            invalid.append(
                f"{source}:{lineno}: task {example.task!r} mixes {kinds[first_mc]} (line {first_line}) and "
                f"{kinds[example.is_multiple_choice]} lines; a task holds one kind: put each kind in its own "
                f'file, or give these lines another "task"'
            )
            continue
        has_split.append((lineno, "split" in example.meta))
        examples.append(example)
    line_errors = len(invalid)
    if labelled:  # inputs to predict have no splits to keep apart
        errors += _partial_splits(has_split, source)
    if skipped is not None:
        skipped += invalid
        if invalid and not examples:
            errors.append(
                f"{source}: every line is invalid ({len(invalid)} skipped; the first: {invalid[0]}); "
                "fix the file (see comoe.data.jsonl for the schema)"
            )
    if not errors and not examples:
        errors.append(
            f"{source}:1: empty file: no JSON records; write one JSON object per line "
            "(see comoe.data.jsonl for the schema)"
        )
    if errors:
        only_lines = skipped is None and line_errors == len(errors)  # no problem of the whole file
        raise DataError(errors, SKIP_HINT if only_lines else None)
    return examples


def _partial_splits(has_split: list[tuple[int, bool]], source: str) -> list[str]:
    """An error for each line without a "split" in a file where some line has one."""
    first = next((lineno for lineno, labelled in has_split if labelled), None)
    if first is None:
        return []
    return [
        f'{source}:{lineno}: this line has no "split" but line {first} has one; give every line a "split" or none'
        for lineno, labelled in has_split
        if not labelled
    ]


def _load_line(line: str) -> dict:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        raise _RowError("not valid UTF-8") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _RowError(
            f"invalid JSON: {exc.msg} (column {exc.colno}); each line must be one complete JSON object"
        ) from None
    if not isinstance(obj, dict):
        raise _RowError(f"expected a JSON object, got {_kind(obj)}")
    return obj


def parse_record(obj: dict, default_task: str, labelled: bool = True) -> Example:
    """One JSON object -> Example; raises ``_RowError`` with what is wrong. Without ``labelled``, ``answer``
    and ``target`` may be missing (the Example's ``answer`` / ``target`` are then None)."""
    meta = {k: v for k, v in obj.items() if k not in _KNOWN}
    task = _task_name(obj) or default_task
    if "split" in obj:
        meta["split"] = _text(obj, "split")
    if "id" in obj:
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            raise _RowError(f"'id' must be a string or an integer, got {_kind(obj['id'])}")
        meta["id"] = obj["id"]

    if "choices" in obj:
        if "target" in obj:
            raise _RowError("give 'choices' + 'answer' (multiple choice) or 'target' (generation), not both")
        question = _text(obj, "question")
        choices = _choices(obj["choices"])
        if "answer" not in obj:
            if not labelled:
                return Example(task, question, choices, meta=meta)
            raise _RowError(
                "missing field 'answer': give the correct option as a 0-based index, its text or a letter"
            )
        return Example(task, question, choices, _answer(obj["answer"], choices), meta=meta)
    if "answer" in obj:
        raise _RowError("missing field 'choices' ('answer' needs a list of options)")
    if "target" in obj or (not labelled and ("prompt" in obj or "question" in obj)):
        if "prompt" in obj and "question" in obj:
            raise _RowError("give either 'prompt' or 'question', not both")
        prompt = _text(obj, "prompt" if "prompt" in obj else "question")
        target = _text(obj, "target") if "target" in obj else None
        return Example(task, prompt, target=target, meta=meta)
    if not labelled:
        raise _RowError(
            "missing fields: need 'question' and 'choices' (multiple choice) or 'prompt' (generation)"
        )
    raise _RowError(
        "missing fields: need 'question', 'choices', 'answer' (multiple choice) or 'prompt', 'target' (generation)"
    )


def _text(obj: dict, key: str) -> str:
    if key not in obj:
        raise _RowError(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise _RowError(f"'{key}' must be a string, got {_kind(value)}")
    if not value.strip():
        raise _RowError(f"'{key}' is empty")
    return value


def _optional_text(obj: dict, key: str) -> str | None:
    return _text(obj, key) if key in obj else None


def _task_name(obj: dict) -> str | None:
    task = _optional_text(obj, "task")
    if task is not None and (not TASK_NAME.fullmatch(task) or ".." in task):
        raise _RowError(
            f"'task' {task!r} is not a plain name: use letters, digits, '_', '.' and '-', starting "
            "with a letter or digit and without '..' (it becomes a directory name in a run)"
        )
    return task


def _choices(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _RowError(f"'choices' must be a list of strings, got {_kind(value)}")
    if len(value) < 2:
        raise _RowError(f"'choices' needs at least 2 options, got {len(value)}")
    if len(value) > len(LETTERS):
        raise _RowError(f"'choices' has {len(value)} options; at most {len(LETTERS)} are supported")
    for i, choice in enumerate(value):
        if not isinstance(choice, str):
            raise _RowError(f"choice {i} must be a string, got {_kind(choice)}")
        if not choice.strip():
            raise _RowError(f"choice {i} is empty")
    seen: set[str] = set()
    for choice in value:
        if choice in seen:
            raise _RowError(f"choice {choice!r} appears twice; the options must be distinct")
        seen.add(choice)
    return tuple(value)


def _answer(value: object, choices: tuple[str, ...]) -> int:
    n = len(choices)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _RowError(
            f"'answer' must be an integer index, an option's text or a letter, got {_kind(value)}"
        )
    if isinstance(value, int):
        if not 0 <= value < n:
            raise _RowError(f"answer index {value} out of range for {n} choices (0..{n - 1})")
        return value
    if value in choices:
        return choices.index(value)
    if len(value) == 1 and value.upper() in LETTERS:
        index = LETTERS.index(value.upper())
        if index >= n:
            raise _RowError(f"answer letter {value!r} out of range for {n} choices (A..{LETTERS[n - 1]})")
        return index
    raise _RowError(f"answer {value!r} is not one of the choices (nor a letter A..{LETTERS[n - 1]})")


def _kind(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _stem(name: str) -> str:
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else Path(name).stem
