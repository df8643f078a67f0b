"""What is measured of a variant: a training step (round-robin timing), memory, host syncs, generation, parity."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from comoe.tools.bench.sizes import SizeSpec
from comoe.tools.bench.variants import Variant

MIN_STEPS = 20  # the floor for committed numbers; fewer is allowed (tests) but flagged


# --- one training step --------------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    embeds: Tensor  # inputs_embeds, detached
    embeds_leaf: Tensor  # the same values as a leaf that requires grad (frozen base: backward to inputs)
    autocast: torch.dtype | None = None  # mixed precision of the forward (as `comoe train --bf16` runs it)

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Autocast around the forward (backward runs outside it, as torch's AMP recipe has it)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.input_ids.device.type, dtype=self.autocast)


def make_batch(
    base: nn.Module,
    spec: SizeSpec,
    batch: int,
    seq: int,
    device: torch.device,
    seed: int,
    autocast: torch.dtype | None = None,
) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    vocab = base.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (batch, seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids).detach()
    return Batch(ids, mask, embeds, embeds.clone().requires_grad_(True), autocast)


def train_step(variant: Variant, batch: Batch) -> None:
    """zero_grad, forward with labels (CE + the variant's aux losses), backward, optimizer step."""
    if variant.optimizer is not None:
        variant.optimizer.zero_grad(set_to_none=True)
        embeds = batch.embeds
    else:
        batch.embeds_leaf.grad = None
        embeds = batch.embeds_leaf
    with batch.forward_context():
        out = variant.model(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.input_ids)
    out.loss.backward()
    if variant.optimizer is not None:
        variant.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    fns: dict[str, Callable[[], None]], rounds: int, warmup: int, device: torch.device, seed: int
) -> dict[str, list[float]]:
    """Seconds per call of each fn over ``rounds`` timed rounds (after ``warmup`` untimed ones).

    Each round calls every fn once, in an order rotated by one each round; before each call the RNG is
    reseeded with the round's seed, so every variant sees the same dropout masks and anchor draws.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    for i in range(warmup + rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            torch.manual_seed(seed + i)
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


# --- memory and host syncs ---------------------------------------------------------------------------------
class SavedTensorMeter:
    """Bytes of the unique storages autograd saves for backward, parameters and buffers excluded."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.storages: dict[int, int] = {}
        self.count = 0

    def pack(self, t: Tensor) -> Tensor:
        self.count += 1
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return t
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude:
            self.storages[ptr] = storage.nbytes()
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def parameter_storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}


def saved_activation_bytes(variant: Variant, batch: Batch) -> tuple[int, int]:
    """(bytes, number of saved tensors) that one training forward of ``variant`` keeps for backward."""
    meter = SavedTensorMeter(parameter_storages(variant.model))
    if variant.optimizer is not None:
        variant.optimizer.zero_grad(set_to_none=True)
    embeds = batch.embeds if variant.optimizer is not None else batch.embeds_leaf
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack), batch.forward_context():
        out = variant.model(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.input_ids)
    result = (meter.bytes, meter.count)
    out.loss.backward()
    del out
    return result


def peak_step_bytes(variant: Variant, batch: Batch, device: torch.device) -> int | None:
    """CUDA only: peak allocated bytes above the pre-step level during one training step."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    train_step(variant, batch)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def host_syncs_per_step(variant: Variant, batch: Batch, device: torch.device) -> int | None:
    """CUDA only: synchronising calls in one training step, counted by ``torch.cuda.set_sync_debug_mode``."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(variant, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# --- generation ---------------------------------------------------------------------------------------
def generate_fn(
    variant: Variant,
    prompt: Tensor,
    new_tokens: int,
    autocast: torch.dtype | None = None,
    static_cache: bool = False,
) -> Callable[[], None]:
    """Greedy generation of ``new_tokens``; with ``static_cache`` the KV cache is transformers' static one,
    whose decode step transformers compiles on a GPU (CUDA graphs)."""
    cache = {"cache_implementation": "static"} if static_cache else {}

    def run() -> None:
        amp = torch.autocast(prompt.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with torch.no_grad(), amp:
            variant.model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                use_cache=True,
                **cache,
            )

    return run


# --- parity: the naive loop and both of our paths compute the same function -----------------------------
@torch.no_grad()
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(a: list[float], b: list[float]) -> float:
    return median([x / y for x, y in zip(a, b, strict=True)])
