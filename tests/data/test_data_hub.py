"""Paper benchmarks: the row converters, the loading path on hub-schema fixtures, offline failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comoe.data import DEFAULT_SUITE_TASKS, hub, hub_access, load_task
from comoe.data.benchmark_rows import (
    convert_arc,
    convert_boolq,
    convert_hellaswag,
    convert_obqa,
    convert_piqa,
    convert_siqa,
    convert_winogrande,
)
from comoe.data.hub import PAPER_BENCHMARKS, load_benchmark
from comoe.data.hub_access import HubUnavailableError
from comoe.data.jsonl import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hub"

# benchmark -> answers of the fixture rows, in order
EXPECTED = {
    "arc_e": [1, 0, 2, 2],
    "arc_c": [1, 2, 1],
    "boolq": [1, 0, 0],
    "obqa": [1, 1, 3],
    "piqa": [0, 1, 0],
    "siqa": [0, 1, 2],
    "hellaswag": [0, 1, 3],
    "winogrande": [0, 1, 0],
    "aqua": [1, 0, 4],
    # generated: the reference numbers
    "gsm8k": ["29", "3600", "10"],
    "svamp": ["13", "18", "4.5"],
    "multiarith": ["19", "18", "5"],
    "addsub": ["43", "53", "9.75"],
    "singleeq": ["13", "35", "48"],
}


def test_every_benchmark_has_a_fixture():
    assert sorted(EXPECTED) == sorted(PAPER_BENCHMARKS)
    assert sorted(p.stem for p in FIXTURES.glob("*.jsonl")) == sorted(PAPER_BENCHMARKS)


def test_convert_arc_numeric_labels_and_odd_sizes():
    row = {
        "id": "x",
        "question": "Q?",
        "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
        "answerKey": "3",
    }
    example = convert_arc(row, task="arc_c")
    assert (example.task, example.question, example.choices, example.answer) == (
        "arc_c",
        "Q?",
        ("a", "b", "c"),
        2,
    )
    with pytest.raises(ValueError, match="not among the labels"):
        convert_arc({**row, "answerKey": "D"})


def test_convert_obqa():
    row = {
        "id": "1",
        "question_stem": "Stem",
        "choices": {"text": ["w", "x", "y", "z"], "label": list("ABCD")},
        "answerKey": "D",
    }
    assert convert_obqa(row).choices == ("w", "x", "y", "z") and convert_obqa(row).answer == 3


def test_convert_boolq():
    example = convert_boolq({"question": "is water wet", "answer": True, "passage": "Water is wet."})
    assert example.question == "Water is wet.\nQuestion: Is water wet?"
    assert example.choices == ("no", "yes") and example.answer == 1
    with pytest.raises(ValueError, match="boolean"):
        convert_boolq({"question": "q", "answer": "yes", "passage": "p"})


def test_convert_piqa():
    example = convert_piqa({"goal": "g", "sol1": "a", "sol2": "b", "label": 1})
    assert (example.question, example.choices, example.answer) == ("g", ("a", "b"), 1)
    with pytest.raises(ValueError, match="unlabelled"):
        convert_piqa({"goal": "g", "sol1": "a", "sol2": "b", "label": -1})


def test_convert_siqa():
    row = {"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c", "label": "3"}
    example = convert_siqa(row)
    assert (example.question, example.choices, example.answer) == ("C. Q?", ("a", "b", "c"), 2)


def test_convert_hellaswag_cleans_wikihow_markup():
    row = {
        "activity_label": "Home",
        "ctx_a": "[header] How to x [title] Do y. [step] Then z.",
        "ctx_b": "",
        "ctx": "unused",
        "endings": ["[title] A. [step] B.", "c", "d", "e"],
        "label": "0",
    }
    example = convert_hellaswag(row)
    assert "[" not in example.question and "[" not in example.choices[0]
    assert example.question.startswith("Home: ") and example.answer == 0
    example = convert_hellaswag({"activity_label": "A", "ctx": "x y", "endings": ["1", "2"], "label": "1"})
    assert example.question == "A: x y" and example.answer == 1
    with pytest.raises(ValueError, match="unlabelled"):
        convert_hellaswag({**row, "label": ""})


def test_convert_winogrande():
    example = convert_winogrande({"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"})
    assert example.question.startswith("A _ b.") and example.choices == ("x", "y") and example.answer == 1


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_load_fixture_through_datasets(name, tmp_path):
    fixture = FIXTURES / f"{name}.jsonl"
    examples = load_benchmark(name, "train", data_files=fixture, cache_dir=tmp_path)
    generated = isinstance(EXPECTED[name][0], str)
    assert [e.target if generated else e.answer for e in examples] == EXPECTED[name]
    rows = [json.loads(line) for line in fixture.read_text().splitlines()]
    for example, row in zip(examples, rows, strict=True):
        assert example.task == name and example.is_multiple_choice is not generated
        assert example == hub.BENCHMARKS[name].convert(row, task=name)
        assert example.meta["source_split"] == "train"


def test_math_converters_read_every_published_layout_and_name_bad_answers():
    from comoe.data.benchmark_rows import convert_aqua, convert_gsm8k, convert_mawps

    gsm = convert_gsm8k({"question": "Q?", "answer": "2 + 2 = 4\n#### 4"})
    assert (gsm.question, gsm.target, gsm.meta["rationale"]) == ("Q?", "4", "2 + 2 = 4")
    with pytest.raises(ValueError, match="no '#### <number>' line"):
        convert_gsm8k({"question": "Q?", "answer": "4"})
    layouts = [
        {"sQuestion": "Q?", "lSolutions": [2.0]},
        {"question": "Q?", "final_ans": "2"},
        {"instruction": "Q?", "answer": "2.0"},
    ]
    assert {convert_mawps(row, task="addsub").target for row in layouts} == {"2"}
    with pytest.raises(ValueError, match="'answer' must be a number, got 'two'"):
        convert_mawps({"instruction": "Q?", "answer": "two"})
    with pytest.raises(KeyError, match="sQuestion"):
        convert_mawps({"text": "Q?"})
    aqua = convert_aqua({"question": "Q?", "options": ["A)1", "B)2 )", "C)3"], "correct": "B"})
    assert aqua.choices == ("1", "2 )", "3") and aqua.answer == 1


def test_math_benchmarks_without_a_hub_copy_ask_for_files():
    with pytest.raises(ValueError, match="no hub copy of it; load its files"):
        load_benchmark("addsub", "test")


def test_unlabelled_test_split_maps_to_validation(tmp_path):
    files = {"validation": str(FIXTURES / "piqa.jsonl")}
    examples = load_task("piqa", "test", data_files=files)
    assert [e.meta["source_split"] for e in examples] == ["validation"] * 3
    assert len(load_benchmark("arc_e", "test", data_files={"test": str(FIXTURES / "arc_e.jsonl")})) == 4
    with pytest.raises(ValueError, match="no 'test' split"):
        load_benchmark("arc_e", "test", data_files={"validation": str(FIXTURES / "arc_e.jsonl")})


def test_bad_rows_name_source_and_row(tmp_path):
    path = tmp_path / "hellaswag_test.jsonl"
    rows = [json.loads(line) for line in (FIXTURES / "hellaswag.jsonl").read_text().splitlines()]
    rows[1]["label"] = ""
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=rf"{path.name} row 1: label is empty"):
        load_benchmark("hellaswag", "validation", data_files=path, cache_dir=tmp_path)


OFFLINE_LOAD = (
    "import sys; from comoe.data.registry import load_task\n"
    "examples = load_task('arc_e', 'test')\n"
    "print(len(examples), examples[0].choices[examples[0].answer])"
)


def offline_env(tmp_path: Path, var: str) -> dict[str, str]:
    """A fresh interpreter's environment: offline flag set before datasets is imported, caches in tmp."""
    return {
        **os.environ,
        var: "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
    }


