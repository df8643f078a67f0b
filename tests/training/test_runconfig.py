"""RunConfig: wrong types, bad ranges and bad YAML are ValueErrors that name the field and say what works."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from comoe.cli.train import run_config_flags, run_config_from_args
from comoe.config import CoMoEConfig
from comoe.training.run_adapter import ADAPTER_FIELDS
from comoe.training.run_config import RunConfig
from comoe.training.run_settings import parse_field_value


def _message(error: type[Exception], make) -> str:
    with pytest.raises(error) as info:
        make()
    return str(info.value)


def _field(run: RunConfig, name: str):
    """A RunConfig field, or the adapter field of that name."""
    return getattr(run.adapter, name) if name in ADAPTER_FIELDS else getattr(run, name)


def _assert_fragments(message: str, fragments: list[str]) -> None:
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        # types
        ({"batch_size": "8"}, ["batch_size must be an integer, got the string '8' (write 8 without quotes)"]),
        ({"batch_size": 8.5}, ["batch_size must be an integer, got the float 8.5"]),
        ({"batch_size": True}, ["batch_size must be an integer, got the boolean True"]),
        ({"learning_rate": "fast"}, ["learning_rate must be a number, got the string 'fast'"]),
        ({"learning_rate": "1e-3"}, ["learning_rate must be a number", "(write 1e-3 without quotes)"]),
        ({"learning_rate": False}, ["learning_rate must be a number, got the boolean False"]),
        ({"bf16": "yes"}, ["bf16 must be true or false, got the string 'yes'"]),
        ({"bf16": "true"}, ["bf16 must be true or false", "(write true without quotes)"]),
        ({"eval_base": 1}, ["eval_base must be true or false, got the integer 1"]),
        ({"model": 3}, ["model must be a string, got the integer 3"]),
        ({"output_dir": 5}, ["output_dir must be a string or none, got the integer 5"]),
        ({"max_steps": "10"}, ["max_steps must be an integer or none", "(write 10 without quotes)"]),
        (
            {"train_per_task": 4.0},
            ["train_per_task must be an integer or none", "the float 4.0", "(write 4)"],
        ),
        ({"tasks": None}, ["tasks must be a list of strings, got none"]),
        ({"tasks": ["winowhy", 3]}, ["tasks must be a list of strings", "item 1 is the integer 3"]),
        ({"target_modules": 7}, ["target_modules must be a list of strings or a string, got the integer 7"]),
        (
            {"layers": [0, "1"]},
            ["layers must be a list of integers, a string or none", "item 1 is the string '1'"],
        ),
        ({"contrastive_weight": "0.1"}, ["contrastive_weight must be a number", "the string '0.1'"]),
        # ranges
        ({"max_steps": 0}, ["max_steps must be >= 1, or none to train for `epochs` epochs, got 0"]),
        ({"max_steps": -1}, ["max_steps must be >= 1, or none to train for `epochs` epochs, got -1"]),
        ({"epochs": 0}, ["epochs must be > 0, got 0.0"]),
        ({"epochs": -1, "max_steps": 5}, ["epochs must be > 0"]),
        ({"learning_rate": 0}, ["learning_rate must be > 0"]),
        ({"learning_rate": float("nan")}, ["learning_rate must be a finite number, got nan"]),
        ({"learning_rate": float("inf")}, ["learning_rate must be a finite number, got inf"]),
        ({"epochs": float("inf"), "max_steps": None}, ["epochs must be a finite number, got inf"]),
        ({"lora_alpha": float("-inf")}, ["lora_alpha must be a finite number, got -inf"]),
        ({"temperature": float("nan")}, ["temperature must be a finite number, got nan"]),
        ({"max_steps": float("inf")}, ["max_steps must be an integer or none, got the float inf"]),
        ({"weight_decay": -0.1}, ["weight_decay must be >= 0, got -0.1"]),
        ({"warmup_ratio": 1.5}, ["warmup_ratio must be in [0, 1], got 1.5"]),
        ({"warmup_ratio": -0.1}, ["warmup_ratio must be in [0, 1]"]),
        ({"max_length": 0}, ["max_length must be >= 1 token, got 0"]),
        ({"train_per_task": 0}, ["train_per_task must be >= 1 or none, got 0"]),
        ({"test_per_task": -5}, ["test_per_task must be >= 1 or none, got -5"]),
        ({"lora_r": 0, "method": "lora"}, ["lora_r must be >= 1 or none, got 0"]),
        ({"batch_size": 0}, ["batch_size must be >= 1, got 0"]),
        ({"grad_accum": 0}, ["grad_accum must be >= 1"]),
        (
            {"scheduler": "cosin"},
            ["scheduler must be one of", "linear", "cosine", "constant_with_warmup", "'cosin'"],
        ),
        ({"method": "adam"}, ["method must be one of comoe, moe-lora, soft-moe, mixlora, lora, got 'adam'"]),
        # tasks
        ({"tasks": []}, ["tasks is empty"]),
        ({"tasks": ""}, ["tasks is empty"]),
        ({"tasks": ["winowhy", " "]}, ["tasks has an empty name"]),
        (
            {"tasks": ["winowhy", "strategyqa", " winowhy"]},
            ["task 'winowhy' is named twice in tasks", "name each task once"],
        ),
        ({"tasks": "winowhy, strategyqa, winowhy"}, ["task 'winowhy' is named twice in tasks"]),
        ({"tasks": ["social_iqa", "Social-IQA"]}, ["task 'Social-IQA' is named twice", "are the same task"]),
        (
            {"tasks": ["arc_easy", "arc_e"]},
            ["task 'arc_e' is named twice", "'arc_easy' and 'arc_e' are the same task"],
        ),
        ({"tasks": "ARC-Challenge,arc_c"}, ["task 'arc_c' is named twice", "are the same task"]),
        (
            {"tasks": "suite:hard,strategyqa"},
            ["task 'strategyqa' is named twice", "'suite:hard' and 'strategyqa' both name it"],
        ),
        (
            {"tasks": "winowhy,suite:hard"},
            ["task 'winowhy' is named twice", "'winowhy' and 'suite:hard' both name it"],
        ),
        ({"tasks": "suite:learnable,suite:learnable"}, ["task 'intent_recognition' is named twice"]),
        ({"tasks": ["winowhy", "jsonl:"]}, ["task 'jsonl:' names no file", "write jsonl:PATH"]),
        # the adapter config is checked too
        ({"top_k": 9}, ["top_k must be an integer in 1..num_experts=4"]),
    ],
)
def test_invalid_run_configs_say_what_would_work(kwargs, fragments):
    _assert_fragments(_message(ValueError, lambda: RunConfig.from_dict(kwargs)), fragments)


@pytest.mark.parametrize(
    ("spelled", "same"),
    [
        (["jsonl:{d}/a.jsonl", "{d}/a.jsonl"], "'jsonl:{d}/a.jsonl' and '{d}/a.jsonl' are the same file"),
        (["{d}/a.jsonl", "jsonl:{d}/./a.jsonl"], "the same file"),
        (["jsonl:{d}/a.jsonl", "jsonl:{d}/sub/../a.jsonl"], "the same file"),
    ],
)
def test_a_jsonl_file_named_twice_is_an_error_however_it_is_spelled(tmp_path, spelled, same):
    tasks = [s.format(d=tmp_path) for s in spelled]
    message = _message(ValueError, lambda: RunConfig(tasks=tasks))
    _assert_fragments(message, ["is named twice in tasks", same.format(d=tmp_path), "name each task once"])


def test_a_relative_jsonl_path_and_its_prefixed_form_are_the_same_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _message(ValueError, lambda: RunConfig(tasks=["jsonl:a.jsonl", "a.jsonl"]))
    _assert_fragments(
        message, ["task 'a.jsonl' is named twice", "'jsonl:a.jsonl' and 'a.jsonl' are the same file"]
    )
    assert RunConfig(tasks=["jsonl:a.jsonl", "b.jsonl"]).tasks == ["jsonl:a.jsonl", "b.jsonl"]


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [
        ({"tasks": "winowhy"}, "tasks", ["winowhy"]),
        ({"tasks": "winowhy, strategyqa"}, "tasks", ["winowhy", "strategyqa"]),
        ({"tasks": ("winowhy", "strategyqa")}, "tasks", ["winowhy", "strategyqa"]),
        ({"target_modules": "q_proj,v_proj"}, "target_modules", ["q_proj", "v_proj"]),
        ({"target_modules": "all-linear"}, "target_modules", "all-linear"),
        ({"target_modules": " all-linear "}, "target_modules", "all-linear"),
        ({"learning_rate": 1}, "learning_rate", 1.0),
        ({"epochs": 2}, "epochs", 2.0),
        ({"max_steps": None}, "max_steps", None),
        ({"max_steps": 1}, "max_steps", 1),
        ({"warmup_ratio": 0}, "warmup_ratio", 0.0),
        ({"warmup_ratio": 1}, "warmup_ratio", 1.0),
        ({"scheduler": "cosine"}, "scheduler", "cosine"),
        ({"layers": "low"}, "layers", "low"),
        ({"train_per_task": None, "test_per_task": 1}, "train_per_task", None),
    ],
)
def test_valid_values_are_normalised(kwargs, field, expected):
    value = _field(RunConfig.from_dict(kwargs), field)
    assert value == expected and type(value) is type(expected)


def test_all_linear_reaches_the_adapter_config_as_a_string():
    run = RunConfig.from_dict({"target_modules": "all-linear"})
    assert run.adapter.target_modules == "all-linear" and isinstance(run.adapter, CoMoEConfig)


@pytest.mark.parametrize(
    ("yaml_text", "field", "expected"),
    [
        ("learning_rate: 1e-3\n", "learning_rate", 1e-3),
        ("learning_rate: 5E+4\n", "learning_rate", 5e4),
        ("learning_rate: 2.5e-4\n", "learning_rate", 2.5e-4),
        ("learning_rate: 1.0e-3\n", "learning_rate", 1e-3),
        ("temperature: .5e-1\n", "temperature", 0.05),
        ("tasks: winowhy\n", "tasks", ["winowhy"]),
        ("tasks: winowhy, strategyqa\n", "tasks", ["winowhy", "strategyqa"]),
        ("tasks: [winowhy, strategyqa]\n", "tasks", ["winowhy", "strategyqa"]),
        ("target_modules: all-linear\n", "target_modules", "all-linear"),
        ("max_steps: null\n", "max_steps", None),
        ("epochs: 2\n", "epochs", 2.0),
        ('model: "1e5"\n', "model", "1e5"),  # quoted text stays text
    ],
)
def test_from_yaml_reads_values(tmp_path, yaml_text, field, expected):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    value = _field(RunConfig.from_yaml(path), field)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("yaml_text", "fragments"),
    [
        ('batch_size: "8"\n', ["batch_size must be an integer, got the string '8' (write 8 without quotes)"]),
        ("learning_rate: .inf\n", ["learning_rate must be a finite number, got inf"]),
        ("epochs: .nan\nmax_steps: null\n", ["epochs must be a finite number, got nan"]),
        ("learning_rate: fast\n", ["learning_rate must be a number, got the string 'fast'"]),
        ("learning_rate: '1e-3'\n", ["learning_rate must be a number", "(write 1e-3 without quotes)"]),
        ("max_steps: 0\n", ["max_steps must be >= 1, or none to train for `epochs` epochs"]),
        ("tasks: winowhy, winowhy\n", ["task 'winowhy' is named twice in tasks"]),
        (
            "tasks: [winowhy\nbatch_size: 4\n",
            ["is not valid YAML at line 2, column", "flow sequence at line 1"],
        ),
        ("a: b: c\n", ["is not valid YAML at line 1, column 5", "mapping values are not allowed here"]),
        ("- 1\n- 2\n", ["expected a mapping of RunConfig fields, got list"]),
        ("learning_rat: 0.1\n", ["unknown fields ['learning_rat']", "did you mean 'learning_rate'"]),
        (
            "bach_size: 2\nzzz: 1\n",
            ["unknown fields ['bach_size', 'zzz']", "did you mean 'batch_size' for 'bach_size'?"],
        ),
    ],
)
def test_from_yaml_errors_name_the_problem(tmp_path, yaml_text, fragments):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    message = _message(ValueError, lambda: RunConfig.from_yaml(path))
    assert message.startswith(str(path)), message  # every error names the file, those of __post_init__ too
    _assert_fragments(message, fragments)


def test_from_dict_names_its_source_in_value_errors():
    message = _message(ValueError, lambda: RunConfig.from_dict({"batch_size": "8"}, source="c.yaml"))
    assert message.startswith("c.yaml: batch_size must be an integer"), message


def test_task_names_are_stripped_once_and_aliases_agree_with_the_registry(tmp_path, monkeypatch):
    from comoe.data.registry import canonical_task_key

    assert RunConfig(tasks=[" winowhy ", "strategyqa"]).tasks == ["winowhy", "strategyqa"]
    assert canonical_task_key(" ARC-Easy ") == canonical_task_key("arc_e") == "arc_e"
    monkeypatch.chdir(tmp_path)
    assert (
        canonical_task_key(" jsonl:a.jsonl ")
        == canonical_task_key("a.jsonl")
        == f"jsonl:{tmp_path / 'a.jsonl'}"
    )


def test_unknown_fields_name_the_file_and_give_no_suggestion_when_none_is_close(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("zzzz: 1\n")
    message = _message(ValueError, lambda: RunConfig.from_yaml(path))
    _assert_fragments(message, [str(path), "unknown fields ['zzzz']", "known fields"])
    assert "did you mean" not in message


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("tasks: [winowhy\n")
    assert str(path) in _message(ValueError, lambda: RunConfig.from_yaml(path))


def test_a_missing_config_file_is_a_file_not_found_error_naming_it(tmp_path):
    path = tmp_path / "nope.yaml"
    assert str(path) in _message(FileNotFoundError, lambda: RunConfig.from_yaml(path))


def test_to_yaml_round_trip_keeps_all_linear_small_floats_and_number_like_strings(tmp_path):
    run = RunConfig.from_dict(
        {
            "target_modules": "all-linear",
            "learning_rate": 1e-5,
            "tasks": "winowhy,strategyqa",
            "output_dir": "1e5",
        }
    )
    run.to_yaml(tmp_path / "run.yaml")
    assert "output_dir: '1e5'" in (tmp_path / "run.yaml").read_text()
    assert RunConfig.from_yaml(tmp_path / "run.yaml") == run


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("target_modules", "all-linear", "all-linear"),
        ("target_modules", "q_proj, v_proj", ["q_proj", "v_proj"]),
        ("tasks", "winowhy,strategyqa", ["winowhy", "strategyqa"]),
        ("layers", "0,2", [0, 2]),
        ("layers", "low+high", "low+high"),
        ("layers", "none", None),
        ("max_steps", "none", None),
        ("max_steps", "None", None),
        ("max_steps", "12", 12),
        ("learning_rate", "1e-3", 1e-3),
        ("bf16", "yes", True),
        ("eval_base", "false", False),
        ("output_dir", "runs/x", "runs/x"),
    ],
)
def test_parse_field_value(name, text, expected):
    value = parse_field_value(name, text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    [
        ("max_steps", "ten", ["--max-steps: cannot read 'ten' as an integer or none"]),
        ("batch_size", "8.5", ["--batch-size: cannot read '8.5' as an integer"]),
        ("learning_rate", "fast", ["--learning-rate: cannot read 'fast' as a number"]),
        ("bf16", "maybe", ["--bf16: cannot read 'maybe' as true or false"]),
        ("batch_size", "none", ["--batch-size: cannot read 'none' as an integer"]),
    ],
)
def test_parse_field_value_errors(name, text, fragments):
    _assert_fragments(_message(ValueError, lambda: parse_field_value(name, text)), fragments)


def flag_parser() -> argparse.ArgumentParser:
    """`comoe train`'s --config and RunConfig flags."""
    parser = argparse.ArgumentParser(parents=run_config_flags())
    parser.add_argument("--config")
    return parser


