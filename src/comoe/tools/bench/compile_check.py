"""Does ``torch.compile`` run the adapted model and match eager?"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from comoe.model import get_comoe_model
from comoe.tools.bench.measure import (
    MIN_STEPS,
    make_batch,
    median,
    paired_ratio,
    time_round_robin,
    train_step,
)
from comoe.tools.bench.sizes import SIZES, build_random_llama
from comoe.tools.bench.variants import Variant, build_variant, shared_copy, variant_config


# --- torch.compile check ---------------------------------------------------------------------------------
def _quiet_compile_logs():
    """Dynamo logs a failed trace at ERROR level with a long traceback; the check reports it instead."""
    import logging

    names = ("torch._dynamo", "torch._subclasses.fake_tensor", "torch._inductor", "torch.fx")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    return saved


def compile_check(
    backend: str = "inductor",
    paths: tuple[str, ...] = ("dense", "grouped"),
    seed: int = 0,
    steps: int = MIN_STEPS,
    warmup: int = 3,
    log: Callable[[str], None] = print,
) -> dict:
    """``torch.compile`` a tiny adapted LLaMA (tiny preset, 4 experts top-2, r = 16, Gram contrastive loss on)
    and compare loss and every adapter gradient with eager; where it works, time a training step of the
    compiled model against the same model in eager mode and against the naive loop (λ = 0), round-robin.

    Dropout is 0 and anchors are 'all' so that eager and compiled compute the same numbers.
    """
    import logging

    import torch._dynamo

    try:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    except ImportError:  # pragma: no cover
        pass
    spec = SIZES["tiny"]
    device = torch.device("cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    out: dict = {
        "backend": backend,
        "paths": {},
        "steps": steps,
        "warmup": warmup,
        "config": "tiny preset, E=4, top-2, r=16, Gram contrastive (λ=0.01, anchor=all), dropout 0",
    }
    saved_levels = _quiet_compile_logs()
    try:
        base = build_random_llama(spec, device, torch.float32, seed)
        batch = make_batch(base, spec, spec.batch, spec.seq, device, seed)
        for path in paths:
            entry: dict = {}
            out["paths"][path] = entry
            log(f"  torch.compile check: path {path}")
            torch.manual_seed(seed)
            cfg = variant_config(4, 16, 2, targets, path=path, contrastive="gram", dropout=0.0)
            cfg.anchor = "all"  # deterministic: no random anchor draw to compare across eager and compiled
            model = get_comoe_model(shared_copy(base), cfg).train()
            gen = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for name, p in sorted(model.adapter_state_dict().items()):
                    if name.endswith(("comoe_B", "comoe_router")):
                        p.copy_(
                            torch.randn(p.shape, generator=gen) * (0.1 if name.endswith("comoe_B") else 1.0)
                        )
            params = dict(model.adapter_state_dict())
            kwargs = {
                "inputs_embeds": batch.embeds,
                "attention_mask": batch.attention_mask,
                "labels": batch.input_ids,
            }

            def loss_and_grads(fn, params=params, kwargs=kwargs):
                for p in params.values():
                    p.grad = None
                loss = fn(**kwargs).loss
                loss.backward()
                return loss.detach().clone(), {k: p.grad.detach().clone() for k, p in params.items()}

            eager_loss, eager_grads = loss_and_grads(model)
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=backend)
            t0 = time.perf_counter()
            try:
                comp_loss, comp_grads = loss_and_grads(compiled)
            except Exception as err:  # noqa: BLE001 - reported, not raised
                entry.update(works=False, matched=False, error=f"{type(err).__name__}: {_first_line(err)}")
                continue
            entry["compile_s"] = round(time.perf_counter() - t0, 1)
            loss_diff = (comp_loss - eager_loss).abs().item()
            grad_diff = max((comp_grads[k] - eager_grads[k]).abs().max().item() for k in params)
            grad_scale = max(g.abs().max().item() for g in eager_grads.values())
            tol = 1e-4
            entry.update(
                works=True,
                loss_eager=eager_loss.item(),
                loss_compiled=comp_loss.item(),
                loss_abs_diff=loss_diff,
                grad_max_abs_diff=grad_diff,
                grad_scale=grad_scale,
                matched=bool(
                    loss_diff <= tol * max(1.0, abs(eager_loss.item()))
                    and grad_diff <= tol * max(1.0, grad_scale)
                ),
            )
            if steps <= 0:
                continue
            # timing, round-robin: the naive loop (λ = 0), our model without the loss (eager and compiled)
            # and with it (eager and compiled, the model checked above); dropout 0 everywhere
            torch.manual_seed(seed)
            naive = build_variant(
                "naive", base, experts=4, rank=16, top_k=2, targets=targets, con_path=path, seed=seed
            )
            plain = get_comoe_model(
                shared_copy(base), variant_config(4, 16, 2, targets, path=path, dropout=0.0)
            ).train()
            for m in naive.model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
            plain_compiled = torch.compile(plain, backend=backend)
            run = {
                "naive": naive,
                "eager": Variant("eager", plain, _adamw(plain), path),
                "compiled": Variant("compiled", plain_compiled, None, path),
                "eager+con": Variant("eager+con", model, _adamw(model), path),
                "compiled+con": Variant("compiled+con", compiled, None, path),
            }
            run["compiled"].optimizer = run["eager"].optimizer  # same parameters as their eager twins
            run["compiled+con"].optimizer = run["eager+con"].optimizer
            t0 = time.perf_counter()
            train_step(run["compiled"], batch)
            entry["compile_s_no_loss"] = round(time.perf_counter() - t0, 1)
            fns = {n: (lambda v=v: train_step(v, batch)) for n, v in run.items()}
            times = time_round_robin(fns, steps, warmup, device, seed)
            entry["timing"] = {n: {"median_ms": 1e3 * median(t)} for n, t in times.items()}
            entry["compiled_x_eager"] = paired_ratio(times["compiled"], times["eager"])
            entry["compiled_x_naive"] = paired_ratio(times["compiled"], times["naive"])
            entry["eager_x_naive"] = paired_ratio(times["eager"], times["naive"])
            entry["compiled_con_x_eager_con"] = paired_ratio(times["compiled+con"], times["eager+con"])
            entry["compiled_con_x_naive"] = paired_ratio(times["compiled+con"], times["naive"])
    finally:
        for n, level in saved_levels.items():
            logging.getLogger(n).setLevel(level)
        torch._dynamo.reset()
    out["works"] = all(e.get("works") for e in out["paths"].values())
    out["matched"] = all(e.get("matched") for e in out["paths"].values())
    return out


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def _first_line(err: BaseException) -> str:
    """The informative part of a (possibly very long) dynamo error."""
    text = str(err)
    i = text.find("Expected ")
    if i >= 0:
        return text[i:].split("\n")[0][:300].rstrip("')\"")
    return text.split("\n")[0][:300]
