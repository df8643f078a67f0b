"""The paper's benchmarks, loaded from the Hugging Face hub in their published schemas: eight commonsense
tasks (multiple choice) and six math tasks (GSM8K, SVAMP, MultiArith, AddSub, SingleEQ: generated numbers;
AQuA: multiple choice).

Each benchmark has a pure row -> :class:`Example` converter (``convert_*``, in
:mod:`comoe.data.benchmark_rows`) and a split map. Test sets
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
``CONNECT_TIMEOUT_S`` seconds (:mod:`comoe.data.hub_access`) and no flag is set, loading fails at once, naming
the offline alternatives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from comoe.data.benchmark_rows import (
    Row,
    convert_aqua,
    convert_arc,
    convert_boolq,
    convert_gsm8k,
    convert_hellaswag,
    convert_mawps,
    convert_obqa,
    convert_piqa,
    convert_siqa,
    convert_svamp,
    convert_winogrande,
)
from comoe.data.hub_access import HubUnavailableError, hub_unavailable_reason, offline_flag
from comoe.data.jsonl import DataError
from comoe.data.schema import Example
from comoe.data.suites import DEFAULT_SUITE_TASKS

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


def offline_message(name: str, reason: str) -> str:
    sources = " or ".join(str(s) for s in BENCHMARKS[name].sources)
    return (
        f"paper benchmark {name!r} is read from the Hugging Face hub ({sources}), which cannot be used: "
        f"{reason}.\nOffline alternatives: the built-in suite tasks {', '.join(DEFAULT_SUITE_TASKS)} "
        f"(e.g. load_task({DEFAULT_SUITE_TASKS[0]!r})), your own file as 'jsonl:PATH' (see comoe.data.jsonl), "
        f"or a local copy of {name} in the hub's schema via load_benchmark({name!r}, data_files=...)."
    )
