"""The paper's benchmarks, loaded from the Hugging Face hub in their published schemas: eight commonsense
tasks (multiple choice) and six math tasks (GSM8K, SVAMP, MultiArith, AddSub, SingleEQ: generated numbers;
AQuA: multiple choice).

Each benchmark has a pure row -> :class:`Example` converter (``convert_*``) and a split map. Test sets
published without labels (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande) are replaced by the validation
split, as the paper and the MixLoRA framework do: for those five ``"test"`` and ``"validation"`` give
the same examples. ARC and OpenBookQA have labelled test splits and use them.

Script-based hub datasets no longer load with ``datasets`` >= 4; PIQA and SIQA are therefore read from
the hub's automatic Parquet conversion (``revision="refs/convert/parquet"``), SIQA with a verified
mirror (``lighteval/siqa``, same rows) as a fallback.

``data_files=`` reads local files in the same schema instead of the hub (JSON Lines, JSON, Parquet or
CSV, through ``datasets.load_dataset``); that is how the tests run without network. Without it, with
``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, ``datasets`` reads its own cache (a benchmark loaded once
online loads offline); with no cached copy, or when the hub does not answer a TCP connection within
``CONNECT_TIMEOUT_S`` seconds and no flag is set, loading fails at once, naming the offline alternatives.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from comoe.data.jsonl import DataError
from comoe.data.schema import Example
from comoe.data.suites import BUILTIN_SUITE

CONNECT_TIMEOUT_S = 3.0
_NEGATIVE_CACHE_S = 60.0
_TRUTHY = {"1", "on", "yes", "true"}

Row = Mapping[str, object]


class HubUnavailableError(ConnectionError):
    """The Hugging Face hub cannot be used (offline mode or no connection)."""


# ---------------------------------------------------------------- converters (pure, row -> Example)


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


# ---------------------------------------------------------------- the benchmarks


@dataclass(frozen=True)
class HubSource:
    path: str
    name: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        out = self.path + (f"[{self.name}]" if self.name else "")
        return out + (f"@{self.revision}" if self.revision else "")


_LABELLED = {"train": "train", "validation": "validation", "test": "test"}
_TRAIN_TEST = {"train": "train", "test": "test"}
_VALIDATION_AS_TEST = {"train": "train", "validation": "validation", "test": "validation"}
_PARQUET = "refs/convert/parquet"


@dataclass(frozen=True)
class Benchmark:
    name: str
    sources: tuple[HubSource, ...]  # tried in order; none: local files only (``data_files=``)
    convert: Callable[..., Example]
    splits: Mapping[str, str]  # our split name -> the hub's


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("arc_e", (HubSource("allenai/ai2_arc", "ARC-Easy"),), convert_arc, _LABELLED),
        Benchmark("arc_c", (HubSource("allenai/ai2_arc", "ARC-Challenge"),), convert_arc, _LABELLED),
        Benchmark("boolq", (HubSource("google/boolq"),), convert_boolq, _VALIDATION_AS_TEST),
        Benchmark("obqa", (HubSource("allenai/openbookqa", "main"),), convert_obqa, _LABELLED),
        Benchmark("piqa", (HubSource("ybisk/piqa", "default", _PARQUET),), convert_piqa, _VALIDATION_AS_TEST),
        Benchmark(
            "siqa",
            (HubSource("allenai/social_i_qa", "default", _PARQUET), HubSource("lighteval/siqa")),
            convert_siqa,
            _VALIDATION_AS_TEST,
        ),
        Benchmark("hellaswag", (HubSource("Rowan/hellaswag"),), convert_hellaswag, _VALIDATION_AS_TEST),
        Benchmark(
            "winogrande",
            (HubSource("allenai/winogrande", "winogrande_xl"),),
            convert_winogrande,
            _VALIDATION_AS_TEST,
        ),
        # math (the paper's Table 3): generated numbers, AQuA as multiple choice
        Benchmark("gsm8k", (HubSource("openai/gsm8k", "main"),), convert_gsm8k, _TRAIN_TEST),
        Benchmark("svamp", (HubSource("ChilleD/SVAMP"),), convert_svamp, _TRAIN_TEST),
        Benchmark("multiarith", (HubSource("ChilleD/MultiArith"),), convert_mawps, _TRAIN_TEST),
        Benchmark("addsub", (), convert_mawps, _TRAIN_TEST),
        Benchmark("singleeq", (), convert_mawps, _TRAIN_TEST),
        Benchmark("aqua", (HubSource("deepmind/aqua_rat", "raw"),), convert_aqua, _LABELLED),
    )
}
PAPER_BENCHMARKS: tuple[str, ...] = tuple(BENCHMARKS)
MATH_BENCHMARKS: tuple[str, ...] = ("gsm8k", "svamp", "multiarith", "addsub", "singleeq", "aqua")


def load_benchmark(
    name: str,
    split: str = "train",
    *,
    data_files: str | Path | list | dict | None = None,
    cache_dir: str | Path | None = None,
) -> list[Example]:
    """Load a paper benchmark split as Examples, from the hub or from ``data_files`` in its schema.

    ``data_files``: one file or a list of files holding the requested split, or a dict
    ``{hub split name: files}`` as ``datasets.load_dataset`` takes it.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown paper benchmark {name!r}; known: {', '.join(PAPER_BENCHMARKS)}")
    bench = BENCHMARKS[name]
    if split not in bench.splits:
        raise ValueError(f"{name}: unknown split {split!r}; use one of {', '.join(bench.splits)}")
    hub_split = bench.splits[split]
    if data_files is None and not bench.sources:
        raise ValueError(
            f"{name}: comoe knows no hub copy of it; load its files with load_task({name!r}, split, "
            "data_files=...) (MAWPS or LLM-Adapters layout), or write them as a JSONL task (prompt, target) "
            "and name it jsonl:PATH"
        )
    if data_files is not None:
        rows, source = _load_local(data_files, hub_split, cache_dir), _describe(data_files)
    elif offline_flag():  # datasets honours the flag itself: it reads its cache, or fails without network
        try:
            rows, source = _load_hub(bench, hub_split, cache_dir)
        except RuntimeError as err:
            raise HubUnavailableError(
                offline_message(name, f"{offline_flag()} is set and the datasets cache holds no copy ({err})")
            ) from None
    else:
        reason = hub_unavailable_reason()
        if reason:
            raise HubUnavailableError(
                offline_message(name, reason) + " With a warm datasets cache, set "
                "HF_DATASETS_OFFLINE=1 to read it."
            )
        rows, source = _load_hub(bench, hub_split, cache_dir)

    examples, errors = [], []
    for index, row in enumerate(rows):
        try:
            example = bench.convert(row, task=name)
        except (ValueError, KeyError, TypeError) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            errors.append(f"{source} row {index}: {detail}")  # 0-based row index
            continue
        meta = {k: v for k, v in example.meta.items() if v is not None}
        meta["source_split"] = hub_split
        examples.append(
            Example(
                example.task, example.question, example.choices, example.answer, example.target, meta=meta
            )
        )
    if errors:
        raise DataError(errors)
    return examples


