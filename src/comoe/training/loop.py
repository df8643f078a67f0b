"""The training loop as a recipe object on Hugging Face accelerate: one process, DDP (torchrun, accelerate
launch), FSDP2 (accelerate launch with an FSDP config; see ``comoe.training.sharding``) or DeepSpeed ZeRO
(accelerate launch with a DeepSpeed config; see ``comoe.training.zero``).

:class:`TrainingRecipe` holds the state of a run (model, optimiser, schedule, accelerator, checkpoints);
``train_adapter`` builds one and runs it.

Determinism is by construction so that a killed run resumes to the same adapter: the data order of each
epoch is a permutation seeded by (seed, epoch), and every checkpoint stores the RNG states that dropout
and the random contrastive anchors draw from.

Loss normalisation: an optimiser step is one batch split into ``grad_accum`` micro-batches (and over
processes), and its gradient is that of the whole batch: the task loss is the sum of cross-entropy
over the step's label tokens divided by their count, and each auxiliary loss (a mean over the real
tokens of its forward) is weighted by its micro-batch's share of the step's real tokens. Short answers
therefore weigh what their tokens weigh, whichever micro-batch they land in.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from comoe.compiling import compile_layers
from comoe.data.batching import EncodedExample, collate, encode_example
from comoe.data.schema import Example
from comoe.model import CoMoEModel
from comoe.routing_health import RoutingHealth, health_summary
from comoe.training import zero
from comoe.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    remove_stale_writes,
    save_checkpoint,
    training_state,
)
from comoe.training.run_config import RunConfig
from comoe.training.run_dir import CHECKPOINTS_DIR, TRAIN_LOG_NAME, read_train_log, truncate_train_log
from comoe.training.sharding import clip_grad_norm, gradient_sync, is_sharded
from comoe.training.steps import epoch_batches, make_scheduler, plan_steps
from comoe.training.task_loss import causal_lm_loss, label_tokens
from comoe.training.validation import Validator, validation_history
from comoe.utils.deprecation import moved_names
from comoe.utils.modeling import accepts_logits_to_keep, pad_token_id
from comoe.utils.threads import CpuThreads


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
    validation: list[dict[str, float]] = field(default_factory=list)  # [{step, val_loss, val_accuracy}]
    sharding: str = ""  # "fsdp2", "zero1", "zero2", "zero3"; "" for one process or DDP


class TrainingRecipe:
    """One adapter's training: the optimiser, schedule and checkpoints of ``model`` on ``examples``.

    Build it, then :meth:`run`; :meth:`step` is one optimiser step over a list of micro-batches. A model
    sharded with FSDP2 already (``comoe.training.sharding.shard_model``) trains as it is; with
    ``zero_plan`` (a DeepSpeed launch) a DeepSpeed engine trains it; any other is prepared by accelerate
    (DDP over several processes).
    """

    def __init__(
        self,
        model,
        tokenizer,
        examples: list[Example],
        task_names: list[str],
        run: RunConfig,
        work_dir: Path,
        accelerator: Accelerator,
        desc: str = "train",
        validator: Validator | None = None,
        zero_plan: zero.ZeroPlan | None = None,
    ) -> None:
        self.run_config, self.accelerator, self.desc, self.validator = run, accelerator, desc, validator
        task_index = {name: i for i, name in enumerate(task_names)}
        self.encoded = [
            encode_example(ex, tokenizer, task_index[ex.task], run.max_length, run.train_on_prompt)
            for ex in examples
        ]
        self.lengths = [len(item.input_ids) for item in self.encoded]
        self.steps_per_epoch, self.total_steps = plan_steps(len(self.encoded), run, accelerator.num_processes)
        self.sharded = is_sharded(model)  # FSDP2 (``comoe.training.sharding.shard_model``)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=run.learning_rate, weight_decay=run.weight_decay)
        self.scheduler = make_scheduler(
            run.scheduler, optimizer, math.ceil(run.warmup_ratio * self.total_steps), self.total_steps
        )
        self.engine = None  # DeepSpeed's, under ZeRO; the scheduler moves the AdamW that it steps
        if zero_plan is not None:
            numel = sum(p.numel() for p in self.params)
            config = zero.deepspeed_config(
                zero_plan, run.batch_size, run.grad_accum, run.max_grad_norm, numel
            )
            self.engine = zero.initialize(model, optimizer, config)
            self.model, self.optimizer = self.engine, optimizer
        elif self.sharded:  # not handed to accelerate, which would wrap it again
            self.model, self.optimizer = model, optimizer
        else:
            self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.core = accelerator.unwrap_model(self.model)
        self.health = RoutingHealth(self.core)
        self.pad_id = pad_token_id(tokenizer)
        self.trim = accepts_logits_to_keep(self.core)  # run the output head only where labels are predicted
        self.checkpoint_dir = work_dir / CHECKPOINTS_DIR
        self.log_path = work_dir / TRAIN_LOG_NAME
        self.start_step, self.earlier_seconds = 0, 0.0
        self.threads = CpuThreads(run.cpu_threads) if accelerator.device.type == "cpu" else None

    def resume(self) -> None:
        """Continue from the newest checkpoint, if there is one; the log loses the steps after it."""
        found = list_checkpoints(self.checkpoint_dir)
        if found:
            rank = self.accelerator.process_index
            progress = load_checkpoint(
                found[-1], self.core, self.optimizer, self.scheduler, rank, self.sharded, self.engine
            )
            self.start_step, self.earlier_seconds = progress["step"], progress.get("elapsed_s", 0.0)
            self.accelerator.print(f"resumed from {found[-1]} at step {self.start_step}/{self.total_steps}")

    def run(self) -> TrainResult:
        """Train from ``start_step`` to the end; logs every step, checkpoints every ``save_steps``."""
        run, accelerator = self.run_config, self.accelerator
        if accelerator.is_main_process:  # the steps logged after the last checkpoint are redone
            truncate_train_log(self.log_path, self.start_step)
            remove_stale_writes(self.checkpoint_dir)  # what a process killed inside a checkpoint write left
        self.model.train()
        if self.threads is not None:
            self.threads.settle()
        recent: list[dict[str, float]] = []
        began = time.time() - self.earlier_seconds
        bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            desc=self.desc,
            disable=not accelerator.is_main_process,
            dynamic_ncols=True,
        )
        cached_epoch, batches = -1, []
        for step in range(self.start_step, self.total_steps):
            epoch, slot = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                batches = epoch_batches(
                    self.lengths,
                    run.batch_size,
                    run.seed,
                    epoch,
                    accelerator.process_index,
                    accelerator.num_processes,
                )
                cached_epoch = epoch
            micro_batches = batches[slot * run.grad_accum : (slot + 1) * run.grad_accum]
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler then moves on)
            watch = self.health and run.routing_health_steps and (step + 1) % run.routing_health_steps == 0
            with self.health.watching() if watch else nullcontext():
                parts = self.step([[self.encoded[i] for i in b] for b in micro_batches])
            health = self.health.read() if watch else {}
            parts.update(step=step + 1, epoch=epoch, lr=lr, elapsed_s=round(time.time() - began, 2))
            if self.threads is not None:
                parts["threads"] = self.threads.adjust()  # the count the next step runs with
            if self.validator is not None and self.validator.due(step + 1, self.total_steps):
                if accelerator.is_main_process or self.partitioned:  # a sharded forward needs them all
                    parts.update(self.validator(self.core, accelerator))
                accelerator.wait_for_everyone()
            if health:
                parts.update(health_summary(health))
            self._check_finite(parts, step)
            recent = (recent + [parts])[-10:]
            bar.update(1)
            bar.set_postfix(
                {k: f"{parts[k]:.3f}" for k in ("loss", "task", "contrastive", "balance") if k in parts}
            )
            if accelerator.is_main_process:
                with open(self.log_path, "a") as fh:
                    fh.write(json.dumps(parts) + "\n")
            if run.report_to != "none":
                tracked = {k: v for k, v in parts.items() if k not in ("step", "epoch")} | health
                accelerator.log({f"{self.desc}/{k}": v for k, v in tracked.items()}, step=step + 1)
            if (step + 1) % run.save_steps == 0 and step + 1 < self.total_steps:
                self.checkpoint(step + 1, epoch, parts["elapsed_s"])
        bar.close()
        accelerator.wait_for_everyone()
        main_log = accelerator.is_main_process and self.log_path.is_file()
        logged = read_train_log(self.log_path) if main_log else []
        recent = logged[-10:] or recent  # across a resume, not only the steps of this process
        final = {
            k: sum(p[k] for p in recent) / len(recent)
            for k in ("loss", "task", "contrastive", "balance")
            if recent and k in recent[0]
        }
        return TrainResult(
            self.total_steps,
            time.time() - began,
            final,
            accelerator.num_processes,
            self.partitioned or replicas_identical(self.params, accelerator),  # one copy of each tensor
            resumed_at_step=self.start_step,
            seconds_before_resume=self.earlier_seconds,
            validation=validation_history(logged),
            sharding=self.sharding,
        )

    def step(self, micro_batches: list[list[EncodedExample]]) -> dict[str, float]:
        """One optimiser step over ``micro_batches``; returns this process's token-weighted loss parts and
        the gradient's norm (before clipping)."""
        parts = self.accumulate(micro_batches)
        if self.engine is not None:  # the engine stepped and clipped at the last micro-batch
            parts["grad_norm"] = zero.grad_norm(self.engine)
            if not math.isfinite(parts["grad_norm"]):
                raise TrainingDiverged(
                    f"{self.desc}: the gradient's norm is {parts['grad_norm']} (DeepSpeed skipped the step); "
                    "no adapter was saved. Check the model and the data, or start a new run with a lower "
                    "--learning-rate"
                )
            self.scheduler.step()
            return parts
        limit = self.run_config.max_grad_norm  # the norm before clipping is logged either way
        limit = math.inf if limit is None else limit
        clip = clip_grad_norm if self.sharded else self.accelerator.clip_grad_norm_
        parts["grad_norm"] = float(clip(self.params, limit))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return parts

    def accumulate(self, micro_batches: list[list[EncodedExample]]) -> dict[str, float]:
        """Forward and backward over ``micro_batches``, leaving the step's gradient in ``.grad``: that of
        one batch holding them all (see the module docstring). Under ZeRO the engine keeps the gradient in
        its partitions and steps the optimiser after the last micro-batch."""
        accelerator = self.accelerator
        batches = [
            {k: v.to(accelerator.device) for k, v in collate(micro, self.pad_id).items()}
            for micro in micro_batches
        ]
        local = torch.tensor(
            [[label_tokens(b["labels"]), b["attention_mask"].sum().item()] for b in batches],
            dtype=torch.float64,
        )
        step_tokens = local.sum(0)
        if accelerator.num_processes > 1:  # DDP, FSDP and ZeRO average gradients: normalise by all tokens
            step_tokens = (
                accelerator.reduce(step_tokens.to(accelerator.device), "sum").cpu()
                / accelerator.num_processes
            )
        label_total, real_total = (max(float(x), 1.0) for x in step_tokens)
        sums: dict[str, float] = {}
        for i, batch in enumerate(batches):
            if not isinstance(self.core, CoMoEModel):
                batch.pop("task_ids")  # PEFT/plain models do not take it
            context = self._sync(i == len(batches) - 1)
            with context, accelerator.autocast():
                task_sum, out = causal_lm_loss(self.model, batch, self.trim, reduction="sum")
                aux = self._aux_loss(out)
                real_share = local[i, 1].item() / real_total
                loss = task_sum / label_total + (aux * real_share if aux is not None else 0.0)
                self._backward(loss)
            if self.engine is not None:
                self.engine.step()  # steps the optimiser at the step's last micro-batch only
            _add_parts(sums, task_sum, out, local[i, 1].item())
        return _mean_parts(sums, local.sum(0))

    @property
    def sharding(self) -> str:
        """How the adapter is split over the processes: "fsdp2", "zero1" to "zero3", or "" (not at all)."""
        if self.engine is not None:
            return f"zero{self.engine.zero_optimization_stage()}"
        return "fsdp2" if self.sharded else ""

    @property
    def partitioned(self) -> bool:
        """Whether the adapter is split over the processes (FSDP2, ZeRO-3; ZeRO-1/2 split its optimizer
        state): its whole state is gathered to save it, and every process runs each forward."""
        return bool(self.sharding)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.engine is None:
            self.accelerator.backward(loss)
            return
        self.engine.backward(loss, scale_wrt_gas=False)  # ``loss`` is already the step's share

    def _sync(self, last: bool):
        """Reduce the gradients at the step's last micro-batch only (the engine knows its own)."""
        if self.engine is not None:
            return nullcontext()
        if self.sharded:
            return gradient_sync(self.model, last)
        return nullcontext() if last else self.accelerator.no_sync(self.model)

    def checkpoint(self, step: int, epoch: int, elapsed_s: float) -> None:
        """Every process takes part (the state is gathered whole); the main process writes it."""
        self.accelerator.wait_for_everyone()
        state = training_state(self.core, self.optimizer, self.sharded, self.engine)
        if self.accelerator.is_main_process:
            progress = {"epoch": epoch, "elapsed_s": elapsed_s}
            save_checkpoint(
                self.checkpoint_dir, step, self.core, self.optimizer, self.scheduler, progress, state=state
            )

    def _aux_loss(self, out) -> torch.Tensor | None:
        aux = out.get("aux_loss")  # an output field: it survives mixed precision, DDP and compile
        cfg = self.core.comoe_config if isinstance(self.core, CoMoEModel) else None
        if aux is None and cfg is not None and (cfg.contrastive_weight > 0 or cfg.balance_weight > 0):
            raise TrainingDiverged(
                "the model output lost its aux_loss field (a wrapper rebuilt it without its "
                "mapping fields): the auxiliary losses would be dropped, so training stops"
            )
        return aux

    def _check_finite(self, parts: dict[str, float], step: int) -> None:
        if not math.isfinite(parts["loss"]):
            shown = ", ".join(f"{k} {parts[k]:.4g}" for k in ("task", "contrastive", "balance") if k in parts)
            raise TrainingDiverged(
                f"{self.desc}: the loss is {parts['loss']} at step {step + 1} ({shown}); no adapter was saved. "
                f"Check the model and the data, or start a new run (another --output-dir) with a lower --learning-rate"
            )


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
    validation: dict[str, list[Example]] | None = None,
    zero_plan: zero.ZeroPlan | None = None,
) -> TrainResult:
    """Train the adapter of ``model`` (already wrapped) on ``examples``; checkpoints under ``work_dir``.
    With ``validation`` (task -> held-out examples), scores them every ``run.eval_steps`` steps; with
    ``zero_plan``, a DeepSpeed engine trains it."""
    validator = Validator(validation, tokenizer, task_names, run) if validation and run.eval_steps else None
    recipe = TrainingRecipe(
        model, tokenizer, examples, task_names, run, work_dir, accelerator, desc, validator, zero_plan
    )
    if resume:
        recipe.resume()
    with compile_layers(recipe.core) if run.compile else nullcontext():  # eager again for the evaluation
        return recipe.run()


