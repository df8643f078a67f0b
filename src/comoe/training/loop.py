"""The training loop, on Hugging Face accelerate: the same code runs on one CPU, under torchrun (DDP) or
``accelerate launch`` with an FSDP/DeepSpeed config.

Determinism is by construction so that a killed run resumes to the same adapter: the data order of each
epoch is a permutation seeded by (seed, epoch), and every checkpoint stores the RNG states that dropout
and the random contrastive anchors draw from.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from comoe.data.batching import IGNORE_INDEX, EncodedExample, collate, encode_example
from comoe.data.schema import Example
from comoe.model import CoMoEModel
from comoe.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from comoe.training.run_config import RunConfig
from comoe.utils.files import write_text_atomic
from comoe.utils.modeling import accepts_logits_to_keep, pad_token_id

MAX_GRAD_NORM = 1.0


class TrainingDiverged(RuntimeError):
    """Training cannot go on as configured (a NaN/inf loss, lost auxiliary losses); no adapter was saved."""


@dataclass
class TrainResult:
    steps: int
    seconds: float  # training time of the whole run, the steps before a resume included
    final: dict[str, float]  # mean loss parts over the last 10 steps
    processes: int = 1
    replicas_identical: bool = True  # every process ended with the same adapter weights
    resumed_at_step: int = 0
    seconds_before_resume: float = 0.0


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, rank: int, world: int, group: int = 32
) -> list[list[int]]:
    """This process's micro-batches (example indices) for one epoch; every rank gets the same count.

    A permutation seeded by (seed, epoch); within windows of ``group`` batches, examples are sorted by
    length so that batches hold similar lengths (less padding); the batch order is then shuffled.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * group
    order = [
        i
        for start in range(0, len(order), window)
        for i in sorted(order[start : start + window], key=lengths.__getitem__)
    ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    per_rank = len(batches) // world
    return batches[rank::world][:per_rank]


def train_adapter(
    model,
    tokenizer,
    examples: list[Example],
    task_names: list[str],
    run: RunConfig,
    work_dir: Path,
    accelerator: Accelerator,
    resume: bool = False,
    desc: str = "train",
) -> TrainResult:
    """Train the adapter of ``model`` (already wrapped) on ``examples``; checkpoints under ``work_dir``."""
    task_index = {name: i for i, name in enumerate(task_names)}
    encoded = [
        encode_example(ex, tokenizer, task_index[ex.task], run.max_length, run.train_on_prompt)
        for ex in examples
    ]
    rank, world = accelerator.process_index, accelerator.num_processes
    lengths = [len(item.input_ids) for item in encoded]
    steps_per_epoch, total_steps = plan_steps(len(encoded), run, world)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.learning_rate, weight_decay=run.weight_decay)
    scheduler = get_scheduler(
        run.scheduler,
        optimizer,
        num_warmup_steps=math.ceil(run.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)

    checkpoint_dir = work_dir / "checkpoints"
    start, earlier_seconds = 0, 0.0
    found = list_checkpoints(checkpoint_dir) if resume else []
    if found:
        progress = load_checkpoint(found[-1], core, optimizer, scheduler)
        start, earlier_seconds = progress["step"], progress.get("elapsed_s", 0.0)
        accelerator.print(f"resumed from {found[-1]} at step {start}/{total_steps}")
    log_path = work_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        truncate_log(
            log_path, start
        )  # the steps a killed process logged after its last checkpoint are redone

    pad_id = pad_token_id(tokenizer)
    trim = accepts_logits_to_keep(core)  # run the output head only where labels are predicted
    model.train()
    recent: list[dict[str, float]] = []
    began = time.time() - earlier_seconds
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc=desc,
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    cached_epoch, batches = -1, []
    for step in range(start, total_steps):
        epoch, slot = divmod(step, steps_per_epoch)
        if epoch != cached_epoch:
            batches, cached_epoch = (
                epoch_batches(lengths, run.batch_size, run.seed, epoch, rank, world),
                epoch,
            )
        parts = _accumulated_step(
            model,
            core,
            accelerator,
            optimizer,
            scheduler,
            params,
            [[encoded[i] for i in b] for b in batches[slot * run.grad_accum : (slot + 1) * run.grad_accum]],
            pad_id,
            trim,
        )
        parts.update(
            step=step + 1, epoch=epoch, lr=scheduler.get_last_lr()[0], elapsed_s=round(time.time() - began, 2)
        )
        if not math.isfinite(parts["loss"]):
            shown = ", ".join(f"{k} {parts[k]:.4g}" for k in ("task", "con", "bal") if k in parts)
            raise TrainingDiverged(
                f"{desc}: the loss is {parts['loss']} at step {step + 1} ({shown}); no adapter was saved. "
                f"Check the model and the data, or start a new run (another --output-dir) with a lower --learning-rate"
            )
        recent = (recent + [parts])[-10:]
        bar.update(1)
        bar.set_postfix({k: f"{parts[k]:.3f}" for k in ("loss", "task", "con", "bal") if k in parts})
        if accelerator.is_main_process:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(parts) + "\n")
        if (step + 1) % run.save_steps == 0 and step + 1 < total_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(
                    checkpoint_dir,
                    step + 1,
                    core,
                    optimizer,
                    scheduler,
                    {"epoch": epoch, "elapsed_s": parts["elapsed_s"]},
                )
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and log_path.is_file():
        recent = read_log(log_path)[-10:]  # across a resume, not only the steps of this process
    final = {
        k: sum(p[k] for p in recent) / len(recent)
        for k in ("loss", "task", "con", "bal")
        if recent and k in recent[0]
    }
    return TrainResult(
        total_steps,
        time.time() - began,
        final,
        world,
        replicas_identical(params, accelerator),
        resumed_at_step=start,
        seconds_before_resume=earlier_seconds,
    )


