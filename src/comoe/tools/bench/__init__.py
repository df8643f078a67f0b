"""`comoe bench`: speed and memory of CoMoE against its baselines, as ratios measured inside one process.

Every number that matters is a ratio between variants measured in the same process, on the same inputs,
from the same seed, with the variants run round-robin (one training step of each per round, the order
rotated every round) so that drift of a shared or throttled machine hits all of them alike. Times are
medians over the timed rounds after warm-up; ratios are medians of the per-round ratios.

Variants (``VARIANTS``):

- ``base``           the frozen base model, forward + backward to its inputs (``inputs_embeds``);
- ``lora``           PEFT LoRA, same rank, modules, alpha and dropout;
- ``naive``          a per-expert-loop MoE-LoRA as MoE-PEFT/MixLoRA and MoLA write it: a ModuleList of
                     experts and a Python loop over experts gathering each one's tokens (``NaiveMoELoRALinear``);
- ``ours-dense``     CoMoE layer, dense-codes path, no auxiliary loss;
- ``ours-grouped``   CoMoE layer, sorted-tokens ``grouped_mm`` path, no auxiliary loss;
- ``ours-con-gram``  + the contrastive loss in Gram form (λ = 0.01), path ``--con-path``;
- ``ours-con-mat``   + the contrastive loss on materialised expert outputs (the paper's way);
- ``lora-dora``, ``ours-dora``, ``ours-dora-con``: PEFT's DoRA, DoRA experts, DoRA experts + contrastive;
- ``ours-ffn``, ``ours-ffn-con``: whole-FFN experts on each MLP block (placement='ffn', MixLoRA's layout;
                     plain LoRA on the target linears outside the blocks), without and with the contrastive
                     loss. Compare them to ``lora`` and ``ours-dense`` with ``--target-modules
                     gate_proj,up_proj,down_proj``: the same projections adapted.

Figures: training-step time and tokens/s as ratios to the frozen base and to LoRA; activation memory
(bytes of the unique storages autograd saves for backward, parameters excluded, via
``torch.autograd.graph.saved_tensors_hooks``; peak allocated memory on CUDA); host synchronisations per step
on CUDA; ``generate`` tokens/s; a ``torch.compile`` check against eager.

Command line (``comoe bench ...`` or ``python -m comoe bench ...``)::

    comoe bench --size tiny --compile-check --out benchmarks/results
    comoe bench --size wide --experts 4,8,16 --variants ours-dense,ours-con-gram,ours-con-mat --name wide-experts
    comoe bench --render --out benchmarks/results --markdown BENCHMARKS.md

Modules: ``sizes`` (model and batch presets), ``naive`` (the per-expert-loop baseline), ``variants``,
``measure`` (one step, memory, host syncs, generation, parity), ``compile_check``, ``case`` (one (E, r)
point, every variant round-robin), ``thresholds`` (the targets and judging a result against them), ``run``
(``BenchOptions`` and the whole run), ``results_files`` (reading and writing the JSON); the Markdown:
``cells`` (table cells), ``run_page`` (one result), ``summary_table``, ``peers_page`` and ``render``
(BENCHMARKS.md from them all). The flags are in ``comoe.cli.bench``;
``run_benchmark(BenchOptions(...))`` returns the plain dict that is written as JSON.
"""
