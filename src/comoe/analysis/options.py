"""What `comoe analyze` does (``AnalyzeOptions``) and the torch threads it runs with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from comoe.utils.threads import CpuThreads
from comoe.utils.validation import check_field_types, doc

DEFAULT_TEST_PER_TASK = 32


@dataclass
class AnalyzeOptions:
    """What `comoe analyze` does; every field is a command-line flag (and a key of its ``--config`` file)."""

    test_per_task: int | None = field(
        default=DEFAULT_TEST_PER_TASK, metadata=doc("Test examples per task routed; none = all.")
    )
    batch_size: int = field(default=16, metadata=doc("Sequences per forward pass."))
    max_length: int | None = field(default=None, metadata=doc("Token limit per example; none = the run's."))
    samples: int = field(
        default=128, metadata=doc("Tokens per module whose expert outputs are kept (redundancy metrics).")
    )
    projection_samples: int = field(default=400, metadata=doc("Tokens kept for the 2-D projection."))
    layer: int | None = field(
        default=None, metadata=doc("Layer of the 2-D projection; none = the middle adapted layer.")
    )
    module: str | None = field(
        default=None,
        metadata=doc(
            "Module of the 2-D projection; none = q_proj, or the routed module of an FFN run (mlp)."
        ),
    )
    seed: int = field(default=0, metadata=doc("Seeds the token samples and t-SNE."))
    progress: bool = field(default=True, metadata=doc("Progress bars."))
    tsne: bool = field(default=True, metadata=doc("A t-SNE projection too, when scikit-learn is installed."))
    threads: int | None = field(
        default=None,
        metadata=doc("CPU threads for torch; none = one per core that other processes leave free."),
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("test_per_task", "batch_size", "samples", "projection_samples", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@contextmanager
def analysis_threads(requested: int | None) -> Iterator[int]:
    """Run the block with ``requested`` torch threads, or (None) one per core other processes leave free, as
    `comoe train` chooses them (``comoe.utils.threads``; unchanged on CUDA); yields the count."""
    previous = torch.get_num_threads()
    threads = previous if torch.cuda.is_available() else CpuThreads(requested).settle()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)
