"""The one record type every task loader produces and every trainer/evaluator consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One example of a task.

    Multiple choice: ``choices`` holds the option texts and ``answer`` the index of the correct one.
    Generation: ``choices`` is empty, ``answer`` is None and ``target`` holds the reference text.
    ``question`` is the full context shown before the options (passage + question), without options.
    """

    task: str
    question: str
    choices: tuple[str, ...] = ()
    answer: int | None = None
    target: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    line: int | None = field(default=None, compare=False, hash=False)  # its line in a JSONL file

    @property
    def is_multiple_choice(self) -> bool:
        return len(self.choices) > 0
