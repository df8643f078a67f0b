"""The peers' results (benchmarks/peers/*/bench.py) in BENCHMARKS.md: rendered without the peer environment."""

from __future__ import annotations

import json

from comoe.tools.bench.peers_page import render_peers
from comoe.tools.bench.render import render_all
from comoe.tools.bench.results_files import load_peer_results, load_results


def _row(ms: float, x: float, mem: float, adapts: str, like: str, params: int) -> dict:
    return {
        "framework": "moe-peft",
        "adapts": adapts,
        "like_for_like": like,
        "trainable_params": params,
        "median_ms": ms,
        "iqr_ms": 1.0,
        "tokens_per_s": 100.0,
        "drift": 1.01,
        "x_lora": x,
        "x_like": x / 1.25 if like == "peft-lora-all" else x,
        "times_ms": [ms] * 4,
        "saved_bytes": int(mem * 2**20),
        "saved_tensors": 10,
        "mem_x_lora": mem,
        "mem_x_like": mem,
    }


def _peer(size: str = "tiny") -> dict:
    rows = {
        "peft-lora": _row(10.0, 1.0, 1.0, "PEFT LoRA on q,k,v,o", "peft-lora", 14336),
        "peft-lora-all": _row(12.5, 1.25, 1.4, "PEFT LoRA on all", "peft-lora-all", 36992),
        "mola": _row(23.4, 2.34, 2.12, "MoLA: experts on q,k,v,o", "peft-lora", 59392),
        "mixlora": _row(24.9, 2.49, 2.30, "MixLoRA: FFN experts", "peft-lora-all", 105472),
    }
    for r in rows.values():
        r["times_ms"] = [r["median_ms"]] * 4
    return {
        "schema": "peer-1",
        "peer": "moe-peft",
        "name": f"peer-moe-peft-{size}",
        "size": size,
        "command": f"python benchmarks/peers/moe_peft/bench.py --size {size}",
        "setup": "bash benchmarks/peers/moe_peft/setup.sh",
        "versions": {
            "python": "3.11",
            "torch": "2.13.0",
            "transformers": "4.46.3",
            "peft": "0.21.2",
            "moe-peft": "2.0.2",
        },
        "machine": {"cpu_model": "a CPU"},
        "spec": {"hidden": 64, "intermediate": 172, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 512},
        "weights": "random init (seed 0)",
        "settings": {
            "dtype": "float32",
            "threads": 1,
            "batch": 4,
            "seq": 64,
            "experts": 4,
            "top_k": 2,
            "rank": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.05,
            "steps": 20,
            "warmup": 2,
            "note": "",
        },
        "variants": rows,
        "same_function": {"max_abs_diff_to_peft_lora": 0.0, "ok": True},
        "differences": ["eager attention in the peer", "transformers 4.46.3 there"],
        "elapsed_s": 7.7,
    }


def _comoe(name: str, targets: list[str], variants: dict) -> dict:
    """The fields of a `comoe bench` result that the peers' section reads."""
    return {
        "name": name,
        "size": "tiny",
        "weights": "random init",
        "machine": {"python": "3.11", "torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"},
        "settings": {"target_modules": targets},
        "cases": [{"experts": 4, "rank": 16, "top_k": 2, "variants": variants}],
    }


def _comoe_row(ms: float, x: float, mem: float) -> dict:
    return {
        "median_ms": ms,
        "x_lora": x,
        "mem_x_lora": mem,
        "saved_bytes": 2**20,
        "trainable_params": 59392,
        "drift": 1.0,
    }


def test_peer_table_sets_comoe_ratios_beside_the_peer_ones():
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    comoe = [
        _comoe(
            "tiny", attn, {"lora": _comoe_row(11.5, 1.0, 1.0), "ours-dense": _comoe_row(15.5, 1.29, 1.36)}
        ),
        _comoe("tiny-ffn", ["gate_proj", "up_proj", "down_proj"], {"ours-ffn": _comoe_row(14.0, 1.37, 1.74)}),
        _comoe(
            "tiny-dora", attn, {"ours-dense": _comoe_row(1.0, 9.99, 9.99)}
        ),  # not a run shown beside peers
    ]
    text = "\n".join(render_peers([_peer()], comoe))
    assert "## Peers" in text and "#### MoE-PEFT, `tiny`" in text
    # the overview: the peer's ratios and comoe's, both to PEFT LoRA on q,k,v,o (time (memory))
    assert "| size | MoE-PEFT MoLA | MoE-PEFT MixLoRA | comoe ours-dense | comoe ours-con-gram |" in text
    assert "| tiny | 2.34× (2.12×) | 2.49× (2.30×) | 1.29× (1.36×) | – |" in text
    lines = text.splitlines()
    mola = next(line for line in lines if line.startswith("| MoE-PEFT env | mola |"))
    assert "| 23.4 | 2.34× (2.34–2.34) | 2.34× (peft-lora) |" in mola and "| 59,392 |" in mola
    mix = next(line for line in lines if "| mixlora |" in line)
    assert "1.99× (peft-lora-all)" in mix  # its like-for-like reference: LoRA on the same modules
    dense = next(line for line in lines if line.startswith("| comoe (`tiny.json`) | ours-dense |"))
    assert "| 15.5 | 1.29× | 1.29× |" in dense
    ffn = next(
        line for line in lines if "| ours-ffn |" in line
    )  # LoRA on gate,up,down there: same-modules only
    assert "`tiny-ffn.json`" in ffn and "| 14.0 | – | 1.37× |" in ffn and "on gate,up,down" in ffn
    assert "9.99" not in text
    assert "transformers 5.24.0" in text and "transformers 4.46.3" in text
    assert "- eager attention in the peer" in text and "bash benchmarks/peers/moe_peft/setup.sh" in text
    assert "agrees with PEFT LoRA's to 0.0e+00: ok" in text


def test_peer_results_are_not_comoe_results(tmp_path):
    (tmp_path / "peer-moe-peft-tiny.json").write_text(json.dumps(_peer()))
    (tmp_path / "peer-moe-peft-wide.json").write_text(
        json.dumps({**_peer("wide"), "name": "peer-moe-peft-wide"})
    )
    (tmp_path / "other.json").write_text(json.dumps({"schema": 1}))
    assert load_results(tmp_path) == []
    peers = load_peer_results(tmp_path)
    assert [p["size"] for p in peers] == ["tiny", "wide"]
    text = render_all([], None, peers)  # no comoe result for the size: said so, the peer table still there
    assert text.index("## Peers") < text.index("## Runs")
    assert "No comoe result for `tiny`" in text and "| wide | 2.34× (2.12×)" in text
    assert text.count("- eager attention in the peer") == 1  # differences shared by the sizes: listed once
