"""`comoe predict` end to end: a run on the README's example files, then its adapter applied to the
README's unlabelled file, from the run directory and from the bare adapter directory; predictions equal
what `comoe eval` counts; routing per input; bad input refused before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from comoe.cli.app import main as run_cli
from comoe.data.jsonl import read_jsonl
from comoe.evaluation.batches import prompt_sequences
from comoe.evaluation.scoring import evaluate_tasks
from comoe.training import predict as predict_module
from comoe.training.adapters import load_adapted_model
from comoe.training.base_models import load_base_model
from comoe.training.predict import PREDICTIONS_NAME, SUMMARY_NAME, predict_job
from tests.cli_runs import comoe_cli

pytestmark = pytest.mark.slow  # trains a run and predicts through the real command line

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
QUESTIONS = EXAMPLES / "questions.jsonl"  # the README's unlabelled file
LABELLED = [EXAMPLES / "sentiment.jsonl", EXAMPLES / "capitals.jsonl"]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A 3-step CoMoE run on the README's two example files (multiple choice and generation)."""
    out = tmp_path_factory.mktemp("predict") / "run"
    tasks = ",".join(f"jsonl:{path}" for path in LABELLED)
    comoe_cli(
        "train", "--model", str(tiny_model_dir), "--tasks", tasks, "--batch-size", "4", "--r", "4",
        "--max-steps", "3", "--eval-base", "false", "--output-dir", str(out),
    )  # fmt: skip
    return out


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_answers_every_line_in_order_from_a_run_and_from_its_adapter(
    run_dir, tiny_model_dir, tmp_path
):
    # the README's command, with the run directory
    result = comoe_cli(
        "predict", str(run_dir), "--input", str(QUESTIONS), "--output-dir", str(tmp_path / "p")
    )
    assert f"5 predictions (run {run_dir})" in result.stdout
    rows = read_lines(tmp_path / "p" / PREDICTIONS_NAME)
    inputs = read_lines(QUESTIONS)
    assert [row["id"] for row in rows] == [line["id"] for line in inputs]
    assert [row["line"] for row in rows] == [1, 2, 3, 4, 5]
    for row, given in zip(rows, inputs, strict=True):
        assert row["task"] == given["task"]
        if "choices" in given:
            assert len(row["scores"]) == 2 and all(score <= 0 for score in row["scores"])  # log-probabilities
            assert row["choice"] == max(range(2), key=row["scores"].__getitem__)
            assert row["prediction"] == given["choices"][row["choice"]]
        else:
            assert isinstance(row["prediction"], str) and "choice" not in row
    summary = json.loads((tmp_path / "p" / SUMMARY_NAME).read_text())
    assert summary["n"] == 5 and summary["protocol"] == "label" and "scored" not in summary

    # the README's second command: a bare adapter directory, its base named, routing asked for
    comoe_cli(
        "predict", str(run_dir / "adapter"), "--model", str(tiny_model_dir), "--input", str(QUESTIONS),
        "--output-dir", str(tmp_path / "a"), "--score-answers", "--routing",
    )  # fmt: skip
    again = read_lines(tmp_path / "a" / PREDICTIONS_NAME)
    assert all(row.pop("routing") for row in again)  # no line is labelled: nothing to score
    assert again == rows


def test_predictions_are_what_eval_counts_and_answers_are_scored_on_request(
    run_dir, tiny_model_dir, tmp_path
):
    """On labelled files with --score-answers: each choice is eval's prediction, each verdict eval's."""
    tasks = {path.stem: read_jsonl(path) for path in LABELLED}
    model = load_adapted_model(load_base_model(str(tiny_model_dir))[0], run_dir / "adapter")
    tokenizer = load_base_model(str(tiny_model_dir))[1]
    expected = evaluate_tasks(model, tokenizer, tasks, return_predictions=True, progress=False)["tasks"]
    both = tmp_path / "both.jsonl"  # one file, each line naming its task; split fields on some lines only
    lines = [
        {**json.loads(line), "task": path.stem} for path in LABELLED for line in path.read_text().splitlines()
    ]
    both.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # the bare adapter without --model: its base is the one adapter_config.json records
    adapter = run_dir / "adapter"
    summary = predict_job(adapter, both, tmp_path / "out", score_answers=True, routing=True, progress=False)
    assert summary["model"] == str(tiny_model_dir)
    rows = read_lines(tmp_path / "out" / PREDICTIONS_NAME)
    sentiment = [row for row in rows if row["task"] == "sentiment"]
    assert [row["choice"] for row in sentiment] == expected["sentiment"]["predictions"]
    capitals = [row for row in rows if row["task"] == "capitals"]
    assert [row["prediction"] for row in capitals] == expected["capitals"]["predictions"]
    assert [row["correct"] for row in capitals] == expected["capitals"]["hits"]
    for task, scores in expected.items():
        assert summary["scored"][task]["correct"] == scores["correct"]
    # routing: every routed layer of the adapter, each prompt token counted once per expert it uses (k = 2)
    layers = set(model.routed_modules)
    examples = read_jsonl(both, labelled=False)
    prompts = prompt_sequences(tokenizer, examples, max_length=256)  # the run's max_length
    for row, prompt in zip(rows, prompts, strict=True):
        assert set(row["routing"]) == layers
        assert {sum(counts) for counts in row["routing"].values()} == {2 * len(prompt)}


