"""The merge methods (TIES, DARE, DARE-TIES, RobustMerge) against naive references written here.

The references are deliberately plain (Python loops, sorting instead of selection); RobustMerge's is a
transcription of its official code (``load_and_merge_pretrained_model`` in the RobustMerge repository: kthvalue
masks, the sort-based ``clamp``, the fuse weight 2.0) so that the uniform case can be checked to be the same.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import naive_ties
from tolerance import assert_close_sum

from dmo.errors import DmoError
from dmo.merge import registry
from dmo.merge.dare import dare, dare_ties, keep_mask
from dmo.merge.robustmerge import robustmerge
from dmo.merge.ties import keep, ties, trim_rule

# ------------------------------------------------------------------------------------------------------- registry


def test_registry_lists_every_method_with_its_parameters() -> None:
    names = registry.method_names()
    assert {"linear", "task_arithmetic", "ties", "dare", "dare_ties", "robustmerge"} <= set(names)
    assert registry.get_method("ties").defaults == {
        "density": 0.2, "consensus": "sum", "normalize": True, "scale": 1.0, "weighted": True,
    }  # fmt: skip
    assert registry.get_method("dare").takes_name and not registry.get_method("ties").takes_name
    assert registry.get_method("robustmerge").inputs == "lora"
    assert registry.get_method("task_arithmetic").fn is registry.get_method("linear").fn
    with pytest.raises(DmoError, match="has no parameter 'k'; its parameters: density=0.2, consensus='sum'"):
        registry.get_method("ties").check_params({"k": 0.2})
    with pytest.raises(DmoError, match="merges LoRA factors"):
        registry.merge_deltas("robustmerge", [{"p": torch.ones(2)}], [1.0])


def test_linear_scale_and_merge_deltas_pass_the_parameter_name() -> None:
    g = torch.Generator().manual_seed(41)
    deltas = torch.randn(3, 4, 5, generator=g)
    w = torch.tensor([0.2, 0.3, 0.5])
    torch.testing.assert_close(registry.linear(deltas, w, scale=0.5), 0.5 * (w[:, None, None] * deltas).sum(0))
    tvs = [{"p": torch.randn(4, 5, generator=g), "q": torch.randn(3, generator=g)} for _ in range(2)]
    merged = registry.merge_deltas("dare", tvs, [0.5, 0.5], drop_rate=0.5, seed=1)
    for param in ("p", "q"):  # masks are drawn per parameter name, so the two parameters get different masks
        stacked = torch.stack([tv[param] for tv in tvs])
        torch.testing.assert_close(merged[param], dare(stacked, torch.tensor([0.5, 0.5]), 0.5, seed=1, name=param))


# ----------------------------------------------------------------------------------------------------------- TIES


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim of one whole tensor: the ``max(1, int(density * numel))`` largest ``|x|``."""
    mags = x.detach().abs().reshape(-1).to(torch.float32)
    threshold, cut = trim_rule(mags, density)
    return keep(mags, 0, threshold, cut).reshape(x.shape)


def test_magnitude_mask_keeps_exactly_k_and_breaks_ties_by_index() -> None:
    x = torch.tensor([[1.0, -3.0, 2.0], [-2.0, 2.0, 0.5]])
    assert magnitude_mask(x, 0.5).tolist() == [[False, True, True], [True, False, False]]
    g = torch.Generator().manual_seed(57)
    assert int(magnitude_mask(torch.randn(1000, generator=g), 0.2).sum()) == 200
    assert int(magnitude_mask(torch.randn(7, generator=g), 0.01).sum()) == 1  # at least one entry survives
    five = torch.randn(5, generator=g)
    assert bool(magnitude_mask(five, 1.0).all()) and not bool(magnitude_mask(five, 0.0).any())


