"""`comoe export`: a trained adapter and its base model as one self-contained Hugging Face model folder.

The folder holds the base model's config and weights together with the adapter's tensors
(``model.safetensors``), the tokenizer, the generation config, and modeling code registered through
``auto_map`` in config.json (``comoe.training.export_code``), so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it with torch and transformers
alone and computes what the adapted model computes. The adapter comes from a run directory or a bare
adapter directory, found as `comoe predict` finds it (``comoe.training.predict.prediction_source``). The
checks of the source, the task, the settings and the output directory run before any model loads (the
tied-weight check needs the loaded model and runs before anything is written); the folder is written
into a hidden directory beside it and renamed into place.

Exported: every CoMoE adapter of an unquantised base: LoRA, DoRA and whole-FFN experts, routing topk, soft
and topp, one expert (plain LoRA) included. The exported model takes the dense expert path, which an
adapter trained with ``expert_path='grouped'`` computes too, up to float rounding. Refused, with what would
work: plain PEFT LoRA adapters (``--method lora``), quantised bases, base classes transformers does not
implement itself, and an adapted module whose weight the base ties to another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import save_torch_state_dict
from torch import nn

from comoe.config import CoMoEConfig, current_version, read_adapter_config
from comoe.experts import kind_for
from comoe.inference import INFERENCE_KINDS, INFERENCE_ROUTINGS
from comoe.model import CoMoEModel
from comoe.training.adapters import load_adapted_model
from comoe.training.base_models import load_base_model
from comoe.training.export_code import AUTO_MAP, MODEL_CLASS, MODEL_TYPE, base_class_problem, code_files
from comoe.training.predict import prediction_source
from comoe.training.run_config import RunConfig
from comoe.utils.files import atomic_dir, write_json_atomic, write_text_atomic

MODEL_CONFIG_NAME = "config.json"
MAX_SHARD_SIZE = "5GB"  # transformers' own default for model.safetensors shards


@dataclass(frozen=True)
class ExportSource:
    """What ``comoe export`` writes out: the run settings (base model, quantisation) and one adapter."""

    run: RunConfig
    adapter: Path
    description: str


def export_source(path: Path, overrides: dict[str, Any], task: str | None = None) -> ExportSource:
    """The adapter of ``path`` (a run directory or an adapter directory) to export, and its run settings.

    A single-task run holds one adapter per task: ``task`` names one (it may be left out when there is only
    one); a multi-task run or a bare adapter has one adapter for every task, and ``task`` must be None."""
    source = prediction_source(path, overrides)
    adapters = source.adapters
    if None in adapters:
        if task is not None:
            raise ValueError(
                f"--task {task}: {source.description} holds one adapter for every task; drop --task"
            )
        return ExportSource(source.run, adapters[None], source.description)
    if task is None:
        if len(adapters) > 1:
            raise ValueError(
                f"{source.description} trained one adapter per task ({', '.join(map(str, adapters))}); "
                "choose the one to export with --task"
            )
        task = next(iter(adapters))
    if task not in adapters:
        raise ValueError(
            f"--task {task}: {source.description} has no adapter for it; its tasks are "
            f"{', '.join(map(str, adapters))}"
        )
    return ExportSource(source.run, adapters[task], f"{source.description}, task {task}")


def exportable_config(source: ExportSource) -> CoMoEConfig:
    """The adapter's config, or a ValueError naming the setting that cannot be exported and what can."""
    adapter = source.adapter
    peft_type = read_adapter_config(adapter)["peft_type"]
    if peft_type != "COMOE":
        raise ValueError(
            f"{adapter} holds a PEFT {peft_type} adapter (method {source.run.method!r}), not a CoMoE one: "
            "comoe export writes CoMoE adapters; a plain LoRA merges into its base with PEFT's "
            "merge_and_unload(), whose save_pretrained needs no custom code"
        )
    config = CoMoEConfig.from_pretrained(adapter)
    if source.run.quantize is not None:
        raise ValueError(
            f"quantize={source.run.quantize!r}: the adapter was trained on a bitsandbytes-quantised base, "
            "and an exported folder holds full-precision weights, which would not compute what the adapted "
            "quantised model computes; export an adapter trained without --quantize"
        )
    if config.routing not in INFERENCE_ROUTINGS:
        raise ValueError(
            f"routing={config.routing!r} has no inference code in comoe.inference, which an exported model "
            f"runs; export supports routing {', '.join(INFERENCE_ROUTINGS)}"
        )
    kinds = {kind_for(config, ffn_block=config.placement == "ffn"), kind_for(config)}
    missing = sorted(kinds - set(INFERENCE_KINDS))
    if missing:
        raise ValueError(
            f"expert kind {missing[0]!r} has no inference code in comoe.inference, which an exported model "
            f"runs; export supports {', '.join(INFERENCE_KINDS)} experts"
        )
    return config