def refused(argv: list[str], capsys, monkeypatch) -> str:
    """Run `comoe predict` in process with model loading forbidden; the one-line error it printed."""
    monkeypatch.setattr(predict_module, "load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    capsys.readouterr()
    assert run_cli(["predict", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("comoe predict: error: ") and "Traceback" not in err
    return err


def test_bad_input_is_refused_before_any_model_loads(run_dir, tmp_path, capsys, monkeypatch):
    out = ["--output-dir", str(tmp_path / "out")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no options", "answer": 1}\n')
    err = refused([str(run_dir), "--input", str(bad), *out], capsys, monkeypatch)
    assert f"{bad}:2: missing field 'choices'" in err
    err = refused([str(run_dir), "--input", str(tmp_path / "none.jsonl"), *out], capsys, monkeypatch)
    assert "none.jsonl" in err
    err = refused([str(tmp_path), "--input", str(QUESTIONS), *out], capsys, monkeypatch)
    assert "holds neither run_config.yaml nor adapter_config.json" in err
    err = refused(
        [str(run_dir), "--input", str(QUESTIONS), *out, "--max-new-tokens", "0"], capsys, monkeypatch
    )
    assert "--max-new-tokens must be >= 1" in err
    err = refused([str(run_dir), "--input", str(QUESTIONS), *out, "--protocol", "vote"], capsys, monkeypatch)
    assert "protocol" in err

    # an adapter that does not name its base needs --model
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    err = refused([str(adapter), "--input", str(QUESTIONS), *out], capsys, monkeypatch)
    assert "give it with --model" in err

    # predictions already there are never overwritten
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / PREDICTIONS_NAME).write_text("mine\n")
    err = refused([str(run_dir), "--input", str(QUESTIONS), *out], capsys, monkeypatch)
    assert "exists; choose another --output-dir" in err
    assert (tmp_path / "out" / PREDICTIONS_NAME).read_text() == "mine\n"


def test_a_single_task_run_answers_each_line_with_its_task_adapter(tiny_model_dir, tmp_path):
    """`comoe train --setting single` → `comoe predict RUN`: each input line goes to the adapter trained on
    its `task`; the same line through that adapter's own directory gives the same answer."""
    run = tmp_path / "single"
    tasks = ",".join(f"jsonl:{path}" for path in LABELLED)
    comoe_cli(
        "train", "--model", str(tiny_model_dir), "--tasks", tasks, "--setting", "single", "--batch-size", "4",
        "--r", "4", "--max-steps", "2", "--eval-base", "false", "--output-dir", str(run),
    )  # fmt: skip
    assert run_cli(["predict", str(run), "--input", str(QUESTIONS), "--output-dir", str(tmp_path / "p")]) == 0
    rows = read_lines(tmp_path / "p" / PREDICTIONS_NAME)
    assert [row["task"] for row in rows] == [line["task"] for line in read_lines(QUESTIONS)]
    for task in ("sentiment", "capitals"):
        own = tmp_path / f"{task}.jsonl"
        own.write_text(
            "".join(json.dumps(line) + "\n" for line in read_lines(QUESTIONS) if line["task"] == task)
        )
        adapter = run / "adapters" / task / "adapter"
        predict_job(adapter, own, tmp_path / f"p-{task}", progress=False)
        alone = read_lines(tmp_path / f"p-{task}" / PREDICTIONS_NAME)
        mine = [row for row in rows if row["task"] == task]
        assert [r["prediction"] for r in alone] == [r["prediction"] for r in mine] and len(mine) >= 2
        if task == "sentiment":
            assert [r["scores"] for r in alone] == [r["scores"] for r in mine]