@pytest.mark.parametrize("quantized", [False, True])
def test_the_sampled_threshold_is_exact_on_large_tensors(quantized: bool) -> None:
    from dmo.merge.ties import keep, kth_largest, trim_rule

    g = torch.Generator().manual_seed(0)
    mags = torch.randn(3_000_000, generator=g).abs()
    if quantized:  # many equal magnitudes, as in bf16 deltas
        mags = torch.round(mags * 64) / 64
    n = mags.numel()
    for k in (1, 7, n // 5, n // 2, n - 3, n):
        assert kth_largest(mags, k) == float(torch.kthvalue(mags, n - k + 1).values), k
    threshold, cut = trim_rule(mags, 0.2)
    whole = keep(mags, 0, threshold, cut)
    assert int(whole.sum()) == int(0.2 * n)
    chunks = torch.cat([keep(mags[lo : lo + 100_003], lo, threshold, cut) for lo in range(0, n, 100_003)])
    assert torch.equal(chunks, whole)
    ties = torch.nonzero((mags == threshold) & whole).reshape(-1)
    dropped = torch.nonzero((mags == threshold) & ~whole).reshape(-1)
    assert dropped.numel() == 0 or int(ties.max()) < int(dropped.min())  # the lowest indices win


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=st.sampled_from([(7,), (3, 5), (2, 3, 4)]),
    k=st.integers(1, 4),
    density=st.sampled_from([0.1, 0.3, 0.5, 1.0]),
    consensus=st.sampled_from(["sum", "count"]),
    normalize=st.booleans(),
    ties_in_values=st.booleans(),
)
def test_ties_equals_the_naive_reference(seed, shape, k, density, consensus, normalize, ties_in_values) -> None:
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(k, *shape, generator=g)
    if ties_in_values:  # few distinct magnitudes: the tie rule matters
        deltas = torch.round(deltas * 2) / 2
    weights = torch.rand(k, generator=g) + 0.1
    got = ties(deltas.clone(), weights, density=density, consensus=consensus, normalize=normalize, scale=0.9)
    want = naive_ties(deltas, weights, density, consensus, normalize, 0.9)
    # a float32 sum of the weighted agreeing terms, divided by their weights' sum (>= the smallest weight)
    terms = weights.reshape(-1, *[1] * len(shape)) * deltas * 0.9 / (float(weights.min()) if normalize else 1.0)
    assert_close_sum(got, want, terms)


# ----------------------------------------------------------------------------------------------------------- DARE


def test_dare_masks_are_seeded_per_parameter_and_expert() -> None:
    a = keep_mask((50, 40), 0.7, seed=3, name="p", index=0)
    assert torch.equal(a, keep_mask((50, 40), 0.7, seed=3, name="p", index=0))
    assert not torch.equal(a, keep_mask((50, 40), 0.7, seed=3, name="q", index=0))
    assert not torch.equal(a, keep_mask((50, 40), 0.7, seed=3, name="p", index=1))
    assert not torch.equal(a, keep_mask((50, 40), 0.7, seed=4, name="p", index=0))
    assert abs(a.float().mean().item() - 0.3) < 0.03


@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_equals_the_naive_reference(rescale: str, normalize: bool) -> None:
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 6, 7, generator=g)
    weights = torch.tensor([0.5, 0.3, 0.4])
    p = 0.6
    want = torch.zeros(6, 7)
    for i in range(3):
        mask = keep_mask((6, 7), p, seed=9, name="w", index=i)
        kept = deltas[i] * mask
        if rescale == "inverse":
            kept = kept / (1 - p)
        elif rescale == "l1":
            kept = kept * (deltas[i].abs().sum() / kept.abs().sum())
        want += weights[i] * kept
    if normalize:
        want /= weights.sum()
    got = dare(deltas, weights, drop_rate=p, rescale=rescale, seed=9, normalize=normalize, scale=1.0, name="w")
    torch.testing.assert_close(got, want)
    # DARE-TIES: the same sparsified deltas through TIES' election with density 1
    sparse = torch.stack(
        [
            deltas[i] * keep_mask((6, 7), p, seed=9, name="w", index=i) / ((1 - p) if rescale == "inverse" else 1)
            for i in range(3)
        ]
    )
    if rescale != "l1":
        got = dare_ties(deltas, weights, drop_rate=p, rescale=rescale, seed=9, normalize=normalize, name="w")
        terms = weights[:, None, None] * sparse / (float(weights.min()) if normalize else 1.0)
        assert_close_sum(got, naive_ties(sparse, weights, 1.0, "sum", normalize), terms)


def test_dare_refuses_bad_parameters() -> None:
    with pytest.raises(DmoError, match="drop_rate must be in"):
        dare(torch.zeros(1, 2), torch.ones(1), drop_rate=1.0)
    with pytest.raises(DmoError, match="rescale must be one of"):
        dare(torch.zeros(1, 2), torch.ones(1), rescale="l2")


# ---------------------------------------------------------------------------------------------------- RobustMerge


def official_clamp(x, min_ratio=0, max_ratio=0):
    """The official ``clamp`` (sort, pick the min/max positions, torch.clamp), transcribed."""
    if len(x.size()) == 1:
        d = x.size(0)
        sorted_x, _ = torch.sort(x)
        lo = sorted_x[int(d * min_ratio)]
        hi = sorted_x[int(d * (1 - max_ratio) - 1)]
    else:
        d = x.size(1)
        sorted_x, _ = torch.sort(x, dim=1)
        lo = sorted_x[:, int(d * min_ratio)].unsqueeze(1)
        hi = sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    return torch.clamp(x, lo, hi)


