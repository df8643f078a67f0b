"""Routing records: what each adapted module did, accumulated cheaply while recording is on.

Counts stay on the device as tensors (no host sync per forward); ``summary()`` moves them to Python.
Besides the per-task expert counts a record keeps per-task counts of the chosen expert *set* (the top-k
combination), because with k > 1 a task can own a combination of experts without owning any single
expert; :mod:`comoe.analysis.metrics` computes its mutual-information numbers from both.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from comoe.losses import ContrastiveOutput
from comoe.trace import LayerTrace

MAX_COMBINATION_EXPERTS = 16  # combinations are indexed through a 2**E lookup table
MAX_COMBINATIONS = 4096


@dataclass
class ModuleRecord:
    """Accumulated routing statistics of one adapted module."""

    num_experts: int
    num_tasks: int
    counts: Tensor  # (num_tasks, E): top-k assignments (gate mass under soft routing) per task
    tokens: Tensor  # (num_tasks,): tokens seen per task
    entropy_sum: Tensor  # scalar: Σ over tokens of the router's entropy (nats)
    contrastive_sum: Tensor  # scalar: Σ over forwards of the contrastive loss × that forward's tokens
    pos_cos_sum: Tensor  # scalar: Σ over forwards of the mean positive cosine × tokens
    neg_cos_sum: Tensor
    contrastive_calls: int = 0
    contrastive_tokens: Tensor | None = None  # scalar: Σ of the token weights above
    top_k: int = 0  # 0 under soft routing
    combinations: list[tuple[int, ...]] | None = None  # the possible top-k sets, when few enough
    combination_counts: Tensor | None = None  # (num_tasks, C): tokens per task and chosen set
    combination_lookup: Tensor | None = None  # (2**E,) bitmask of a set -> its index in ``combinations``
    sampled_outputs: list[Tensor] = field(default_factory=list)  # (n, E, D) expert outputs, CPU
    sampled_tasks: list[Tensor] = field(default_factory=list)  # (n,) task id per sampled token
    sampled_experts: list[Tensor] = field(default_factory=list)  # (n, k) chosen experts per sampled token

    @property
    def sampled(self) -> int:
        return sum(t.shape[0] for t in self.sampled_outputs)

    def outputs(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """All sampled (outputs (n, E, D), tasks (n,), chosen experts (n, k)), or None if nothing was sampled."""
        if not self.sampled_outputs:
            return None
        return torch.cat(self.sampled_outputs), torch.cat(self.sampled_tasks), torch.cat(self.sampled_experts)


def _combination_table(
    num_experts: int, top_k: int, device: torch.device, sizes_vary: bool = False
) -> tuple[list, Tensor] | None:
    """The expert sets a token can choose (of size k, or 1..k where ``sizes_vary``) and a bitmask -> index
    lookup; None when there are too many to count densely."""
    sizes = range(1, top_k + 1) if sizes_vary else [top_k]
    if (
        num_experts > MAX_COMBINATION_EXPERTS
        or sum(math.comb(num_experts, k) for k in sizes) > MAX_COMBINATIONS
    ):
        return None
    combos = [combo for k in sizes for combo in itertools.combinations(range(num_experts), k)]
    lookup = torch.full((2**num_experts,), -1, dtype=torch.long)
    for index, combo in enumerate(combos):
        lookup[sum(1 << e for e in combo)] = index
    return combos, lookup.to(device)


class RoutingRecorder:
    """Collects per-module routing statistics; pass to ``CoMoEModel.recording(...)``.

    ``num_tasks``: size of the task-id space given through ``task_ids``; tokens without a task id count
    as task 0. ``sample_outputs``: per module, keep up to this many tokens' expert outputs (N, E, D) on
    the CPU for redundancy metrics and 2-D projections (0 = none). ``sample_modules``: only these modules
    sample (None = all). ``sample_limits``: per-module sample sizes that override both. ``spread_over``:
    the number of forwards the samples should spread over; each forward then gives a module at most
    ceil(limit / spread_over) tokens, drawn at random among its real tokens (None: the first tokens until
    the limit), so that a small sample covers a whole pass instead of its first batch.
    ``contrastive``: also compute the contrastive loss in evaluation mode.
    """

    def __init__(
        self,
        num_tasks: int = 1,
        sample_outputs: int = 0,
        contrastive: bool = True,
        sample_modules: set[str] | None = None,
        sample_limits: dict[str, int] | None = None,
        spread_over: int | None = None,
        seed: int = 0,
    ):
        self.num_tasks = num_tasks
        self.sample_outputs = sample_outputs
        self.sample_modules = sample_modules
        self.sample_limits = dict(sample_limits or {})
        self.spread_over = spread_over
        self.contrastive = contrastive
        self.records: dict[str, ModuleRecord] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def _record_for(
        self, name: str, num_experts: int, top_k: int, device: torch.device, sizes_vary: bool = False
    ) -> ModuleRecord:
        rec = self.records.get(name)
        if rec is None:
            zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=torch.float64)  # noqa: E731
            rec = ModuleRecord(
                num_experts,
                self.num_tasks,
                zeros(self.num_tasks, num_experts),
                zeros(self.num_tasks),
                zeros(()),
                zeros(()),
                zeros(()),
                zeros(()),
                contrastive_tokens=zeros(()),
                top_k=top_k,
            )
            table = _combination_table(num_experts, top_k, device, sizes_vary) if top_k else None
            if table is not None:
                rec.combinations, rec.combination_lookup = table
                rec.combination_counts = zeros(self.num_tasks, len(rec.combinations))
            self.records[name] = rec
        return rec

    @torch.no_grad()
    def observe(
        self,
        trace: LayerTrace,
        token_mask: Tensor | None,
        task_ids: Tensor | None,
        contrastive: ContrastiveOutput | None,
    ) -> None:
        """Count one layer call from its trace (its routing, and the expert outputs it sampled if any)."""
        routing = trace.routing
        probs, selected = routing.probs.detach(), routing.selected
        n_tokens, n_exp = probs.shape
        top_k = 0 if selected is None else selected.shape[1]
        rec = self._record_for(trace.name, n_exp, top_k, probs.device, routing.slot_mask is not None)
        keep = (
            token_mask
            if token_mask is not None
            else torch.ones(n_tokens, dtype=torch.bool, device=probs.device)
        )
        tasks = (
            task_ids
            if task_ids is not None and task_ids.numel() == n_tokens
            else torch.zeros_like(keep, dtype=torch.long)
        )
        tasks = tasks.clamp(0, self.num_tasks - 1)
        weight = keep.to(torch.float64)
        share = probs.double() if selected is None else routing.active(n_exp).double()
        rec.counts.index_add_(0, tasks, share * weight[:, None])
        rec.tokens.index_add_(0, tasks, weight)
        if rec.combination_counts is not None:
            self._count_combinations(rec, selected, routing.slot_mask, tasks, weight)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).double()
        rec.entropy_sum += (entropy * weight).sum()
        if contrastive is not None:
            real = weight.sum()
            rec.contrastive_sum += contrastive.loss.detach().double() * real
            rec.pos_cos_sum += contrastive.pos_cos.double() * real
            rec.neg_cos_sum += contrastive.neg_cos.double() * real
            rec.contrastive_tokens += real
            rec.contrastive_calls += 1
        if trace.samples is not None:
            self._sample(rec, trace, tasks)

    @staticmethod
    def _count_combinations(
        rec: ModuleRecord, selected: Tensor, slot_mask: Tensor | None, tasks: Tensor, weight: Tensor
    ) -> None:
        bits = torch.ones_like(selected) << selected
        if slot_mask is not None:
            bits = bits * slot_mask
        combo = rec.combination_lookup[bits.sum(-1)]  # distinct experts: the sum is the set's bitmask
        n_combos = rec.combination_counts.shape[1]
        rec.combination_counts.view(-1).index_add_(0, tasks * n_combos + combo, weight)

    def sample_tokens(self, module_name: str, token_mask: Tensor | None, n_tokens: int) -> Tensor | None:
        """The tokens of this call whose expert outputs the module should form for the record (asked by the
        layer in its forward, so that it forms them for these tokens only), or None."""
        limit = self.sample_limit(module_name)
        rec = self.records.get(module_name)
        room = limit - (rec.sampled if rec is not None else 0)
        if room <= 0:
            return None
        real = token_mask.nonzero().squeeze(1) if token_mask is not None else torch.arange(n_tokens)
        per_call = math.ceil(limit / self.spread_over) if self.spread_over else None
        if per_call is not None and real.numel() > per_call:
            pick = torch.randperm(real.numel(), generator=self._generator)[:per_call]
            real = real[pick.sort().values.to(real.device)]
        idx = real[:room]
        return idx if idx.numel() else None

    def _sample(self, rec: ModuleRecord, trace: LayerTrace, tasks: Tensor) -> None:
        idx, outputs = trace.samples
        routing = trace.routing
        if routing.selected is None:
            chosen = routing.probs.argmax(-1, keepdim=True)
        elif routing.slot_mask is None:
            chosen = routing.selected
        else:  # slots that hold no selected expert repeat the first, which always does
            chosen = torch.where(routing.slot_mask, routing.selected, routing.selected[:, :1])
        idx = idx.to(tasks.device)
        rec.sampled_outputs.append(outputs.float().cpu())
        rec.sampled_tasks.append(tasks[idx].cpu())
        rec.sampled_experts.append(chosen[idx].cpu())

    def sample_limit(self, module_name: str) -> int:
        """How many tokens' expert outputs this module keeps."""
        if module_name in self.sample_limits:
            return self.sample_limits[module_name]
        if self.sample_modules is not None and module_name not in self.sample_modules:
            return 0
        return self.sample_outputs

    def wants_codes(self, module_name: str) -> bool:
        """Whether the layer should keep what its expert outputs are computed from (its codes, which the
        grouped path otherwise skips) for output sampling."""
        limit = self.sample_limit(module_name)
        if limit <= 0:
            return False
        rec = self.records.get(module_name)
        return rec is None or rec.sampled < limit

    def summary(self) -> dict[str, dict]:
        """Plain-Python per-module statistics: counts per task, load, mean entropy, contrastive means.

        The contrastive numbers are token-weighted means over the recorded forwards.
        """
        out = {}
        for name, rec in self.records.items():
            tokens = rec.tokens.sum().item()
            con_tokens = rec.contrastive_tokens.item() if rec.contrastive_calls else 0.0
            out[name] = {
                "counts": rec.counts.tolist(),
                "tokens_per_task": rec.tokens.tolist(),
                "load": (rec.counts.sum(0) / max(rec.counts.sum().item(), 1e-12)).tolist(),
                "gate_entropy": rec.entropy_sum.item() / max(tokens, 1.0),
                "contrastive_loss": _ratio(rec.contrastive_sum, con_tokens),
                "pos_cos": _ratio(rec.pos_cos_sum, con_tokens),
                "neg_cos": _ratio(rec.neg_cos_sum, con_tokens),
                "top_k": rec.top_k,
                "combinations": [list(c) for c in rec.combinations] if rec.combinations is not None else None,
                "combination_counts": rec.combination_counts.tolist()
                if rec.combination_counts is not None
                else None,
            }
        return out


def _ratio(total: Tensor, weight: float) -> float | None:
    return total.item() / weight if weight > 0 else None