def read_log(path: Path) -> list[dict]:
    """The rows of a ``train_log.jsonl``; a last line cut short by a killed process is skipped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(
                    f"{path}:{number}: not a JSON row; the log is damaged (delete the line)"
                ) from None
    return rows


def truncate_log(path: Path, step: int) -> None:
    """Keep only the rows of steps ``<= step`` (all of them gone for a fresh start), atomically."""
    if not path.is_file():
        return
    kept = [row for row in read_log(path) if row["step"] <= step] if step > 0 else []
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))


def plan_steps(num_examples: int, run: RunConfig, world: int) -> tuple[int, int]:
    """(optimiser steps per epoch, total steps) for ``num_examples``; a clear error when there is no step.

    Every process gets ``ceil(n / batch_size) // world`` micro-batches an epoch (see ``epoch_batches``).
    """
    micro_per_epoch = math.ceil(num_examples / run.batch_size) // world
    steps_per_epoch = micro_per_epoch // run.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"{num_examples} training examples make no full step of batch_size={run.batch_size} × "
            f"grad_accum={run.grad_accum} × {world} processes: lower them or add data (train_per_task)"
        )
    return steps_per_epoch, run.max_steps or math.ceil(run.epochs * steps_per_epoch)


def replicas_identical(params: list[torch.Tensor], accelerator: Accelerator) -> bool:
    """Whether all processes hold bit-identical trainable weights (always true for one process)."""
    if accelerator.num_processes == 1:
        return True
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    gathered = accelerator.gather(flat[None]).cpu()
    return bool((gathered == gathered[0]).all())


def _accumulated_step(
    model,
    core,
    accelerator,
    optimizer,
    scheduler,
    params,
    micro_batches: list[list[EncodedExample]],
    pad_id: int,
    trim: bool,
) -> dict[str, float]:
    """One optimiser step over ``micro_batches``; returns the mean loss parts."""
    totals: dict[str, float] = {}
    for i, micro in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in collate(micro, pad_id).items()}
        if not isinstance(core, CoMoEModel):
            batch.pop("task_ids")  # PEFT/plain models do not take it
        sync = i == len(micro_batches) - 1
        context = accelerator.no_sync(model) if not sync else nullcontext()
        with context, accelerator.autocast():
            task_loss, out = causal_lm_loss(model, batch, trim)
            aux = out.get("aux_loss")  # an output field: it survives mixed precision, DDP and compile
            if (
                aux is None
                and isinstance(core, CoMoEModel)
                and (core.comoe_config.contrastive_weight > 0 or core.comoe_config.balance_weight > 0)
            ):
                raise TrainingDiverged(
                    "the model output lost its aux_loss field (a wrapper rebuilt it without its "
                    "mapping fields): the auxiliary losses would be dropped, so training stops"
                )
            loss = task_loss + aux if aux is not None else task_loss
            accelerator.backward(loss / len(micro_batches))
        for key, value in _loss_parts(loss, task_loss, out).items():
            totals[key] = totals.get(key, 0.0) + value / len(micro_batches)
    accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def causal_lm_loss(model, batch: dict[str, torch.Tensor], trim: bool) -> tuple[torch.Tensor, object]:
    """Mean next-token cross-entropy over labelled tokens (the task loss), and the model outputs.

    With ``trim`` the output head runs only at positions that predict a label: with the loss on answer
    tokens, a few positions per row instead of all of them (the head is ~20% of SmolLM2's compute).
    """
    labels = batch.pop("labels")
    targets = labels[:, 1:]
    if not trim:
        out = model(**batch)
        logits = out.logits[:, :-1]
    else:
        positions = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        out = model(**batch, logits_to_keep=positions)
        logits, targets = out.logits, targets[:, positions]
    task_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return task_loss, out


def _loss_parts(loss: torch.Tensor, task_loss: torch.Tensor, out) -> dict[str, float]:
    parts = {"loss": loss.item(), "task": task_loss.item()}
    for field, key in (("contrastive_loss", "con"), ("balance_loss", "bal")):
        if out.get(field) is not None:
            parts[key] = out[field].item()
    return parts


SUPPORTED_DISTRIBUTION = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def make_accelerator(run: RunConfig) -> Accelerator:
    """One process, or DDP (torchrun / accelerate launch). FSDP and DeepSpeed are refused before any work:
    the checkpoints save the optimizer state of one process, which is only the whole state under DDP."""
    # accelerate only sets up multi-process CPU training (gloo) when told it is on the CPU
    accelerator = Accelerator(mixed_precision="bf16" if run.bf16 else "no", cpu=not torch.cuda.is_available())
    if accelerator.distributed_type not in SUPPORTED_DISTRIBUTION:
        raise ValueError(
            f"`comoe train` runs on one process or with DDP, not {accelerator.distributed_type.value}: "
            "its checkpoints hold one process's optimizer state; launch with `torchrun` or a plain "
            "multi-GPU `accelerate launch` config, or train through transformers' Trainer "
            '(see README "Use with PEFT / Trainer / TRL")'
        )
    set_seed(run.seed)
    return accelerator
