"""dmo's streaming merge against mergekit's output for the same configuration (mergekit is a test extra).

Small random Qwen2-shaped checkpoints (bf16 and fp32, several shapes) are merged by mergekit's Python API
(``run_merge``, what ``mergekit-yaml`` runs) and by :func:`dmo.merge.stream.merge_checkpoints`:

* ``linear`` (mergekit normalises by the weights' sum; the weights here sum to 1),
* ``task_arithmetic`` with a ``lambda`` (dmo: ``scale``),
* ``ties`` with a density, both consensus methods and ``normalize``,
* ``dare_linear`` / ``dare_ties`` with a *fixed* mask: mergekit's Bernoulli draw is replaced by dmo's seeded mask
  for the same parameter and expert, with mergekit's L1 rescaling (dmo ``rescale=l1``) or none.

mergekit computes in float32 (``dtype: float32``) and casts to the output dtype; results agree to float32 rounding
and, after a bf16 cast, to one bf16 step (dmo does not subtract the base when it is not needed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit")

from checkpoints import assert_same_model, load_model, make_set
from mergekit import sparsify as mk_sparsify
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge

from dmo.merge.dare import keep_mask
from dmo.merge.stream import MergeOptions as DmoOptions
from dmo.merge.stream import merge_checkpoints

WEIGHTS = {"e0": 0.5, "e1": 0.3, "e2": 0.2}
DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _no_ties_at_the_cut(base: Path, experts: dict[str, Path], density: float) -> bool:
    """mergekit keeps the top-k of an unstable argsort: only compare sets where the k-th magnitude is unique."""
    b = load_model(base)
    for folder in experts.values():
        x = load_model(folder)
        for k, v in b.items():
            mags = (x[k].float() - v.float()).abs().reshape(-1).sort(descending=True).values
            n = mags.numel()
            keep = max(1, int(density * n))
            if keep < n and mags[keep - 1] == mags[keep]:
                return False
    return True


def _set(tmp_path: Path, dtype: torch.dtype, density: float | None = None) -> tuple[Path, dict[str, Path]]:
    for seed in range(40):
        root = tmp_path / f"set{seed}"
        base, experts = make_set(root, dtype, n=3, shards=2, seed=seed)
        if density is None or _no_ties_at_the_cut(base, experts, density):
            return base, experts
    pytest.fail("no seed gives a set without ties at the trim threshold")


def _mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False)
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return load_model(out)


def _models(experts: dict[str, Path], **per_model: dict[str, float]) -> list[dict]:
    return [
        {"model": str(experts[e]), "parameters": {"weight": w, **{k: v[e] for k, v in per_model.items()}}}
        for e, w in WEIGHTS.items()
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_and_task_arithmetic_match_mergekit(tmp_path: Path, dtype: torch.dtype) -> None:
    base, experts = _set(tmp_path, dtype)
    name = DTYPES[dtype]
    theirs = _mergekit(
        {"merge_method": "linear", "models": _models(experts), "dtype": "float32", "out_dtype": name}, tmp_path / "mk"
    )
    merge_checkpoints(base, experts, WEIGHTS, tmp_path / "dmo", DmoOptions(exclude=[]))
    assert_same_model(load_model(tmp_path / "dmo"), theirs)
    theirs = _mergekit(
        {
            "merge_method": "task_arithmetic", "base_model": str(base), "models": _models(experts),
            "parameters": {"lambda": 0.8}, "dtype": "float32", "out_dtype": name,
        },
        tmp_path / "mk-ta",
    )  # fmt: skip
    merge_checkpoints(base, experts, WEIGHTS, tmp_path / "dmo-ta", DmoOptions(exclude=[], params={"scale": 0.8}))
    assert_same_model(load_model(tmp_path / "dmo-ta"), theirs)


def _stable_magnitude(tensor, density, rescale_norm=None):
    """mergekit's ``sparsify.magnitude`` with a stable argsort: among equal magnitudes the lowest index wins."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    topk = torch.argsort(tensor.abs().reshape(-1).float(), descending=True, stable=True)[:k]
    mask[topk] = 1
    return mk_sparsify.rescaled_masked_tensor(tensor, mask.reshape_as(tensor), rescale_norm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("consensus", "normalize"), [("sum", True), ("count", False)])
