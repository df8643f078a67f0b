"""Running a trained adapter over test sets with routing records on."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from comoe.analysis.options import AnalyzeOptions
from comoe.records import RoutingRecorder
from comoe.utils.modeling import accepts_logits_to_keep, model_device, pad_token_id


def _encoded_batches(test: dict, tasks: list[str], tokenizer, max_length: int, batch_size: int) -> list[list]:
    """Test examples encoded as in training, sorted by length (less padding) and cut into batches."""
    from comoe.data.batching import encode_example

    encoded = [
        encode_example(ex, tokenizer, task_id, max_length)
        for task_id, task in enumerate(tasks)
        for ex in test[task]
    ]
    encoded.sort(key=lambda item: -len(item.input_ids))
    return [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]


def record_routing(
    model,
    tokenizer,
    test: dict,
    tasks: list[str],
    options: AnalyzeOptions,
    max_length: int,
    projection_module: str | None,
    desc: str = "analyze",
) -> RoutingRecorder:
    """One pass over the test sets with routing records on; returns the filled recorder."""
    from comoe.data.batching import collate

    batches = _encoded_batches(test, tasks, tokenizer, max_length, options.batch_size)
    limits = (
        {projection_module: max(options.projection_samples, options.samples)} if projection_module else {}
    )
    recorder = RoutingRecorder(
        num_tasks=len(tasks),
        sample_outputs=options.samples,
        contrastive=True,
        sample_limits=limits,
        spread_over=len(batches),
        seed=options.seed,
    )
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # no vocabulary-sized logits
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    torch.manual_seed(options.seed)  # the contrastive loss draws random anchors
    model.eval()
    with torch.no_grad(), model.recording(recorder):
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not options.progress):
            tensors = collate(batch, pad)
            model(
                input_ids=tensors["input_ids"].to(device),
                attention_mask=tensors["attention_mask"].to(device),
                task_ids=tensors["task_ids"].to(device),
                **extra,
            )
    return recorder