def check_export_dir(out_dir: Path) -> None:
    """Refuse an output that exists and is not an empty directory: an export never overwrites anything."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty; choose another --output-dir or remove it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is a file; --output-dir takes a directory")


def export_job(
    source_path: Path, out_dir: Path, overrides: dict[str, Any] | None = None, task: str | None = None
) -> dict[str, Any]:
    """Export the adapter of ``source_path`` with its base model to ``out_dir``; returns a summary."""
    check_export_dir(out_dir)
    source = export_source(source_path, overrides or {}, task)
    exportable_config(source)
    base, tokenizer = load_base_model(source.run.model, quantize=source.run.quantize)
    model = load_adapted_model(base, source.adapter)
    summary = export_model(model, out_dir, tokenizer=tokenizer, base_model=source.run.model)
    return {"source": source.description, **summary}


def export_model(
    model: CoMoEModel, out_dir: str | Path, tokenizer: Any = None, base_model: str | None = None
) -> dict[str, Any]:
    """Write ``model`` (a CoMoE-adapted causal LM) as a model folder at ``out_dir``: weights (safetensors),
    config.json with ``auto_map`` and the adapted layers, the code files, the generation config, and the
    tokenizer when given. Atomic: written into a hidden directory beside ``out_dir``, then renamed; an
    existing ``out_dir`` is replaced (``export_job`` refuses a non-empty one first)."""
    out_dir = Path(out_dir)
    inner = model.get_base_model()
    problem = base_class_problem(inner)
    if problem:
        raise ValueError(problem)
    layers = layer_specs(model)
    config = model_config(inner, layers, model.comoe_config, base_model)
    with atomic_dir(out_dir) as tmp:
        save_weights(inner, tmp)
        write_json_atomic(tmp / MODEL_CONFIG_NAME, config)
        for name, text in code_files(inner, current_version()).items():
            write_text_atomic(tmp / name, text)
        if getattr(inner, "generation_config", None) is not None:
            inner.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / "README.md", folder_readme(type(inner).__name__, base_model, len(layers)))
    return {
        "output_dir": str(out_dir),
        "model": base_model,
        "architecture": type(inner).__name__,
        "layers": len(layers),
        "kinds": sorted({spec["kind"] for spec in layers.values()}),
    }


def layer_specs(model: CoMoEModel) -> dict[str, dict[str, Any]]:
    """What the exported code builds in place of each adapted module (by its name in the base model): the
    expert kind and the settings its inference reads. A module whose weight the base ties to another is
    refused: the exported architecture ties weights by their names."""
    tied = getattr(model.get_base_model(), "all_tied_weights_keys", None) or {}
    tied_names = set(tied) | set(tied.values())
    specs = {}
    for name, layer in model.adapted_modules.items():
        if f"{name}.weight" in tied_names:
            raise ValueError(
                f"the adapter adapts {name}, whose weight the base model ties to another module's; the "
                f"exported architecture cannot keep that tie. Export an adapter whose targets leave {name} out"
            )
        config = layer.config
        specs[name] = {
            "kind": layer.experts.name,
            "num_experts": layer.num_experts,
            "r": layer.r,
            "scaling": layer.scaling,
            "routing": config.routing,
            "top_k": config.top_k,
            "top_p": config.top_p,
        }
    return specs


def model_config(
    inner: nn.Module, layers: dict[str, dict[str, Any]], adapter: CoMoEConfig, base_model: str | None
) -> dict[str, Any]:
    """config.json: the base model's config, under model_type "comoe" with ``auto_map`` to the code files,
    and a "comoe" entry: the adapted layers (what the code builds), the adapter's settings, the base."""
    data = inner.config.to_dict()
    data.pop("_name_or_path", None)
    data.update(
        model_type=MODEL_TYPE,
        architectures=[MODEL_CLASS],
        auto_map=dict(AUTO_MAP),
        comoe={
            "comoe_version": current_version(),
            "base_model": base_model,
            "base_architecture": type(inner).__name__,
            "adapter": adapter.method_dict(),
            "layers": layers,
        },
    )
    return data


def save_weights(inner: nn.Module, directory: Path) -> None:
    """The base's and the adapter's tensors by their names in ``inner`` (``q_proj.base_layer.weight``,
    ``q_proj.experts.comoe_A``), as safetensors shards; a weight tied to another is saved once, as
    transformers saves it (the loader ties it again from the config)."""
    tied = set(getattr(inner, "all_tied_weights_keys", None) or {})
    tensors = {name: t.detach() for name, t in inner.state_dict().items() if name not in tied}
    save_torch_state_dict(tensors, directory, max_shard_size=MAX_SHARD_SIZE, metadata={"format": "pt"})


def folder_readme(architecture: str, base_model: str | None, n_layers: int) -> str:
    """The README.md of an exported folder: what it is and how to load it."""
    base = f" ({base_model})" if base_model else ""
    return (
        "# comoe export\n\n"
        f"A {architecture}{base} with a comoe adapter (mixtures of LoRA experts on {n_layers} modules) "
        f"built in, exported by comoe {current_version()}. It loads with torch and transformers alone; the "
        "code is in `modeling_comoe.py` and `comoe_inference.py` (inference only), so loading it runs that "
        "code:\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)\n'
        "```\n\n"
        '`config.json` names the adapted modules and their experts under "comoe".\n'
    )
