"""TIES merging (Yadav et al. 2023): trim each task vector to its largest entries, elect a sign, disjoint mean.

The weighted form is mergekit's (``ties`` with ``consensus_method: sum``): each expert's delta is trimmed to its
``density`` fraction of largest magnitudes, multiplied by its weight, the sign of the weighted sum is elected per
entry (a zero sum elects +), and the entries that agree with it are summed and divided by the sum of the agreeing
experts' weights (``normalize``; an entry where no expert agrees stays 0). ``scale`` multiplies the result.

Trimming keeps exactly ``max(1, int(density * n))`` entries of an ``n``-entry tensor; where several entries tie at
the threshold magnitude the ones with the lowest flat index are kept (mergekit's unstable argsort picks an
arbitrary subset of them; away from such ties both agree exactly). The threshold is found exactly without sorting:
a sample brackets it, one pass counts the entries above the bracket and collects the few inside it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.merge.registry import Chunked, merge_method

#: Below this many entries the threshold is taken with one kthvalue.
_DIRECT = 1 << 20
_SAMPLE = 1 << 16
_SCAN = 1 << 22


def _check_density(density: float) -> None:
    if not 0 <= density <= 1:
        raise DmoError(f"density must be in [0, 1], got {density}")


def kth_largest(mags: Tensor, k: int) -> float:
    """The k-th largest value of a flat float tensor, exactly (1 <= k <= numel)."""
    n = mags.numel()
    if n <= _DIRECT:
        return float(torch.kthvalue(mags, n - k + 1).values)
    g = torch.Generator(device=mags.device).manual_seed(n)
    sample = mags[torch.randint(n, (_SAMPLE,), generator=g, device=mags.device)]
    q = (n - k) / n  # fraction of entries below the k-th largest
    margin = 8 * math.sqrt(max(q * (1 - q), 1.0 / _SAMPLE) / _SAMPLE) + 2.0 / _SAMPLE
    bounds = torch.tensor([max(0.0, q - margin), min(1.0, q + margin)], device=mags.device)
    low, high = (float(v) for v in torch.quantile(sample, bounds))
    above = int((mags > high).sum())
    inside = mags[(mags >= low) & (mags <= high)]
    rank = k - above  # rank from the top within the bracket
    if above < k and 0 < rank <= inside.numel():
        return float(torch.kthvalue(inside, inside.numel() - rank + 1).values)
    return float(torch.kthvalue(mags, n - k + 1).values)  # the sample missed (very rare): the slow exact way


def trim_rule(mags: Tensor, density: float) -> tuple[float, int]:
    """``(threshold, cut)``: keep ``mags > threshold`` and ``mags == threshold`` at flat index ``< cut``."""
    _check_density(density)
    n = mags.numel()
    if density >= 1 or n == 0:
        return -math.inf, n
    if density <= 0:
        return math.inf, 0
    k = max(1, int(density * n))
    if k >= n:
        return -math.inf, n
    threshold = kth_largest(mags, k)
    need = k - int((mags > threshold).sum())
    for start in range(0, n, _SCAN):  # the need-th entry equal to the threshold, in flat order
        eq = mags[start : start + _SCAN] == threshold
        count = int(eq.sum())
        if count >= need:
            return threshold, start + int(torch.nonzero(eq)[need - 1]) + 1
        need -= count
    raise AssertionError("threshold not found")  # pragma: no cover


def keep(mags: Tensor, lo: int, threshold: float, cut: int) -> Tensor:
    """The trim mask of the chunk ``[lo, lo + n)`` of a flat tensor."""
    mask = mags > threshold
    hi = lo + mags.numel()
    if cut > lo and threshold > -math.inf:
        ties = mags == threshold
        if cut < hi:
            ties &= torch.arange(lo, hi, device=mags.device) < cut
        mask |= ties
    return mask


def magnitude_mask(x: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``max(1, int(density * x.numel()))`` largest ``|x|`` (ties: lowest flat index first)."""
    mags = x.detach().abs().reshape(-1).to(torch.float32)
    threshold, cut = trim_rule(mags, density)
    return keep(mags, 0, threshold, cut).reshape(x.shape)


def elect_and_merge(
    deltas: Tensor, weights: Tensor, *, consensus: str = "sum", normalize: bool = True, scale: float = 1.0
) -> Tensor:
    """Sign election and (weighted) disjoint mean over sparsified, *unweighted* ``deltas`` (K, ...); modifies them."""
    if consensus not in ("sum", "count"):
        raise DmoError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    w = weights.to(device=deltas.device, dtype=deltas.dtype).reshape((-1,) + (1,) * (deltas.dim() - 1))
    weighted = deltas.mul_(w)
    signs = weighted.sign()
    votes = weighted.sum(dim=0) if consensus == "sum" else signs.sum(dim=0)
    majority = torch.where(votes >= 0, 1.0, -1.0)
    agree = signs == majority
    merged = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        merged /= divisor
    if scale != 1.0:
        merged *= scale
    return merged


class TiesChunks(Chunked):
    """TIES in chunks: the statistics pass finds each expert's exact trim threshold."""

    stats = True

    def __init__(
        self,
        weights: Tensor,
        numel: int,
        name: str = "",
        density: float = 0.2,
        consensus: str = "sum",
        normalize: bool = True,
        scale: float = 1.0,
    ):
        super().__init__(weights, numel, name)
        _check_density(density)
        if consensus not in ("sum", "count"):
            raise DmoError(f"consensus must be 'sum' or 'count', got {consensus!r}")
        self.density, self.consensus, self.normalize, self.scale = density, consensus, normalize, scale
        self.rules: dict[int, tuple[float, int]] = {}
        self._mags: Tensor | None = None
        self.stats = density < 1

    def observe(self, index: int, lo: int, delta: Tensor) -> None:
        if self._mags is None or self._mags.device != delta.device:
            self._mags = torch.empty(self.numel, dtype=torch.float32, device=delta.device)
        torch.abs(delta, out=self._mags[lo : lo + delta.numel()])

    def done(self, index: int) -> None:
        assert self._mags is not None
        self.rules[index] = trim_rule(self._mags, self.density)
        if len(self.rules) == self.weights.numel():
            self._mags = None  # keep only the rules

    def merge(self, deltas: Tensor, lo: int) -> Tensor:
        if self.density < 1:
            for i, (threshold, cut) in self.rules.items():
                deltas[i] *= keep(deltas[i].abs(), lo, threshold, cut)
        return elect_and_merge(
            deltas, self.weights, consensus=self.consensus, normalize=self.normalize, scale=self.scale
        )


@merge_method("ties", chunked=TiesChunks)
def ties(
    deltas: Tensor,
    weights: Tensor,
    density: float = 0.2,
    consensus: str = "sum",
    normalize: bool = True,
    scale: float = 1.0,
) -> Tensor:
    """TIES: trim to density, elect sign, weighted disjoint mean (mergekit's ties)."""
    params: dict[str, Any] = {"density": density, "consensus": consensus, "normalize": normalize, "scale": scale}
    return TiesChunks.whole(deltas.to(torch.float32), weights, **params)
