"""The steps of a training run: how many there are, which examples each process's micro-batches hold,
and the learning-rate schedule they follow."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from comoe.training.run_config import RunConfig


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


def make_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    """transformers' schedule ``name``, whose warm-up never runs a step at rate 0.

    Warm-up step ``i`` (0-based) of ``w`` uses ``lr·(i+1)/(w+1)``, so even a one-step run (``--max-steps
    1``, whose warm-up is that step) moves the adapter; after the warm-up the schedule is transformers'
    own (linear and cosine decay reach 0 only after the last step)."""
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    if warmup_steps == 0 or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return scheduler
    after = scheduler.lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / (warmup_steps + 1) if step < warmup_steps else after(step)
    )