def _add_parts(sums: dict[str, float], task_sum: torch.Tensor, out, real_tokens: float) -> None:
    """Accumulate the step's loss parts: task as a sum over label tokens, aux parts weighted by real tokens."""
    sums["task"] = sums.get("task", 0.0) + task_sum.item()
    for name, key in (("aux_loss", "aux"), ("contrastive_loss", "contrastive"), ("balance_loss", "balance")):
        if out.get(name) is not None:
            sums[key] = sums.get(key, 0.0) + out[name].item() * real_tokens


def _mean_parts(sums: dict[str, float], tokens: torch.Tensor) -> dict[str, float]:
    """Token-weighted means of the step's loss parts; ``loss`` is what the step optimised."""
    labels, real = max(float(tokens[0]), 1.0), max(float(tokens[1]), 1.0)
    parts = {"task": sums["task"] / labels}
    parts.update({key: sums[key] / real for key in ("contrastive", "balance") if key in sums})
    parts["loss"] = parts["task"] + sums.get("aux", 0.0) / real
    return {"loss": parts.pop("loss"), **parts}


def replicas_identical(params: list[torch.Tensor], accelerator: Accelerator) -> bool:
    """Whether all processes hold bit-identical trainable weights (always true for one process)."""
    if accelerator.num_processes == 1:
        return True
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    gathered = accelerator.gather(flat[None]).cpu()
    return bool((gathered == gathered[0]).all())


# names this module held before comoe 0.2 (see comoe.utils.deprecation)
__getattr__ = moved_names(__name__, {"make_accelerator": "comoe.training.tracking:make_accelerator"})
