"""Row converters of the paper's benchmarks, pure functions from a row in the benchmark's published schema
to an :class:`Example`: eight commonsense tasks (multiple choice) and six math tasks (GSM8K, SVAMP,
MultiArith, AddSub, SingleEQ: generated numbers; AQuA: multiple choice)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from comoe.data.schema import Example

Row = Mapping[str, object]


def _label_index(labels: list[str], key: object, what: str) -> int:
    key = str(key).strip() if key is not None else ""
    if not key:
        raise ValueError(f"{what} is empty (an unlabelled test row?)")
    if key not in labels:
        raise ValueError(f"{what} {key!r} is not among the labels {labels}")
    return labels.index(key)


def _choices_struct(row: Row) -> tuple[tuple[str, ...], list[str]]:
    choices = row["choices"]
    if not isinstance(choices, Mapping):
        raise ValueError(f"'choices' must be an object with 'text' and 'label', got {type(choices).__name__}")
    texts, labels = list(choices["text"]), [str(label).strip() for label in choices["label"]]
    if len(texts) != len(labels) or len(texts) < 2:
        raise ValueError(f"'choices' has {len(texts)} texts and {len(labels)} labels")
    return tuple(str(t) for t in texts), labels


def convert_arc(row: Row, task: str = "arc_e") -> Example:
    """``allenai/ai2_arc``: question, choices{text, label}, answerKey. Labels are "A".."E" or "1".."5"."""
    choices, labels = _choices_struct(row)
    answer = _label_index(labels, row["answerKey"], "answerKey")
    return Example(task, str(row["question"]), choices, answer, meta={"id": row.get("id")})


def convert_obqa(row: Row, task: str = "obqa") -> Example:
    """``allenai/openbookqa`` (config ``main``): question_stem, choices{text, label}, answerKey."""
    choices, labels = _choices_struct(row)
    answer = _label_index(labels, row["answerKey"], "answerKey")
    return Example(task, str(row["question_stem"]), choices, answer, meta={"id": row.get("id")})


BOOLQ_CHOICES = ("no", "yes")


def convert_boolq(row: Row, task: str = "boolq") -> Example:
    """``google/boolq``: question (lower case, no "?"), passage, answer (bool) -> options no / yes."""
    answer = row["answer"]
    if not isinstance(answer, bool):
        raise ValueError(f"'answer' must be a boolean, got {answer!r}")
    question = str(row["question"]).strip()
    question = question[:1].upper() + question[1:]
    if not question.endswith("?"):
        question += "?"
    return Example(task, f"{str(row['passage']).strip()}\nQuestion: {question}", BOOLQ_CHOICES, int(answer))


def convert_piqa(row: Row, task: str = "piqa") -> Example:
    """``ybisk/piqa``: goal, sol1, sol2, label (0/1; -1 on the unlabelled test split)."""
    label = row["label"]
    if label is None or str(label).strip() not in {"0", "1"}:
        raise ValueError(f"'label' must be 0 or 1, got {label!r} (an unlabelled test row?)")
    return Example(task, str(row["goal"]), (str(row["sol1"]), str(row["sol2"])), int(str(label).strip()))


def convert_siqa(row: Row, task: str = "siqa") -> Example:
    """``allenai/social_i_qa``: context, question, answerA/B/C, label "1".."3"."""
    answer = _label_index(["1", "2", "3"], row["label"], "label")
    question = f"{str(row['context']).strip()} {str(row['question']).strip()}"
    choices = (str(row["answerA"]), str(row["answerB"]), str(row["answerC"]))
    return Example(task, question, choices, answer)


def _hellaswag_clean(text: str) -> str:
    # WikiHow rows carry markup such as "[title]", "[step]", "[header]" (same cleanup as lm-eval).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def convert_hellaswag(row: Row, task: str = "hellaswag") -> Example:
    """``Rowan/hellaswag``: activity_label, ctx (or ctx_a + ctx_b), endings[4], label "0".."3"."""
    endings = [_hellaswag_clean(str(e)) for e in row["endings"]]
    answer = _label_index([str(i) for i in range(len(endings))], row["label"], "label")
    if row.get("ctx_a") is not None:
        ctx_b = str(row.get("ctx_b") or "")
        ctx = f"{row['ctx_a']} {ctx_b[:1].upper()}{ctx_b[1:]}"
    else:
        ctx = str(row["ctx"])
    question = _hellaswag_clean(f"{row['activity_label']}: {ctx}")
    return Example(task, question, tuple(endings), answer, meta={"ind": row.get("ind")})


def convert_winogrande(row: Row, task: str = "winogrande") -> Example:
    """``allenai/winogrande``: sentence with a "_" blank, option1, option2, answer "1"/"2"."""
    answer = _label_index(["1", "2"], row["answer"], "answer")
    question = f"{str(row['sentence']).strip()}\nWhich option fills the blank (_)?"
    return Example(task, question, (str(row["option1"]), str(row["option2"])), answer)


# ---------------------------------------------------------------- math converters


def _number_text(value: object, what: str) -> str:
    """A numeric answer as text: 72.0 -> "72", "1,234" -> "1234"; a ValueError when it is no number."""
    text = str(value[0] if isinstance(value, (list, tuple)) and value else value).strip().replace(",", "")
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    return str(int(number)) if number.is_integer() else repr(number)


def _math_example(task: str, question: str, answer: object, what: str, **meta: object) -> Example:
    question = " ".join(str(question).split())
    if not question:
        raise ValueError("the question is empty")
    return Example(task, question, target=_number_text(answer, what), meta=meta)


def convert_gsm8k(row: Row, task: str = "gsm8k") -> Example:
    """``openai/gsm8k`` (config ``main``): question, answer = rationale ending in "#### <number>".

    The target is the final number (the rationale is kept in ``meta``): the model is trained to answer,
    and scored by the final number it gives."""
    answer = str(row["answer"])
    if "####" not in answer:
        raise ValueError(f"'answer' has no '#### <number>' line: {answer[-60:]!r}")
    rationale, final = answer.rsplit("####", 1)
    return _math_example(task, row["question"], final, "the number after ####", rationale=rationale.strip())


def convert_svamp(row: Row, task: str = "svamp") -> Example:
    """``ChilleD/SVAMP``: Body, Question, Answer (a number), Equation."""
    question = f"{str(row['Body']).strip()} {str(row['Question']).strip()}"
    return _math_example(task, question, row["Answer"], "'Answer'", equation=row.get("Equation"))


def convert_mawps(row: Row, task: str = "multiarith") -> Example:
    """MultiArith, AddSub and SingleEQ in any of their published layouts: MAWPS (sQuestion, lSolutions),
    ``ChilleD/MultiArith`` (question, final_ans) or LLM-Adapters' test files (instruction, answer)."""
    for question_key, answer_key in (
        ("sQuestion", "lSolutions"),
        ("question", "final_ans"),
        ("instruction", "answer"),
    ):
        if question_key in row and answer_key in row:
            return _math_example(task, row[question_key], row[answer_key], f"{answer_key!r}")
    raise KeyError("sQuestion + lSolutions (MAWPS), question + final_ans, or instruction + answer")


def convert_aqua(row: Row, task: str = "aqua") -> Example:
    """``deepmind/aqua_rat`` (config ``raw``): question, options ["A)21", ...], rationale, correct "A".."E"."""
    options = [str(o) for o in row["options"]]
    labels = [o.split(")", 1)[0].strip() for o in options]
    choices = tuple(o.split(")", 1)[1].strip() if ")" in o else o for o in options)
    answer = _label_index(labels, row["correct"], "correct")
    return Example(
        task, str(row["question"]).strip(), choices, answer, meta={"rationale": row.get("rationale")}
    )
