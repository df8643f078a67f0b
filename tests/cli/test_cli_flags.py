"""One configuration system: every command's flags come from a documented dataclass, over `--config`."""

from __future__ import annotations

import dataclasses

import pytest

from comoe.analysis import AnalyzeOptions
from comoe.cli import build_parser, main
from comoe.cli.flags import settings_from
from comoe.experiments.compare import CompareOptions
from comoe.tools.bench.run import BenchOptions

COMMANDS = [
    ("analyze", AnalyzeOptions, ["RUN"]),
    ("bench", BenchOptions, []),
    ("compare", CompareOptions, []),
]


@pytest.mark.parametrize(("command", "settings", "positional"), COMMANDS)
def test_every_setting_is_a_documented_flag(capsys, command, settings, positional):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--config" in text and "--output-dir" in text
    for f in dataclasses.fields(settings):
        if f.name == "command":  # the recorded command line, not a flag
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split())[:30] in text, flag
        for choice in f.metadata.get("choices", ()):
            assert choice in text.split(flag, 1)[1], (flag, choice)


@pytest.mark.parametrize(
    ("command", "settings", "argv", "yaml_text", "expected"),
    [
        (
            "analyze",
            AnalyzeOptions,
            ["analyze", "RUN", "--samples", "64", "--no-tsne"],
            "samples: 32\nbatch_size: 4\n",
            {"samples": 64, "batch_size": 4, "tsne": False},
        ),
        (
            "bench",
            BenchOptions,
            ["bench", "--experts", "4,8", "--no-memory"],
            "size: smollm2\nexperts: [16]\nsteps: 7\n",
            {"size": "smollm2", "experts": [4, 8], "steps": 7, "no_memory": True},
        ),
    ],
)
def test_flags_override_the_config_file_which_overrides_the_defaults(
    tmp_path, command, settings, argv, yaml_text, expected
):
    (tmp_path / "c.yaml").write_text(yaml_text)
    args = build_parser().parse_args([*argv, "--config", str(tmp_path / "c.yaml")])
    chosen = settings_from(settings, args)
    assert {name: getattr(chosen, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("argv", "yaml_text", "fragments"),
    [
        (["analyze", "RUN"], "sample: 3\n", ["c.yaml: unknown fields ['sample']", "did you mean 'samples'"]),
        (["analyze", "RUN"], "batch_size: 0\n", ["batch_size must be >= 1, got 0"]),
        (["bench"], "size: huge\n", ["size must be one of tiny, smollm2", "got 'huge'"]),
        (["bench", "--variants", "ours,lora"], "", ["variants: unknown ['ours']", "ours-dense"]),
        (["bench", "--rank", "0"], "", ["rank must be positive integers"]),
    ],
)
def test_bad_settings_name_the_field_and_the_file(tmp_path, argv, yaml_text, fragments):
    (tmp_path / "c.yaml").write_text(yaml_text)
    args = build_parser().parse_args([*argv, "--config", str(tmp_path / "c.yaml")])
    with pytest.raises(ValueError) as info:
        settings_from(type_of(argv[0]), args)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def type_of(command: str) -> type:
    return {name: settings for name, settings, _ in COMMANDS}[command]


def test_compare_takes_every_run_flag_for_its_base_and_its_own_options():
    args = build_parser().parse_args(
        [
            "compare",
            "--seeds",
            "0,1",
            "--max-steps",
            "5",
            "--num-experts",
            "8",
            "--no-analysis",
            "--jobs",
            "2",
        ]
    )
    assert (args.seeds, args.max_steps, args.num_experts, args.analysis, args.jobs) == (
        [0, 1],
        5,
        8,
        False,
        2,
    )
    assert not hasattr(args, "seed") and not hasattr(args, "setting")  # the grid sets those per cell


def test_a_bad_compare_option_is_one_line_naming_it(capsys):
    assert main(["compare", "--preset", "default", "--jobs", "0", "--summary-only"]) == 2
    assert "jobs must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["table1", "table2", "table3"])
def test_table_presets_through_the_cli_take_the_run_flags(tmp_path, capsys, preset):
    """As the README writes it: `comoe compare --preset table1 --model M --tasks T` (validated, nothing run)."""
    out = tmp_path / "grid"
    argv = ["compare", "--preset", preset, "--tasks", "winowhy", "--max-steps", "3", "--output-dir", str(out)]
    assert main([*argv, "--summary-only"]) == 0
    import yaml

    grid = yaml.safe_load((out / "grid.yaml").read_text())
    assert grid["base"]["tasks"] == ["winowhy"] and grid["base"]["max_steps"] == 3


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ["--preset", "lambda", "--contrastive-weight", "0.5"],
            "variant 'lambda=0' sets adapter.contrastive_weight",
        ),
        (["--preset", "table2", "--use-dora"], "variant 'dora' sets adapter.use_dora itself"),
        (["--method", "lora"], "--method: variant 'lora' sets method itself"),
        (["--set", "num_experts=8", "--preset", "experts"], "--num-experts: variant 'experts=4' sets"),
    ],
)
def test_a_run_flag_that_a_variant_overrides_is_refused_before_anything_runs(
    tmp_path, capsys, argv, fragment
):
    out = tmp_path / "grid"
    assert main(["compare", *argv, "--output-dir", str(out)]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()
