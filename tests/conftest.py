"""What every test shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _grad_mode_left_as_found() -> Iterator[None]:
    """A test (or the code it runs) that leaves autograd switched off breaks every later test that trains or uses a
    sampler built on autograd (Optuna's GP), far from the cause: fail the test that did it instead."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left torch's grad mode off (a no_grad/inference_mode entered and never left)")
