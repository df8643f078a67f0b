"""`comoe export`: a short run exported through the real command line and loaded by transformers alone, in a
process that cannot import comoe nor PEFT, generating what the adapted model generates; every expert kind
and routing exported from tiny models with the adapted model's logits; the exported code is comoe's own
inference module, which imports torch only; bad input refused before any model loads."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import comoe.inference
from comoe import get_comoe_model
from comoe.cli.app import main as run_cli
from comoe.training import export as export_module
from comoe.training.adapters import load_adapted_model
from comoe.training.base_models import load_base_model
from comoe.training.export import export_model, export_source
from comoe.training.export_code import INFERENCE_FILE
from tests.cli_runs import comoe_cli
from tests.tiny_models import batch, build, randomize_adapters, tiny_comoe_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
PROMPTS = ["Question: What is the capital of France?\nAnswer:", "Review: a warm, funny film.\nSentiment:"]
NEW_TOKENS = 12

# Run first in the subprocess (a sitecustomize on PYTHONPATH): every finder on sys.meta_path is wrapped so
# that comoe and peft are not found, as if they were not installed (transformers' checks see them absent).
HIDE_PACKAGES = """
import sys

HIDDEN = ("comoe", "peft")


class _Hidden:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def __getattr__(self, name):
        return getattr(self._finder, name)


sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]
"""

# What the subprocess runs: load the folder with transformers, generate greedily, keep the logits.
LOAD_AND_GENERATE = """
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

for name in ("comoe", "peft"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable")
folder, prompts, new_tokens, logits_path = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # it reads config.json too
ids, generated, logits = [], [], {}
with torch.no_grad():
    for i, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        ids.append(prompt_ids[0].tolist())
        out = model.generate(prompt_ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        generated.append(out[0].tolist())
        logits[str(i)] = model(prompt_ids).logits[0].contiguous()
save_file(logits, logits_path)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("comoe", "peft"))
print(json.dumps({"ids": ids, "generated": generated, "class": type(model).__name__, "loaded": loaded}))
"""


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A 3-step CoMoE run on the README's two example files (the adapter moves the logits by ~0.06)."""
    out = tmp_path_factory.mktemp("export") / "run"
    tasks = ",".join(f"jsonl:{EXAMPLES / name}" for name in ("sentiment.jsonl", "capitals.jsonl"))
    comoe_cli(
        "train", "--model", str(tiny_model_dir), "--tasks", tasks, "--batch-size", "4", "--r", "4",
        "--max-steps", "3", "--eval-base", "false", "--output-dir", str(out),
    )  # fmt: skip
    return out


def load_without_comoe(folder: Path, tmp_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load ``folder`` in a fresh Python that cannot import comoe nor PEFT, outside the repository; its greedy
    generations (and the prompt ids of the folder's own tokenizer) and its logits per prompt."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_PACKAGES)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(hide),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    logits_path = tmp_path / "logits.safetensors"
    args = [str(folder), json.dumps(PROMPTS), str(NEW_TOKENS), str(logits_path)]
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, *args],
        cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), load_file(logits_path)


@pytest.mark.slow
def test_an_exported_run_generates_what_the_adapted_model_generates_without_comoe(
    run_dir, tiny_model_dir, tmp_path
):
    folder = tmp_path / "exported"
    result = comoe_cli("export", str(run_dir), "--output-dir", str(folder))  # the README's command
    assert f"exported run {run_dir}" in result.stdout and "trust_remote_code=True" in result.stdout
    files = {path.name for path in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_comoe.py",
        INFERENCE_FILE,
        "tokenizer.json",
    } <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickles
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "comoe" and len(config["comoe"]["layers"]) == 8  # 2 layers x q, k, v, o

    got, exported_logits = load_without_comoe(folder, tmp_path)
    assert got["class"] == "CoMoEForCausalLM" and got["loaded"] == []

    base, tokenizer = load_base_model(str(tiny_model_dir))
    with torch.no_grad():
        base_logits = [base(tokenizer(p, return_tensors="pt").input_ids).logits[0] for p in PROMPTS]
    model = load_adapted_model(base, run_dir / "adapter")
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert got["ids"][i] == ids[0].tolist()  # the folder's tokenizer is the run's
        with torch.no_grad():
            expected = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      do_sample=False)  # fmt: skip
            logits = model(input_ids=ids).logits[0]
        assert got["generated"][i] == expected[0].tolist()
        torch.testing.assert_close(exported_logits[str(i)], logits, rtol=1e-5, atol=1e-5)
        assert (logits - base_logits[i]).abs().max() > 1e-2  # the adapter is in what was compared

    # the README's second command: the run's bare adapter directory, its base named
    bare = tmp_path / "bare"
    argv = ["export", str(run_dir / "adapter"), "--model", str(tiny_model_dir), "--output-dir", str(bare)]
    assert run_cli(argv) == 0
    exported, again = load_file(folder / "model.safetensors"), load_file(bare / "model.safetensors")
    assert exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)