def test_ties_matches_mergekit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, consensus: str, normalize: bool
) -> None:
    density = 0.3
    if dtype == torch.float32:  # random float32 deltas have no equal magnitudes: mergekit's own selection
        base, experts = _set(tmp_path, dtype, density)
    else:  # bf16 deltas tie often; mergekit's unstable argsort then keeps an arbitrary one of the tied entries
        base, experts = _set(tmp_path, dtype)
        monkeypatch.setattr(mk_sparsify, "magnitude", _stable_magnitude)
    config = {
        "merge_method": "ties", "base_model": str(base),
        "models": _models(experts, density=dict.fromkeys(WEIGHTS, density)),
        "parameters": {"normalize": normalize, "lambda": 0.9},
        "dtype": "float32", "out_dtype": DTYPES[dtype],
    }  # fmt: skip
    theirs = _mergekit_with_consensus(config, tmp_path / "mk", consensus)
    params = {"density": density, "consensus": consensus, "normalize": normalize, "scale": 0.9}
    merge_checkpoints(base, experts, WEIGHTS, tmp_path / "dmo", DmoOptions(method="ties", params=params, exclude=[]))
    assert_same_model(load_model(tmp_path / "dmo"), theirs)


def _mergekit_with_consensus(config: dict, out: Path, consensus: str) -> dict[str, torch.Tensor]:
    """mergekit's TIES with a consensus method (its registry fixes 'sum' for ``ties``; 'count' is patched in)."""
    from mergekit.merge_methods import generalized_task_arithmetic as gta

    original = gta.get_mask

    def get_mask(delta, method="sum", mask_dtype=None):
        return original(delta, method=consensus, mask_dtype=mask_dtype)

    gta.get_mask = get_mask
    try:
        return _mergekit(config, out)
    finally:
        gta.get_mask = original


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("method", "rescale"), [("dare_linear", "l1"), ("dare_linear", "none"), ("dare_ties", "l1")])
def test_dare_with_a_fixed_mask_matches_mergekit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, method: str, rescale: str
) -> None:
    drop, seed = 0.4, 7
    base, experts = _set(tmp_path, dtype)
    b = load_model(base)
    xs = [load_model(experts[e]) for e in WEIGHTS]
    known = [(k, i, xs[i][k].float() - v.float()) for k, v in b.items() for i in range(len(xs))]

    def bernoulli(tensor, density, rescale_norm=None):  # mergekit's draw, replaced by dmo's mask for that tensor
        assert abs(density - (1 - drop)) < 1e-9
        matches = [(k, i) for k, i, d in known if d.shape == tensor.shape and torch.equal(d, tensor.float())]
        assert len(matches) == 1
        k, i = matches[0]
        mask = keep_mask(tensor.shape, drop, seed, k, i).to(tensor.dtype)
        return mk_sparsify.rescaled_masked_tensor(tensor, mask, rescale_norm)

    monkeypatch.setattr(mk_sparsify, "bernoulli", bernoulli)
    config = {
        "merge_method": method, "base_model": str(base),
        "models": _models(experts, density=dict.fromkeys(WEIGHTS, 1 - drop)),
        "parameters": {"rescale": rescale == "l1", "normalize": method == "dare_ties"},
        "dtype": "float32", "out_dtype": DTYPES[dtype],
    }  # fmt: skip
    theirs = _mergekit(config, tmp_path / "mk")
    ours = "dare" if method == "dare_linear" else "dare_ties"
    params = {"drop_rate": drop, "seed": seed, "rescale": rescale, "normalize": method == "dare_ties"}
    merge_checkpoints(base, experts, WEIGHTS, tmp_path / "dmo", DmoOptions(method=ours, params=params, exclude=[]))
    assert_same_model(load_model(tmp_path / "dmo"), theirs)
