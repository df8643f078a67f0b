"""Shared fixtures: deterministic seeds, one torch thread on request, a tiny model directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (router init, dropout, random anchors)."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """One intra-op thread: tiny-model tests spend their time in thread hand-offs otherwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama saved with SmolLM2's tokenizer, loadable by path (`--model DIR`) like any HF model."""
    from tests.tiny_models import save_tiny_llama_with_real_tokenizer

    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama_with_real_tokenizer(directory)
    return directory
