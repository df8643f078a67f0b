"""Prompt format shared by training and evaluation (the MixLoRA/CoMoE convention).

A multiple-choice prompt lists the options labelled with letters and ends with ``Answer:``; the
training target and the label-token scorer both use the letter that follows, with a leading space.
"""

from __future__ import annotations

from comoe.data.schema import Example

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_prompt(example: Example) -> str:
    """The text the model sees before its answer."""
    if not example.is_multiple_choice:
        return example.question.rstrip() + "\n"
    if len(example.choices) > len(LETTERS):
        raise ValueError(
            f"{example.task}: {len(example.choices)} options; at most {len(LETTERS)} are supported"
        )
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(example.choices))
    return f"{example.question.rstrip()}\n{options}\nAnswer:"


def answer_text(example: Example) -> str:
    """The text the model is trained to produce after the prompt."""
    if example.is_multiple_choice:
        return " " + LETTERS[example.answer]
    return example.target or ""


def choice_labels(num_choices: int) -> list[str]:
    """The continuation strings whose first tokens the label-token scorer compares."""
    return [" " + LETTERS[i] for i in range(num_choices)]
