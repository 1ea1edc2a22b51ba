"""No test draws from an unseeded global random state.

A draw from torch's, numpy's or Python's global generator depends on every draw made before it in the process, so a
test's inputs (and whether a tolerance holds for them) would depend on which tests ran first. Every random input in
the tests comes from an explicit generator (``torch.Generator().manual_seed(s)``, ``np.random.default_rng(s)``,
``random.Random(s)``). Seeding the global generator with ``torch.manual_seed`` is allowed (modules initialise their
parameters from it), drawing from it explicitly is not. A test whose subject is the global state itself marks the
line with ``# global-rng: <why>``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
BENCHMARKS = TESTS.parent / "benchmarks"

#: torch functions that draw, and the tensor methods / ``nn.init`` functions that fill in place
TORCH_DRAWS = {
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
    "multinomial", "poisson",
}  # fmt: skip
INPLACE_DRAWS = {
    "uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "cauchy_", "log_normal_",
    "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_",
    "sparse_",
}  # fmt: skip
#: numpy.random names that are explicit generators, not draws from the legacy global state
NUMPY_GENERATORS = {"default_rng", "Generator", "SeedSequence", "PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937"}
#: the stdlib ``random`` module's functions that use its hidden global instance
STDLIB_DRAWS = {
    "random", "randint", "randrange", "choice", "choices", "shuffle", "sample", "uniform", "gauss", "normalvariate",
    "betavariate", "expovariate", "triangular", "getrandbits", "randbytes", "lognormvariate", "vonmisesvariate",
}  # fmt: skip
MARK = "# global-rng:"


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def global_draws(source: str) -> list[tuple[int, str]]:
    """(line, call) of every draw from a global generator in ``source``, marked lines excepted."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        has_generator = any(k.arg == "generator" for k in node.keywords)
        parts = name.split(".")
        bad = (
            (len(parts) == 2 and parts[0] == "torch" and parts[1] in TORCH_DRAWS and not has_generator)
            or (parts[-1] in INPLACE_DRAWS and not has_generator)
            or (len(parts) == 3 and parts[:2] in (["np", "random"], ["numpy", "random"])
                and parts[2] not in NUMPY_GENERATORS)
            or (len(parts) == 2 and parts[0] == "random" and parts[1] in STDLIB_DRAWS)
        )  # fmt: skip
        if bad and MARK not in lines[node.lineno - 1]:
            found.append((node.lineno, name))
    return sorted(found)


def test_the_checker_finds_global_draws_and_accepts_explicit_generators() -> None:
    source = "\n".join(
        [
            "import random, numpy as np, torch",
            "a = torch.randn(3)",  # 2: global
            "b = torch.randn(3, generator=g)",
            "c = np.random.rand(2)",  # 4: legacy global
            "d = np.random.default_rng(0).random(2)",
            "e = random.choice([1, 2])",  # 6: stdlib global
            "f = random.Random(0).choice([1, 2])",
            "torch.nn.init.normal_(w)",  # 8: in place, global
            "w.uniform_(generator=g)",
            "x = torch.rand(1)  # global-rng: the subject of this test",
            "torch.manual_seed(0)",
        ]
    )
    assert global_draws(source) == [(2, "torch.randn"), (4, "np.random.rand"), (6, "random.choice"),
                                    (8, "torch.nn.init.normal_")]  # fmt: skip


@pytest.mark.parametrize(
    "path", sorted([*TESTS.glob("*.py"), *BENCHMARKS.glob("*.py")]), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_no_draw_from_a_global_generator(path: Path) -> None:
    draws = global_draws(path.read_text())
    assert not draws, f"{path.name}: draws from a global generator at " + ", ".join(f"line {n} ({c})" for n, c in draws)


def test_every_numerical_file_exists() -> None:
    from conftest import NUMERICAL

    missing = [name for name in NUMERICAL if not (TESTS / name).is_file()]
    assert not missing, f"conftest.NUMERICAL names files that do not exist: {missing}"