def official_robustmerge(lora: dict[str, torch.Tensor], t: int, guard: bool = False) -> dict[str, torch.Tensor]:
    """The official merge loop over a dict ``{name: stacked (T, d1, d2)}`` in PEFT order (A before its B).

    ``guard`` adds dmo's one change: s = 1 where the pruned row's L1 norm is 0.
    """
    mask_ratio, att_ratio = 0.2, 0.2
    fuse_weight = (torch.ones(t) * 2.0)[:, None, None]
    merged = {}
    scale = None
    for name, concat in lora.items():
        T, d1, d2 = concat.shape
        flat = concat.reshape(-1, d1 * d2)
        kth_values, _ = flat.abs().kthvalue(int(d1 * d2 * (1 - mask_ratio)), dim=1, keepdim=True)
        masks = (flat.abs() >= kth_values).reshape(T, d1, d2)
        concat = flat.reshape(T, d1, d2)
        trimmed = masks * concat
        if "lora_A" in name:
            s_vector = torch.sum(abs(concat), dim=-1) / torch.sum(abs(masks * concat), dim=-1)
            if guard:
                s_vector = torch.where(torch.sum(abs(masks * concat), dim=-1) > 0, s_vector, 1.0)
            scale = official_clamp(s_vector, 1 - att_ratio, 0)
            merged[name] = torch.sum(fuse_weight * trimmed, dim=0)
        else:
            merged[name] = torch.sum(fuse_weight * scale.unsqueeze(1) * trimmed, dim=0) / torch.sum(
                scale.unsqueeze(1), dim=0
            )
    return merged


@pytest.mark.parametrize(("t", "r", "d_in", "d_out"), [(2, 8, 24, 40), (3, 16, 64, 32), (4, 4, 10, 9)])
def test_robustmerge_with_uniform_weights_is_the_official_algorithm(t: int, r: int, d_in: int, d_out: int) -> None:
    g = torch.Generator().manual_seed(t * 100 + r)
    a = torch.randn(t, r, d_in, generator=g)
    b = torch.randn(t, d_out, r, generator=g) * 0.1
    official = official_robustmerge({"m.lora_A.weight": a, "m.lora_B.weight": b}, t)
    merged_a, merged_b = robustmerge(a, b, torch.full((t,), 1.0 / t))
    torch.testing.assert_close(merged_a, official["m.lora_A.weight"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(merged_b, official["m.lora_B.weight"], rtol=1e-6, atol=1e-7)
    assert torch.isfinite(merged_b).all()


def test_robustmerge_mixture_weights_scale_the_fuse_weights() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 8, 16, generator=g), torch.randn(3, 12, 8, generator=g)
    w = torch.tensor([0.5, 0.3, 0.2])
    merged_a, merged_b = robustmerge(a, b, w)
    uniform_a, _ = robustmerge(a * (2 * 3 * w / 2.0)[:, None, None], b, torch.full((3,), 1 / 3))
    # f_t = 2 T w_t multiplies expert t's pruned A (the mask and s_t do not depend on a positive scale of A_t)
    torch.testing.assert_close(merged_a, uniform_a, rtol=1e-5, atol=1e-6)
    official = official_robustmerge({"x.lora_A.weight": a, "x.lora_B.weight": b}, 3)
    _, uni_b = robustmerge(a, b, torch.full((3,), 1 / 3))
    torch.testing.assert_close(uni_b, official["x.lora_B.weight"], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(merged_b, uni_b)


def test_robustmerge_guards_fully_pruned_rows() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 8, 20, generator=g)
    a[0, 3] *= 1e-6  # this rank row loses every entry to the top-20% cut: official s = x/0 = inf
    a[1, 5] = 0.0  # an all-zero row: official s = 0/0 = NaN
    b = torch.randn(2, 6, 8, generator=g)
    official = official_robustmerge({"m.lora_A.weight": a, "m.lora_B.weight": b}, 2)
    assert not torch.isfinite(official["m.lora_B.weight"]).all()
    merged_a, merged_b = robustmerge(a, b, torch.tensor([0.5, 0.5]))
    assert torch.isfinite(merged_b).all() and torch.isfinite(merged_a).all()
    guarded = official_robustmerge({"m.lora_A.weight": a, "m.lora_B.weight": b}, 2, guard=True)
    torch.testing.assert_close(merged_a, guarded["m.lora_A.weight"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(merged_b, guarded["m.lora_B.weight"], rtol=1e-6, atol=1e-7)


def test_robustmerge_refuses_bad_shapes_and_ratios() -> None:
    with pytest.raises(DmoError, match="needs A"):
        robustmerge(torch.zeros(2, 4, 5), torch.zeros(2, 6, 3), torch.ones(2))
    with pytest.raises(DmoError, match="prune_ratio"):
        robustmerge(torch.zeros(2, 4, 5), torch.zeros(2, 6, 4), torch.ones(2), prune_ratio=0.0)
