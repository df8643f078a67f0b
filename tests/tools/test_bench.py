"""`comoe bench` on the tiny preset with a few steps: the structure of its results, not its speed."""

from __future__ import annotations

import json

import pytest
import torch

from comoe.cli import main
from comoe.model import get_comoe_model
from comoe.tools.bench.measure import SavedTensorMeter
from comoe.tools.bench.naive import copy_comoe_to_naive, inject_naive
from comoe.tools.bench.run import SCHEMA_VERSION
from comoe.tools.bench.sizes import SIZES, build_random_llama
from comoe.tools.bench.variants import (
    DEFAULT_VARIANTS,
    FFN_VARIANTS,
    GENERATE_VARIANTS,
    auto_path,
    expert_paths,
    shared_copy,
    variant_config,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is faster, and far steadier on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _argv(tmp_path, *extra: str) -> list[str]:
    return [
        "bench",
        "--size",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--gen-rounds",
        "1",
        "--gen-tokens",
        "2",
        "--batch",
        "2",
        "--seq",
        "16",
        "--out",
        str(tmp_path / "results"),
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bench")
    assert main(_argv(tmp_path, "--markdown", str(tmp_path / "BENCH.md"))) == 0
    return tmp_path


def test_ffn_variants_run_on_the_gate_up_down_projections(tmp_path):
    """As benchmarks/run_all.sh runs them: whole-FFN experts beside PEFT LoRA and LoRA experts on the same
    gate/up/down projections, with the FFN experts' saved activations measured."""
    targets = "gate_proj,up_proj,down_proj"
    variants = ["lora", "ours-dense", *FFN_VARIANTS]
    argv = _argv(tmp_path, "--target-modules", targets, "--variants", ",".join(variants), "--no-generate")
    assert main([*argv, "--no-parity", "--name", "tiny-ffn"]) == 0
    data = json.loads((tmp_path / "results" / "tiny-ffn.json").read_text())
    (case,) = data["cases"]
    assert list(case["variants"]) == variants
    for name in FFN_VARIANTS:
        assert case["variants"][name]["mem_x_lora"] > 1 and case["variants"][name]["trainable_params"] > 0


@pytest.mark.slow
def test_compile_times_every_variant_compiled_and_generates_with_a_static_cache(tmp_path):
    """`comoe bench --compile`: each variant's decoder layers compiled (inductor) and timed (one variant
    here: each compiles for seconds), generation with transformers' static KV cache; memory and parity are
    skipped."""
    argv = _argv(tmp_path, "--compile", "--variants", "ours-dense", "--layers", "1", "--name", "tc")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert main(argv) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # its layer, compiled
    data = json.loads((tmp_path / "results" / "tc.json").read_text())
    assert data["settings"]["compiled"] is True
    (case,) = data["cases"]
    assert (
        case["variants"]["ours-dense"]["median_ms"] > 0
        and "saved_bytes" not in case["variants"]["ours-dense"]
    )
    assert (
        case["generate"]["cache"] == "static"
        and case["generate"]["variants"]["ours-dense"]["tokens_per_s"] > 0
    )
    assert "decoder layers compiled" in (tmp_path / "results" / "tc.md").read_text()


@pytest.mark.slow
def test_tiny_run_writes_json_and_markdown(tiny_result):
    data = json.loads((tiny_result / "results" / "tiny.json").read_text())
    assert data["schema"] == SCHEMA_VERSION and data["size"] == "tiny"
    assert data["command"].startswith("comoe bench --size tiny")
    assert data["settings"]["steps"] == 2 and data["settings"]["tokens_per_step"] == 32
    (case,) = data["cases"]
    assert (case["experts"], case["rank"], case["top_k"]) == (4, 16, 2)
    assert case["auto_path"] in ("dense", "grouped")
    rows = case["variants"]
    assert list(rows) == list(DEFAULT_VARIANTS)
    for name, row in rows.items():
        assert len(row["times_ms"]) == 2 and row["median_ms"] > 0 and row["tokens_per_s"] > 0
        assert row["x_base"] > 0 and row["x_lora"] > 0 and row["x_naive"] > 0
        assert row["saved_bytes"] > 0 and row["mem_x_lora"] > 0
        assert row["peak_bytes"] is None and row["host_syncs"] is None  # CPU
        assert (row["trainable_params"] == 0) == (name == "base")
    assert rows["base"]["x_base"] == pytest.approx(1.0)
    assert rows["ours-dense"]["path"] == "dense" and rows["ours-grouped"]["path"] == "grouped"
    assert "x_ours_same_path" in rows["ours-con-gram"] and "x_ours_same_path" in rows["ours-con-mat"]
    # both forms of the contrastive loss keep tensors for backward beyond the experts' own
    for name in ("ours-con-gram", "ours-con-mat"):
        assert rows[name]["saved_bytes"] > rows["ours-dense"]["saved_bytes"]
    gen = case["generate"]["variants"]
    assert set(gen) == set(GENERATE_VARIANTS) and all(g["tokens_per_s"] > 0 for g in gen.values())
    assert case["parity"]["ok"], case["parity"]
    names = {t["target"] for t in data["targets"]}
    assert any("naive" in n for n in names) and any("memory" in n for n in names)
    md = (tiny_result / "results" / "tiny.md").read_text()
    assert "| ours-con-gram |" in md and "comoe bench --size tiny" in md
    full = (tiny_result / "BENCH.md").read_text()
    assert full.startswith("# Benchmarks") and "## Targets" in full and "shared and noisy" in full


@pytest.mark.slow
def test_render_only(tiny_result, tmp_path):
    out = tmp_path / "B.md"
    assert main(["bench", "--render", "--out", str(tiny_result / "results"), "--markdown", str(out)]) == 0
    assert "### `tiny`" in out.read_text()


def test_main_rejects_bad_arguments(capsys):
    assert main(["bench", "--variants", "nope"]) == 2
    assert "variants: unknown ['nope']; known: base, lora" in capsys.readouterr().err
    assert main(["bench", "--render"]) == 2  # needs --out and --markdown
    assert "needs --output-dir" in capsys.readouterr().err


def test_naive_layer_computes_the_same_function():
    """The naive per-expert loop is a faithful baseline: same outputs and gradients as CoMoELayer."""
    spec = SIZES["tiny"]
    base = build_random_llama(spec, torch.device("cpu"), torch.float32, seed=0)
    targets = ["q_proj", "v_proj"]
    cfg = variant_config(4, 8, 2, targets, path="dense", dropout=0.0)
    ours = get_comoe_model(shared_copy(base), cfg)
    with torch.no_grad():
        for name, p in ours.adapter_state_dict().items():
            if name.endswith(("comoe_B", "comoe_router")):
                p.normal_()
    naive_model = shared_copy(base)
    layers = inject_naive(naive_model, cfg)
    copy_comoe_to_naive(ours, layers)
    ids = torch.randint(3, spec.vocab, (2, 9))
    out_ours = ours(input_ids=ids, labels=ids)
    out_naive = naive_model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_naive.logits, out_ours.logits, rtol=1e-5, atol=1e-5)
    out_ours.loss.backward()
    out_naive.loss.backward()
    for name, layer in ours.adapted_modules.items():
        r = layer.r
        for i, expert in enumerate(layers[name].experts):
            torch.testing.assert_close(
                expert.lora_A.weight.grad,
                layer.experts.comoe_A.grad[i * r : (i + 1) * r],
                rtol=1e-4,
                atol=1e-6,
            )
            torch.testing.assert_close(
                expert.lora_B.weight.grad,
                layer.experts.comoe_B.grad[:, i * r : (i + 1) * r],
                rtol=1e-4,
                atol=1e-6,
            )
        torch.testing.assert_close(
            layers[name].router.weight.grad, layer.router.comoe_router.grad, rtol=1e-4, atol=1e-6
        )


def test_saved_tensor_meter_counts_unique_storages_once():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    meter = SavedTensorMeter(exclude={w.untyped_storage().data_ptr()})
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        h = x @ w  # saves x (w is excluded)
        y = (h * h).sum()  # saves h (twice, one storage)
    assert meter.bytes == x.numel() * 4 + h.numel() * 4
    y.backward()


@pytest.mark.parametrize(("experts", "rank"), [(4, 16), (4, 2), (8, 4)])
def test_auto_path_is_what_the_layers_pick(experts, rank):
    spec = SIZES["tiny"]
    base = build_random_llama(spec, torch.device("cpu"), torch.float32, seed=0)
    expected = auto_path(base, experts, rank, 2, ["q_proj", "o_proj"])
    model = get_comoe_model(shared_copy(base), variant_config(experts, rank, 2, ["q_proj", "o_proj"]))
    assert expert_paths(model) == expected


def test_targets_are_judged_once_with_their_thresholds_and_directions():
    """The contrastive overhead (≤ 15 % tiny, ≤ 5 % elsewhere), activation memory (ours ≤ 1.3×, with the
    contrastive term ≤ 1.2×) and generate (≥ 0.9×): one target per measured figure, named by what it measures."""
    from comoe.tools.bench.cells import target_threshold, target_value
    from comoe.tools.bench.thresholds import evaluate_targets

    def result(size, hidden, overhead, memory, generate):
        rows = {
            "ours-dense": {"mem_x_lora": 0.9},
            "ours-con-gram": {"x_ours_same_path": 1 + overhead, "mem_x_lora": memory},
        }
        case = {"experts": 4, "rank": 16, "auto_path": "dense", "variants": rows}
        case["generate"] = {"variants": {"ours-dense": {"tps_x_lora": generate}}}
        settings = {"device": "cpu"}
        return {"size": size, "name": size, "spec": {"hidden": hidden}, "settings": settings, "cases": [case]}

    tiny = {t["target"]: t for t in evaluate_targets(result("tiny", 64, 0.12, 1.3, 0.5))}
    assert [t["met"] for t in tiny.values()] == [True, True, False]  # no generate target at tiny
    smollm2 = {t["target"]: t for t in evaluate_targets(result("smollm2", 576, 0.06, 1.2, 0.91))}
    assert [t["met"] for t in smollm2.values()] == [False, True, True, True]
    overhead, memory, con_memory, generate = smollm2.values()
    assert overhead["target"] == "contrastive term (Gram form) adds ≤ 5 % to our step"
    assert target_value(overhead) == "+6.0 %" and target_threshold(overhead) == "≤ 5 %"
    assert target_threshold(memory) == "≤ 1.3×" and target_threshold(con_memory) == "≤ 1.2×"
    assert target_threshold(generate) == "≥ 0.9×"
    assert not any("#" in name for name in smollm2)


def test_autocast_run_writes_each_finished_case_at_once(tmp_path, monkeypatch):
    """`--autocast bfloat16` (as benchmarks/run_gpu.sh runs the GPU sweep, here on the CPU): every variant runs
    under autocast, the naive loop included, and a sweep writes its result after each case but the last,
    marked partial, so that a run stopped by a time limit keeps what it finished."""
    import comoe.cli.bench

    written = []
    real = comoe.cli.bench.write_json
    monkeypatch.setattr(
        comoe.cli.bench, "write_json", lambda r, d: written.append(r.get("partial")) or real(r, d)
    )
    variants = "lora,naive,ours-dense,ours-grouped,ours-con-gram"
    argv = _argv(tmp_path, "--autocast", "bfloat16", "--experts", "4,8", "--variants", variants)
    assert main([*argv, "--no-generate", "--name", "amp"]) == 0
    assert written == ["1 of 2 cases", None]
    data = json.loads((tmp_path / "results" / "amp.json").read_text())
    assert data["settings"]["autocast"] == "bfloat16" and "partial" not in data
    for case in data["cases"]:
        assert "skipped" not in case and list(case["variants"]) == variants.split(",")
    assert data["cases"][0]["parity"]["ok"]  # the first case checks that naive and grouped equal dense
    assert "under bfloat16 autocast" in (tmp_path / "results" / "amp.md").read_text()
    from comoe.tools.bench.run_page import render_result

    assert "**Stopped early**: this result holds the first 1 of 2 cases" in render_result(
        {**data, "partial": "1 of 2 cases"}
    )


def test_gpu_profile_script_counts_the_host_ops_of_each_variant(tmp_path):
    """benchmarks/gpu_profile.py (README) on the CPU at the tiny shape: its JSON, and our layers' extra host
    operations per step over LoRA's (on a GPU it also reports kernels and GPU-busy time)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_profile.py"), "--size", "tiny", "--layers", "1"]
    cmd += [
        "--batch",
        "1",
        "--seq",
        "16",
        "--steps",
        "1",
        "--autocast",
        "none",
        "--variants",
        "lora,ours-dense",
    ]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    lora, ours = data["variants"]["lora"], data["variants"]["ours-dense"]
    assert lora["wall_ms"] > 0 and lora["kernels_per_step"] == 0 and lora["gpu_busy"] is None  # CPU
    assert ours["aten_calls_per_step"] > lora["aten_calls_per_step"] > 0
    assert data["command"].startswith("python benchmarks/gpu_profile.py --size tiny")


def test_gpu_script_reports_its_environment_and_refuses_clearly_without_a_gpu(tmp_path):
    """benchmarks/run_gpu.sh (README) on a machine without CUDA: the versions it runs with, then comoe bench's
    one-line refusal of the CUDA preset, and no result written."""
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run the sweep")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run_gpu.sh"
    env = {
        "PATH": "/usr/bin:/bin",
        "RESULTS": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert f"torch {torch.__version__}" in proc.stdout and "GPU: none" in proc.stdout
    assert "is a CUDA preset and no GPU is visible" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_same_function_check_judges_each_path_against_fp32_where_the_model_is_not(dtype):
    """fp32: the paths agree with the dense path. bf16: each path's error against an fp32 copy that routes
    as it routed is within 1.5 × PEFT LoRA's own bf16 error; doubling one path's update fails the check."""
    from comoe.tools.bench.measure import make_batch
    from comoe.tools.bench.parity import parity_check
    from comoe.tools.bench.variants import build_variant

    spec = SIZES["tiny"]
    base = build_random_llama(spec, torch.device("cpu"), dtype, seed=0)
    batch = make_batch(base, spec, 2, 16, torch.device("cpu"), 0)
    names = ("lora", "naive", "ours-dense", "ours-grouped")
    kwargs = dict(experts=4, rank=8, top_k=2, targets=["q_proj", "v_proj"], con_path="auto", seed=0)
    variants = {name: build_variant(name, base, **kwargs) for name in names}
    result = parity_check(variants, batch, seed=0)
    assert result["ok"], result
    assert ("error_bound" in result) == (dtype == torch.bfloat16)
    if dtype == torch.bfloat16:
        for name in ("ours-dense", "naive", "ours-grouped"):
            assert 0 < result[f"{name}_error_vs_fp32"] <= result["error_bound"]
        layer = next(iter(variants["ours-grouped"].model.adapted_modules.values()))
        layer.experts.scaling = layer.experts.scaling * 2  # a path whose update is twice what it is
        assert not parity_check(variants, batch, seed=0)["ok"]