def test_command_line_flags_become_a_run_config(tmp_path):
    parser = flag_parser()
    (tmp_path / "run.yaml").write_text("tasks: winowhy\nlearning_rate: 1e-3\n")
    args = parser.parse_args(
        ["--config", str(tmp_path / "run.yaml"), "--target-modules", "all-linear", "--max-steps", "3"]
    )
    run = run_config_from_args(args)
    assert (run.tasks, run.adapter.target_modules, run.learning_rate, run.max_steps) == (
        ["winowhy"],
        "all-linear",
        1e-3,
        3,
    )
    args = parser.parse_args(["--max-steps", "0"])
    _assert_fragments(_message(ValueError, lambda: run_config_from_args(args)), ["max_steps must be >= 1"])


def test_a_flag_given_as_none_overrides_the_yaml_file(tmp_path):
    parser = flag_parser()
    (tmp_path / "run.yaml").write_text("max_steps: 100\nlora_r: 8\nmethod: lora\n")
    given = parser.parse_args(
        ["--config", str(tmp_path / "run.yaml"), "--max-steps", "none", "--lora-r", "None"]
    )
    run = run_config_from_args(given)
    assert (run.max_steps, run.lora_r, run.method) == (None, None, "lora")
    absent = parser.parse_args(["--config", str(tmp_path / "run.yaml")])
    assert not hasattr(absent, "max_steps")  # a flag not given leaves no attribute
    assert (run_config_from_args(absent).max_steps, run_config_from_args(absent).lora_r) == (100, 8)


