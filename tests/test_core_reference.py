"""Every adapter kind computes what comoe 0.1 computed: the same losses, logits and gradients on the same
inputs and seeds (``tests/core_reference.py`` wrote the reference with that version's code)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.core_reference import CASES, FIXTURE, run_case


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


@pytest.mark.parametrize("case", list(CASES))
def test_kind_computes_what_version_0_1_computed(case, reference, single_thread):
    expected = {key: value for key, value in reference.items() if key.startswith(f"{case}/")}
    actual = run_case(case)
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        # the Gram matrices are formed per module (not stacked) and always in Gram form: rounding only
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
