"""CoMoEConfig: validation with messages that say what is allowed, and the JSON round trip."""

from __future__ import annotations

import json

import pytest

from comoe.config import CONFIG_NAME, CoMoEConfig


def test_defaults_follow_the_paper_and_design():
    cfg = CoMoEConfig()
    assert (cfg.num_experts, cfg.top_k, cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 2, 16, 32.0, 0.05)
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (cfg.contrastive_weight, cfg.temperature, cfg.epsilon) == (0.01, 0.1, 1e-3)
    assert (cfg.anchor, cfg.routing, cfg.num_negatives, cfg.balance_weight) == ("random", "topk", None, 0.0)
    assert cfg.scaling == 2.0


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"top_k": 5, "num_experts": 4}, ["top_k", "1..num_experts=4", "5"]),
        ({"top_k": 0}, ["top_k", "1..num_experts"]),
        ({"r": 0}, ["r must be a positive integer", "0"]),
        ({"r": -3}, ["r must be a positive integer"]),
        ({"r": 2.5}, ["r must be an integer", "the float 2.5"]),
        ({"num_experts": 0, "top_k": 0}, ["num_experts must be an integer >= 1"]),
        ({"anchor": "first"}, ["anchor must be one of", "'random'", "'all'", "'first'"]),
        ({"routing": "hash"}, ["routing must be one of", "'topk'", "'soft'", "'hash'"]),
        ({"expert_path": "sparse"}, ["expert_path must be one of", "'dense'", "'grouped'", "'auto'"]),
        ({"contrastive_form": "x"}, ["contrastive_form must be one of", "'gram'", "'materialized'"]),
        ({"num_negatives": 3}, ["num_negatives", "1..2", "num_experts - top_k", "3"]),
        ({"num_negatives": 0}, ["num_negatives", "1..2"]),
        ({"num_negatives": 2, "contrastive_weight": 0.0, "num_experts": 3}, ["num_negatives", "1..1"]),
        ({"top_k": 1}, ["at least one positive", "top_k must be >= 2", "contrastive_weight=0"]),
        (
            {"top_k": 4},
            ["at least one negative", "top_k (4) must be < num_experts (4)", "contrastive_weight=0"],
        ),
        ({"routing": "soft"}, ["routing='soft'", "contrastive_weight=0"]),
        ({"lora_dropout": 1.0}, ["lora_dropout must be in [0, 1)"]),
        ({"lora_alpha": 0}, ["lora_alpha must be > 0"]),
        ({"temperature": 0.0}, ["temperature must be > 0"]),
        ({"epsilon": -1.0}, ["epsilon must be >= 0"]),
        ({"contrastive_weight": -0.1}, ["contrastive_weight must be >= 0"]),
        ({"balance_weight": -1}, ["balance_weight must be >= 0"]),
        ({"norm_eps": 0}, ["norm_eps must be > 0"]),
        ({"target_modules": []}, ["target_modules must be a non-empty list"]),
        ({"target_modules": ["q_proj", ""]}, ["target_modules must be a non-empty list"]),
        ({"layers": "bottom"}, ["layers must be a list of indices or one of", "'low'", "'middle'", "'high'"]),
        ({"layers": [-1, 2]}, ["non-negative indices"]),
        ({"layers": []}, ["non-empty list"]),
    ],
)
def test_invalid_values_say_what_is_allowed(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        CoMoEConfig(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 1, "contrastive_weight": 0.0},  # plain top-1 MoE-LoRA
        {"top_k": 4, "num_experts": 4, "contrastive_weight": 0.0},  # k = E
        {"routing": "soft", "contrastive_weight": 0.0},
        {"num_negatives": 2},
        {"num_negatives": 1, "num_experts": 8, "top_k": 2},
        {"anchor": "all", "layers": "low+high", "target_modules": r".*\.(q|v)_proj"},
        {"layers": (0, 3)},
        {"target_modules": ("a", "b")},
    ],
)
def test_valid_configs(kwargs):
    cfg = CoMoEConfig(**kwargs)
    assert isinstance(cfg.target_modules, (list, str))
    assert cfg.layers is None or isinstance(cfg.layers, (list, str))


def test_round_trip_through_adapter_config_json(tmp_path):
    cfg = CoMoEConfig(
        r=4,
        lora_alpha=8,
        num_experts=6,
        top_k=3,
        target_modules=["c_attn", "c_proj"],
        layers=[0, 2],
        anchor="all",
        num_negatives=2,
        temperature=0.05,
        balance_weight=0.1,
        lora_dropout=0.0,
        base_model_name_or_path="tiny/gpt2",
    )
    cfg.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME]
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["peft_type"] == "COMOE" and data["num_experts"] == 6 and data["layers"] == [0, 2]
    back = CoMoEConfig.from_pretrained(tmp_path)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    # a regex target and a layer group survive too
    cfg2 = CoMoEConfig(target_modules=r".*\.q_proj", layers="middle")
    cfg2.save_pretrained(tmp_path)
    assert CoMoEConfig.from_pretrained(tmp_path) == cfg2


def test_tuple_fields_are_normalised_to_lists_so_the_round_trip_is_equal(tmp_path):
    cfg = CoMoEConfig(target_modules=("q_proj", "v_proj"), layers=(1, 2))
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.layers == [1, 2]
    cfg.save_pretrained(tmp_path)
    assert CoMoEConfig.from_pretrained(tmp_path) == cfg