def test_epochs_inf_on_the_command_line_is_refused_before_training():
    args = flag_parser().parse_args(["--epochs", "inf", "--max-steps", "none"])
    message = _message(ValueError, lambda: run_config_from_args(args))
    assert message == "command line: epochs must be a finite number, got inf"


def test_booleans_are_flags_and_both_spellings_work():
    parser = flag_parser()
    assert parser.parse_args(["--bf16"]).bf16 is True
    assert parser.parse_args(["--bf16", "false"]).bf16 is False
    assert parser.parse_args(["--no-eval-base"]).eval_base is False
    assert parser.parse_args(["--gradient_checkpointing", "--max_steps", "7"]).max_steps == 7


def test_train_help_documents_every_flag_with_its_choices_and_default(capsys):
    from comoe.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    documented = [f for f in dataclasses.fields(RunConfig) if f.name != "adapter"]
    documented += [f for f in dataclasses.fields(CoMoEConfig) if f.name in ADAPTER_FIELDS]
    assert len(documented) == len(dataclasses.fields(RunConfig)) - 1 + len(ADAPTER_FIELDS)
    for f in documented:
        flag = "--" + f.name
        assert flag in text, flag
        help_text = " ".join(f.metadata["help"].split())
        assert help_text[:40] in text, (flag, help_text)
        for choice in f.metadata.get("choices", ()):
            assert choice in text.split(flag, 1)[1], (flag, choice)
    assert "{comoe,moe-lora,soft-moe,mixlora,lora}" in text and "Default: 0.01." in text
    assert "The flag alone means true." in text and "--no-eval-base" in text