def _describe(data_files: object) -> str:
    if isinstance(data_files, (str, Path)):
        return str(data_files)
    if isinstance(data_files, Mapping):
        return ",".join(f"{k}={v}" for k, v in data_files.items())
    return ",".join(str(f) for f in data_files)  # type: ignore[union-attr]


def _builder_for(files: Iterable[str]) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    if suffixes <= {".json", ".jsonl"}:
        return "json"
    if suffixes == {".parquet"}:
        return "parquet"
    if suffixes == {".csv"}:
        return "csv"
    raise ValueError(f"data_files must all be .jsonl/.json, .parquet or .csv files, got {sorted(suffixes)}")


def _load_local(data_files, hub_split: str, cache_dir) -> Iterable[Row]:
    from datasets import load_dataset

    if isinstance(data_files, Mapping):
        if hub_split not in data_files:
            raise ValueError(f"data_files has no {hub_split!r} split (has {', '.join(data_files)})")
        files = [str(f) for v in data_files.values() for f in ([v] if isinstance(v, (str, Path)) else v)]
        split, data_files = hub_split, {k: _strs(v) for k, v in data_files.items()}
    else:
        files = _strs(data_files)
        split, data_files = "train", files
    cache = str(cache_dir) if cache_dir is not None else None
    return load_dataset(_builder_for(files), data_files=data_files, split=split, cache_dir=cache)


def _strs(value) -> list[str]:
    return [str(value)] if isinstance(value, (str, Path)) else [str(v) for v in value]


def _load_hub(bench: Benchmark, hub_split: str, cache_dir) -> tuple[Iterable[Row], str]:
    from datasets import load_dataset

    failures = []
    for src in bench.sources:
        try:
            rows = load_dataset(
                src.path,
                src.name,
                split=hub_split,
                revision=src.revision,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
            )
            return rows, f"{src}/{hub_split}"
        except Exception as exc:  # noqa: BLE001 - every hub/dataset error means: try the next source
            failures.append(f"{src}: {type(exc).__name__}: {exc}")
    raise RuntimeError(f"could not load {bench.name} ({hub_split}) from the hub:\n" + "\n".join(failures))


# ---------------------------------------------------------------- offline detection

_probe_cache: dict[tuple[str, int], tuple[float, bool]] = {}


def offline_flag() -> str | None:
    """``VAR=value`` of the first offline flag set (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``), or None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return f"{var}={os.environ[var]}"
    return None


def hub_unavailable_reason(timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used right now, or None when it answers."""
    flag = offline_flag()
    if flag:
        return f"{flag} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = next(
        (
            os.environ[v]
            for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(v)
        ),
        None,
    )
    url = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    if _reachable(host, port, timeout):
        return None
    via = f" through the proxy {host}:{port}" if proxy else f" ({host}:{port})"
    return f"no connection to {endpoint}{via} within {timeout:g} s"


def _reachable(host: str, port: int, timeout: float) -> bool:
    """TCP connect, bounded by ``timeout`` including name resolution; failures are cached for a minute."""
    cached = _probe_cache.get((host, port))
    if cached and not cached[1] and time.monotonic() - cached[0] < _NEGATIVE_CACHE_S:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    ok = bool(result and result[0])
    _probe_cache[(host, port)] = (time.monotonic(), ok)
    return ok


def offline_message(name: str, reason: str) -> str:
    sources = " or ".join(str(s) for s in BENCHMARKS[name].sources)
    return (
        f"paper benchmark {name!r} is read from the Hugging Face hub ({sources}), which cannot be used: "
        f"{reason}.\nOffline alternatives: the built-in suite tasks {', '.join(BUILTIN_SUITE)} "
        f"(e.g. load_task({BUILTIN_SUITE[0]!r})), your own file as 'jsonl:PATH' (see comoe.data.jsonl), "
        f"or a local copy of {name} in the hub's schema via load_benchmark({name!r}, data_files=...)."
    )