CASES = {  # (family, adapter settings): every expert kind under every routing, and what else the code meets
    "lora-topk": ("llama", {}),
    "lora-soft": ("llama", {"routing": "soft", "contrastive_weight": 0.0}),
    "lora-topp": ("llama", {"routing": "topp", "top_k": 3, "top_p": 0.6}),
    "dora-topk": ("llama", {"use_dora": True}),
    "dora-soft": ("llama", {"use_dora": True, "routing": "soft", "contrastive_weight": 0.0}),
    "dora-topp": ("llama", {"use_dora": True, "routing": "topp", "top_k": 3, "top_p": 0.6}),
    "ffn-topk": ("llama", {"placement": "ffn", "target_modules": "all-linear"}),
    "ffn-soft": ("llama", {"placement": "ffn", "routing": "soft", "contrastive_weight": 0.0}),
    "ffn-topp": ("llama", {"placement": "ffn", "routing": "topp", "top_k": 3, "top_p": 0.6}),
    "one-expert": ("llama", {"num_experts": 1, "top_k": 1, "contrastive_weight": 0.0}),
    "grouped-path": ("llama", {"expert_path": "grouped"}),
    "gpt2-conv1d-dora": ("gpt2", {"use_dora": True}),  # weights stored (in, out), biases
    "qwen2-tied-ffn": ("qwen2", {"placement": "ffn", "target_modules": "all-linear", "layers": [1]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_exported_model_computes_the_adapted_models_logits(case, tmp_path, single_thread):
    family, settings = CASES[case]
    model = get_comoe_model(build(family), tiny_comoe_config(family, **settings))
    randomize_adapters(model)
    model.eval()
    summary = export_model(model, tmp_path / "exported")
    kind = "ffn" if settings.get("placement") == "ffn" else "dora" if settings.get("use_dora") else "lora"
    assert kind in summary["kinds"]
    exported = AutoModelForCausalLM.from_pretrained(
        tmp_path / "exported", trust_remote_code=True, attn_implementation="eager"
    ).eval()
    assert type(exported).__name__ == "CoMoEForCausalLM"
    inputs = batch(family)
    with torch.no_grad():
        expected, got = model(**inputs).logits, exported(**inputs).logits
        base = build(family)(**inputs).logits
    # the same functions on the same tensors; loaded tensors sit at other memory alignments, which can move
    # CPU kernels' rounding by an ulp (the grouped path: the dense path's function, its rounding)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-2  # the adapter is in what was compared
    prompt = inputs["input_ids"][1:]
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(exported.generate(prompt, **greedy), model.generate(input_ids=prompt, **greedy))


def test_a_bf16_export_keeps_the_adapter_fp32_and_computes_what_comoe_computes_on_a_bf16_base(tmp_path):
    config = tiny_comoe_config("llama", use_dora=True)
    model = get_comoe_model(build("llama"), config)
    randomize_adapters(model)
    export_model(model.eval(), tmp_path / "exported")
    build("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", dtype=torch.bfloat16, attn_implementation="eager"
    )
    reference = get_comoe_model(base, config).eval()
    with torch.no_grad():
        for name, param in reference.adapter_state_dict().items():
            param.copy_(model.adapter_state_dict()[name])
    exported = AutoModelForCausalLM.from_pretrained(
        tmp_path / "exported", trust_remote_code=True, attn_implementation="eager", dtype=torch.bfloat16
    )
    dtypes = {
        name.rsplit(".", 1)[-1].startswith("comoe_"): p.dtype for name, p in exported.named_parameters()
    }
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    inputs = batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)


def test_the_exported_code_is_the_library_inference_module_and_imports_torch_only(tmp_path):
    model = get_comoe_model(build("llama"), tiny_comoe_config("llama"))
    export_model(model, tmp_path / "exported")
    source = Path(comoe.inference.__file__).read_text()
    assert (tmp_path / "exported" / INFERENCE_FILE).read_text() == source
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "collections", "typing", "math", "torch"}, imported
    modeling = (tmp_path / "exported" / "modeling_comoe.py").read_text()
    assert "comoe." not in modeling.replace("comoe_inference", "").replace("configuration_comoe", "")


def test_an_adapted_module_whose_weight_is_tied_is_refused(tmp_path):
    model = get_comoe_model(build("qwen2"), tiny_comoe_config("qwen2", target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="adapts lm_head, whose weight the base model ties"):
        export_model(model, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def refused(argv: list[str], capsys, monkeypatch) -> str:
    """Run `comoe export` in process with model loading forbidden; the one-line error it printed."""
    monkeypatch.setattr(export_module, "load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    capsys.readouterr()
    assert run_cli(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("comoe export: error: ") and "Traceback" not in err and err.count("\n") == 1
    return err


def test_bad_input_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    base_dir = tmp_path / "base"
    build("llama").save_pretrained(base_dir)
    adapter = tmp_path / "adapter"
    get_comoe_model(build("llama"), tiny_comoe_config("llama")).save_pretrained(adapter)
    out = ["--output-dir", str(tmp_path / "out")]
    with_model = ["--model", str(base_dir)]

    err = refused([str(tmp_path / "missing"), *out], capsys, monkeypatch)
    assert "missing does not exist" in err
    err = refused([str(base_dir), *out], capsys, monkeypatch)
    assert "holds neither run_config.yaml nor adapter_config.json" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("mine")
    err = refused([str(adapter), *with_model, *out], capsys, monkeypatch)
    assert "out exists and is not empty" in err and (tmp_path / "out" / "kept.txt").read_text() == "mine"
    err = refused(
        [str(adapter), *with_model, "--output-dir", str(tmp_path / "out" / "kept.txt")], capsys, monkeypatch
    )
    assert "is a file" in err
    out = ["--output-dir", str(tmp_path / "new")]
    err = refused([str(adapter), *with_model, *out, "--task", "capitals"], capsys, monkeypatch)
    assert "holds one adapter for every task; drop --task" in err

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    err = refused([str(incomplete), *with_model, *out], capsys, monkeypatch)
    assert "not a complete adapter directory" in err

    lora = tmp_path / "lora"
    get_peft_model(build("llama"), LoraConfig(target_modules=["q_proj"])).save_pretrained(lora)
    err = refused([str(lora), *with_model, *out], capsys, monkeypatch)
    assert "holds a PEFT LORA adapter" in err and "merge_and_unload()" in err

    monkeypatch.setattr(export_module, "INFERENCE_ROUTINGS", ("soft",))  # a router without inference code
    err = refused([str(adapter), *with_model, *out], capsys, monkeypatch)
    assert "routing='topk' has no inference code" in err and "supports routing soft" in err
    assert not (tmp_path / "new").exists()


def single_task_run(tmp_path: Path, adapter: Path, base_dir: Path, **fields: str) -> Path:
    """A run directory as a single-task `comoe train` leaves it: one adapter per task."""
    import shutil

    run = tmp_path / "single"
    run.mkdir(parents=True)
    lines = [f"model: {base_dir}", "setting: single", "tasks: [strategyqa, social_iqa]"]
    (run / "run_config.yaml").write_text("\n".join(lines + [f"{k}: {v}" for k, v in fields.items()]) + "\n")
    for task in ("strategyqa", "social_iqa"):
        shutil.copytree(adapter, run / "adapters" / task / "adapter")
    return run


def test_a_single_task_run_exports_the_adapter_of_the_task_named(tmp_path, capsys, monkeypatch):
    base_dir = tmp_path / "base"
    build("llama").save_pretrained(base_dir)
    adapter = tmp_path / "adapter"
    get_comoe_model(build("llama"), tiny_comoe_config("llama")).save_pretrained(adapter)
    run = single_task_run(tmp_path, adapter, base_dir)
    out = ["--output-dir", str(tmp_path / "out")]
    err = refused([str(run), *out], capsys, monkeypatch)
    assert "one adapter per task (social_iqa, strategyqa); choose the one to export with --task" in err
    err = refused([str(run), *out, "--task", "boolq"], capsys, monkeypatch)
    assert "--task boolq" in err and "its tasks are social_iqa, strategyqa" in err
    source = export_source(run, {}, task="strategyqa")
    assert source.adapter == run / "adapters" / "strategyqa" / "adapter"
    assert source.description == f"run {run}, task strategyqa"

    quantized = single_task_run(tmp_path / "q", adapter, base_dir, quantize="nf4")
    monkeypatch.setattr("comoe.training.run_config.check_quantization_available", lambda q: None)
    err = refused([str(quantized), *out, "--task", "strategyqa"], capsys, monkeypatch)
    assert "quantize='nf4'" in err and "export an adapter trained without --quantize" in err


def test_export_appears_in_the_command_line_help():
    from comoe.cli import build_parser

    args = build_parser().parse_args(["export", "run", "--output-dir", "d", "--task", "t", "--model", "m"])
    assert (args.output_dir, args.task, args.model) == ("d", "t", "m")
    assert "export" in build_parser().format_help()