def test_every_adapter_field_is_settable_nested_in_yaml_and_as_a_flag(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "adapter:\n  num_experts: 8\n  contrastive_form: materialized\n  router_init_std: 0.05\n"
    )
    args = flag_parser().parse_args(
        ["--config", str(tmp_path / "run.yaml"), "--top-k", "3", "--norm-eps", "1e-5", "--routing", "topk"]
    )
    adapter = run_config_from_args(args).adapter
    assert (adapter.num_experts, adapter.top_k, adapter.contrastive_form) == (8, 3, "materialized")
    assert (adapter.router_init_std, adapter.norm_eps, adapter.routing) == (0.05, 1e-5, "topk")
    # every adapter field has its flag
    assert all(
        hasattr(flag_parser().parse_args([f"--{name}", "none"]), name) for name in ["num_negatives", "layers"]
    )
    spelled = [a.option_strings[0] for a in flag_parser()._actions]
    assert all(f"--{name.replace('_', '-')}" in spelled for name in ADAPTER_FIELDS)


def test_run_config_yaml_nests_the_adapter_and_flat_files_of_comoe_0_1_still_load(tmp_path):
    flat = tmp_path / "old.yaml"  # how comoe 0.1 wrote run_config.yaml: adapter fields at the top level
    flat.write_text("method: comoe\nr: 8\nnum_experts: 6\ntop_k: 3\ncontrastive_weight: 0.1\nseed: 4\n")
    old = RunConfig.from_yaml(flat)
    assert (old.adapter.r, old.adapter.num_experts, old.adapter.top_k, old.adapter.contrastive_weight) == (
        8,
        6,
        3,
        0.1,
    )
    old.to_yaml(tmp_path / "new.yaml")
    import yaml

    written = yaml.safe_load((tmp_path / "new.yaml").read_text())
    assert written["adapter"]["num_experts"] == 6 and "num_experts" not in written
    assert set(written["adapter"]) == set(ADAPTER_FIELDS)
    assert RunConfig.from_yaml(tmp_path / "new.yaml") == old
    dotted = RunConfig.from_dict(
        {"adapter.r": 8, "num_experts": 6, "adapter": {"top_k": 3}, "seed": 4, "contrastive_weight": 0.1}
    )
    assert dotted == old


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"r": 4, "adapter": {"r": 8}}, ["r is given twice, as adapter.r (8) and as r (4); keep one"]),
        ({"adapter": {"num_expert": 8}}, ["unknown fields ['adapter.num_expert']", "'num_experts'"]),
        ({"adapter": 8}, ["adapter must be a mapping of adapter fields", "got the integer 8"]),
        ({"adapter": {"top_k": 9}}, ["adapter.top_k must be an integer in 1..num_experts=4, got 9"]),
        ({"adapter": {"routing": "hard"}}, ["adapter.routing must be one of"]),
        ({"routing": "soft"}, ["adapter: the contrastive loss needs inactive experts", "routing='soft'"]),
    ],
)
def test_adapter_errors_name_the_adapter_field(data, fragments):
    _assert_fragments(_message(ValueError, lambda: RunConfig.from_dict(data, source="run.yaml")), fragments)