def test_loading_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a comoe adapter directory"):
        CoMoEConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CoMoEConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "COMOE", "r": 4, "num_expertz": 3}))
    with pytest.raises(ValueError, match=r"unknown CoMoEConfig fields \['num_expertz'\]"):
        CoMoEConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "COMOE", "r": 4, "top_k": 9}))
    with pytest.raises(ValueError, match="top_k"):  # a saved file is validated like a constructor call
        CoMoEConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (
            {"contrastive_weight": "0.1"},
            ["contrastive_weight must be a number", "the string '0.1'", "without quotes"],
        ),
        ({"temperature": "cold"}, ["temperature must be a number", "the string 'cold'"]),
        ({"temperature": float("inf")}, ["temperature must be a finite number, got inf"]),
        ({"contrastive_weight": float("nan")}, ["contrastive_weight must be a finite number, got nan"]),
        ({"lora_alpha": 10**400}, ["lora_alpha must be a finite number, got 1000"]),
        ({"lora_alpha": True}, ["lora_alpha must be a number", "the boolean True"]),
        ({"r": "16"}, ["r must be an integer", "the string '16'", "(write 16 without quotes)"]),
        ({"r": 16.0}, ["r must be an integer", "the float 16.0", "(write 16)"]),
        ({"num_experts": True}, ["num_experts must be an integer", "the boolean True"]),
        ({"top_k": None}, ["top_k must be an integer", "got none"]),
        ({"num_negatives": "2"}, ["num_negatives must be an integer or none", "the string '2'"]),
        ({"num_negatives": False}, ["num_negatives must be an integer or none", "the boolean False"]),
        ({"routing": 1}, ["routing must be a string", "the integer 1"]),
        (
            {"base_model_name_or_path": 3},
            ["base_model_name_or_path must be a string or none", "the integer 3"],
        ),
        ({"target_modules": 5}, ["target_modules must be a list of strings or a string", "the integer 5"]),
        (
            {"target_modules": ["q_proj", 1]},
            ["target_modules must be a list of strings", "item 1 is the integer 1"],
        ),
        (
            {"layers": [0, "1"]},
            ["layers must be a list of integers, a string or none", "item 1 is the string '1'"],
        ),
        ({"layers": [True]}, ["layers must be", "item 0 is the boolean True"]),
        ({"layers": 2.5}, ["layers must be a list of integers, a string or none", "the float 2.5"]),
        (
            {"target_modules": "q_proj["},
            [
                "target_modules 'q_proj[' is not a valid regular expression",
                "give a list of module names or a valid regex",
            ],
        ),
        ({"target_modules": "(a|b"}, ["target_modules '(a|b' is not a valid regular expression"]),
    ],
)
def test_wrong_types_and_bad_regexes_are_value_errors_naming_the_field(kwargs, fragments):
    test_invalid_values_say_what_is_allowed(kwargs, fragments)


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [
        ({"lora_alpha": 8}, "lora_alpha", 8.0),  # an int is a number: stored as a float
        ({"contrastive_weight": 0}, "contrastive_weight", 0.0),
        ({"target_modules": "all-linear"}, "target_modules", "all-linear"),
        ({"target_modules": r".*\.(q|v)_proj"}, "target_modules", r".*\.(q|v)_proj"),
        ({"layers": (0, 2)}, "layers", [0, 2]),
        ({"num_negatives": None}, "num_negatives", None),
    ],
)
def test_values_of_the_right_type_are_accepted_and_normalised(kwargs, field, expected):
    value = getattr(CoMoEConfig(**kwargs), field)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (
            "{not json",
            [
                "adapter_config.json is not valid JSON",
                "the adapter directory is damaged",
                "re-save the adapter",
            ],
        ),
        ("", ["adapter_config.json is not valid JSON", "restore the file"]),
        (b"\xff\xfe\x00garbage", ["adapter_config.json is not valid JSON", "damaged"]),
        (
            "[1, 2]",
            [
                "adapter_config.json holds a JSON array, not an object",
                "re-save the adapter or restore the file",
            ],
        ),
        ('"r"', ["holds a JSON string", "damaged"]),
        ("null", ["holds a JSON null", "damaged"]),
        (
            json.dumps({"peft_type": "COMOE", "r": 4, "num_expertz": 3}),
            ["adapter_config.json: unknown CoMoEConfig fields ['num_expertz']", "did you mean 'num_experts'"],
        ),
        (
            json.dumps({"peft_type": "COMOE", "r": "4"}),
            ["adapter_config.json: r must be an integer", "the string '4'"],
        ),
        (
            json.dumps({"peft_type": "COMOE", "top_k": 9}),
            ["adapter_config.json: top_k must be an integer in 1..num_experts"],
        ),
        (
            json.dumps({"r": 4}),
            ['adapter_config.json has no "peft_type"', "not an adapter configuration", "damaged"],
        ),
        (json.dumps({"peft_type": 3, "r": 4}), ['has no "peft_type"']),
        (
            json.dumps({"peft_type": "LORA", "r": 4}),
            ["describes a PEFT LORA adapter, not a CoMoE one", "load_adapted_model"],
        ),
    ],
)
def test_damaged_adapter_config_files_are_named_in_the_error(tmp_path, content, fragments):
    path = tmp_path / CONFIG_NAME
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError) as info:
        CoMoEConfig.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_unknown_fields_without_a_close_match_get_no_suggestion():
    with pytest.raises(ValueError) as info:
        CoMoEConfig.from_dict({"zzzz": 1})
    assert "unknown CoMoEConfig fields ['zzzz']" in str(info.value) and "did you mean" not in str(info.value)
