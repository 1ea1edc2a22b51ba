"""What every test shares."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

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


@pytest.fixture
def replay_space() -> Callable[..., Path]:
    """Writes a 3-domain space scored by the ``replay`` backend from ``recorded`` (domains a, b, c; benchmarks b1,
    b2), with a manifest of empty expert folders (replay needs no weights); returns the space file."""

    def write(
        root: Path, recorded: Path, sampler: str = "random", n_trials: int = 12, file: str = "space.yaml"
    ) -> Path:
        for d in ("base", "ea", "eb", "ec"):
            (root / "models" / d).mkdir(parents=True, exist_ok=True)
        (root / "experts.yaml").write_text(
            "name: fake\nbase: ./models/base\nexperts: {a: ./models/ea, b: ./models/eb, c: ./models/ec}\n"
        )
        path = root / file
        path.write_text(
            textwrap.dedent(f"""\
            name: rp
            domains: [a, b, c]
            experts: experts.yaml
            mixtures: {{lattice: {{resolution: 4}}}}
            benchmarks: [b1, b2]
            sampler: {{name: {sampler}, n_trials: {n_trials}, seed: 0}}
            scoring: {{backend: replay, table: {recorded}, nearest: true}}
            """)
        )
        return path

    return write