@pytest.mark.parametrize(
    ("method", "given", "expected"),
    [
        ("comoe", {}, {"contrastive_weight": 0.01, "routing": "topk", "top_k": 2}),
        (
            "moe-lora",
            {"top_k": 1, "num_negatives": 1},
            {"contrastive_weight": 0.0, "num_negatives": None, "top_k": 1},
        ),
        ("soft-moe", {"num_experts": 6}, {"routing": "soft", "top_k": 6, "contrastive_weight": 0.0}),
        ("lora", {}, {"contrastive_weight": 0.0}),
    ],
)
def test_the_method_fixes_the_adapter_fields_it_implies(method, given, expected):
    adapter = RunConfig.from_dict({"method": method, "adapter": given}).trained_adapter
    assert {name: getattr(adapter, name) for name in expected} == expected


def test_run_config_yaml_keeps_the_settings_as_given_so_another_method_trains_from_them(tmp_path):
    """A moe-lora run's file, run again with --method comoe, trains comoe with the file's λ, not with 0."""
    RunConfig.from_dict({"method": "moe-lora", "adapter": {"contrastive_weight": 0.05}}).to_yaml(
        tmp_path / "r.yaml"
    )
    again = RunConfig.from_yaml(tmp_path / "r.yaml", method="comoe")
    assert again.trained_adapter.contrastive_weight == 0.05
    RunConfig.from_dict({"method": "soft-moe"}).to_yaml(tmp_path / "s.yaml")
    adapter = RunConfig.from_yaml(tmp_path / "s.yaml", method="moe-lora").trained_adapter
    assert (adapter.routing, adapter.top_k) == ("topk", 2)
    # settings valid only as the method uses them are kept as it uses them: moe-lora at top-1
    assert RunConfig.from_dict({"method": "moe-lora", "top_k": 1}).adapter.contrastive_weight == 0.0