def warm_datasets_cache(cache: Path) -> None:
    """Lay ARC-Easy's fixture rows out as `datasets` caches a hub dataset it has prepared once online:
    prepared by datasets' own builder, under ``allenai___ai2_arc/ARC-Easy/<version>/<hash>/``."""
    import datasets

    builder = datasets.load_dataset_builder(
        "json", data_files={"test": str(FIXTURES / "arc_e.jsonl")}, cache_dir=str(cache / "build")
    )
    builder.download_and_prepare()
    target = cache / "allenai___ai2_arc" / "ARC-Easy" / "0.0.0" / "0123456789abcdef"
    target.mkdir(parents=True)
    for path in Path(builder.cache_dir).iterdir():
        shutil.copy(path, target / path.name.replace("json-", "ai2_arc-"))
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(
        json.dumps({**info, "config_name": "ARC-Easy", "dataset_name": "ai2_arc"})
    )


@pytest.mark.slow
def test_offline_flag_reads_a_warm_datasets_cache(tmp_path, var="HF_DATASETS_OFFLINE"):
    warm_datasets_cache(tmp_path / "datasets")
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD],
        env=offline_env(tmp_path, var),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["4", "a", "balance"]  # the fixture's 4 rows, converted


@pytest.mark.slow
def test_offline_flag_without_a_cached_copy_names_the_alternatives(tmp_path, var="HF_HUB_OFFLINE"):
    """The other flag than the test above: datasets honours both."""
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD],
        env=offline_env(tmp_path, var),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "HubUnavailableError" in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("HubUnavailableError") :]
    assert f"{var}=1" in message and "holds no copy" in message and "jsonl:PATH" in message
    assert all(name in message for name in DEFAULT_SUITE_TASKS), message


def test_unreachable_hub_fails_within_the_timeout(monkeypatch):
    for var in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(hub_access, "_probe_cache", {})
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match="no connection to http://127.0.0.1:9"):
        load_task("winogrande", "validation")
    assert time.monotonic() - start < hub_access.CONNECT_TIMEOUT_S + 1.0


def test_unknown_benchmark_and_split():
    with pytest.raises(ValueError, match="known: arc_e"):
        load_benchmark("mmlu")
    with pytest.raises(ValueError, match="unknown split 'dev2'"):
        load_benchmark("boolq", "dev2")