def test_moved_names_still_work_with_a_deprecation_warning():
    import comoe.training.run_config as run_config
    from comoe.training import methods, run_dir, run_settings

    moved = {
        "METHODS": methods.METHOD_NAMES,
        "MIXLORA_DEFAULTS": methods.MIXLORA_DEFAULTS,
        "METRICS_NAME": run_dir.RESULTS_NAME,
        "RUN_CONFIG_NAME": run_dir.RUN_CONFIG_NAME,
        "nest_fields": run_settings.nest_fields,
    }
    for name, new in moved.items():
        with pytest.warns(
            FutureWarning,
            match=f"run_config.{name} is deprecated and goes in the next release: use comoe.training",
        ):
            assert getattr(run_config, name) == new
    with pytest.raises(AttributeError):
        run_config.no_such_name  # noqa: B018


def test_every_method_fixes_only_adapter_fields_and_the_presets_name_known_methods():
    from comoe.experiments.grid import PRESETS
    from comoe.training.methods import FIXED_FIELDS, METHODS

    assert set(FIXED_FIELDS) <= set(ADAPTER_FIELDS)
    assert {v["method"] for variants in PRESETS.values() for v in variants.values()} <= set(METHODS)
    assert RunConfig(method="soft-moe", adapter={"num_experts": 6}).trained_adapter.top_k == 6
