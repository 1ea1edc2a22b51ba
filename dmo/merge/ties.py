"""TIES merging (Yadav et al. 2023): trim each task vector to its largest entries, elect a sign, disjoint mean.

The weighted form is mergekit's (``ties`` with ``consensus_method: sum``): each expert's delta is trimmed to its
``density`` fraction of largest magnitudes, multiplied by its weight, the sign of the weighted sum is elected per
entry (a zero sum elects +), and the entries that agree with it are summed and divided by the sum of the agreeing
experts' weights (``normalize``; an entry where no expert agrees stays 0). ``scale`` multiplies the result.

Trimming keeps exactly ``max(1, int(density * n))`` entries of an ``n``-entry tensor; where several entries tie at
the threshold magnitude the ones with the lowest flat index are kept (mergekit's unstable argsort picks an
arbitrary subset of them; away from such ties both agree exactly). The threshold is found exactly without sorting:
a sample brackets it, one pass counts the entries above the bracket and collects the few inside it.

``weighted=False`` is the DMO paper's TIES (its ``ties_merging``, from MergeLM), which ignores the mixture's
coefficients: each expert keeps ``|x| >=`` its ``int(n * (1 - density))``-th smallest magnitude (``n - k + 1``
entries, plus ties: one more than above), the elected sign is that of the plain sum of the trimmed deltas, where
that sum is 0 the *majority sign* (the sign of the sum of all elected signs of the tensor) is used, and the entries
that agree are averaged (divided by how many agree). The majority sign is one number over the whole tensor, so the
chunked form finds it in a joint pass before merging. Experts with weight 0 do not take part.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.merge.registry import Chunked, coefficients, merge_method

#: Below this many entries the threshold is taken with one kthvalue.
_DIRECT = 1 << 20
_SAMPLE = 1 << 16


def _check_density(density: float) -> None:
    if not 0 <= density <= 1:
        raise DmoError(f"density must be in [0, 1], got {density}")


def _kth_smallest(t: Tensor, j: int) -> Tensor:
    """The j-th smallest entry (1-based) of a flat tensor. CUDA's kthvalue runs one thread block per slice, so on a
    GPU a full sort is faster (4x at 0.4M entries on an H200); on the CPU kthvalue's selection wins."""
    if t.is_cuda:
        return torch.sort(t).values[j - 1]
    return torch.kthvalue(t, j).values


def _bracket(mags: Tensor, k: int) -> tuple[Tensor, Tensor, int] | None:
    """A sample brackets the k-th largest: ``(values inside, their flat indices, count above)``, or None if missed."""
    n = mags.numel()
    g = torch.Generator(device=mags.device).manual_seed(n)
    sample = mags[torch.randint(n, (_SAMPLE,), generator=g, device=mags.device)]
    q = (n - k) / n  # fraction of entries below the k-th largest
    margin = 8 * math.sqrt(max(q * (1 - q), 1.0 / _SAMPLE) / _SAMPLE) + 2.0 / _SAMPLE
    bounds = torch.tensor([max(0.0, q - margin), min(1.0, q + margin)], device=mags.device)
    low, high = (float(v) for v in torch.quantile(sample, bounds))
    above = int(torch.count_nonzero(mags > high))
    index = torch.nonzero((mags >= low) & (mags <= high)).reshape(-1)
    rank = k - above
    if above >= k or not 0 < rank <= index.numel():
        return None
    return mags[index], index, above


def kth_largest(mags: Tensor, k: int) -> float:
    """The k-th largest value of a flat float tensor, exactly (1 <= k <= numel)."""
    n = mags.numel()
    found = _bracket(mags, k) if n > _DIRECT else None
    if found is None:
        return float(_kth_smallest(mags, n - k + 1))
    inside, _, above = found
    return float(_kth_smallest(inside, inside.numel() - (k - above) + 1))


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
    found = _bracket(mags, k) if n > _DIRECT else None
    if found is None:  # small tensor, or the sample missed (very rare): the exact way on everything
        index, inside, above = None, mags, 0
    else:
        inside, index, above = found
    threshold = float(_kth_smallest(inside, inside.numel() - (k - above) + 1))
    need = k - above - int(torch.count_nonzero(inside > threshold))  # >= 1: the threshold itself is kept
    ties = torch.nonzero(inside == threshold).reshape(-1)
    position = int(ties[need - 1]) if index is None else int(index[ties[need - 1]])
    return threshold, position + 1


def paper_trim_rule(mags: Tensor, density: float) -> tuple[float, int]:
    """The paper's trim as a :func:`trim_rule`: keep ``mags >=`` the ``int(n * (1 - density))``-th smallest value.

    ``1 - density`` is the paper's mask rate (0.8 for density 0.2; the subtraction is exact for such decimals).
    """
    _check_density(density)
    n = mags.numel()
    k = int(n * (1 - density))
    if k < 1:  # nothing to mask (the paper's kthvalue(k=0) would fail on such tiny tensors)
        return -math.inf, n
    return kth_largest(mags, n - k + 1), n  # ties at the threshold: all kept (cut = n)


def keep(mags: Tensor, lo: int, threshold: float, cut: int) -> Tensor:
    """The trim mask of the chunk ``[lo, lo + n)`` of a flat tensor (ties at the threshold: index < cut)."""
    hi = lo + mags.numel()
    if hi <= cut:
        return mags >= threshold
    if lo >= cut:
        return mags > threshold
    mask = mags > threshold
    mask |= (mags == threshold) & (torch.arange(lo, hi, device=mags.device) < cut)
    return mask


def elect_and_merge(
    deltas: Tensor, weights: Tensor, *, consensus: str = "sum", normalize: bool = True, scale: float = 1.0
) -> Tensor:
    """Sign election and (weighted) disjoint mean over sparsified, *unweighted* ``deltas`` (K, ...); modifies them.

    An entry agrees when its weighted value has the elected sign (a zero never agrees), as in mergekit's
    ``get_mask``: ``sign(w_i d_i) == elected``. Written with float arithmetic only (``s * sum_i relu(s w_i d_i)``
    with ``s`` = the elected sign), which CPUs vectorise, unlike boolean masks and ``where``.
    """
    if consensus not in ("sum", "count"):
        raise DmoError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    ws = [float(x) for x in weights]
    for i, w in enumerate(ws):
        deltas[i].mul_(w)
    votes = deltas.sum(dim=0) if consensus == "sum" else deltas.sign().sum(dim=0)
    # +1 where votes >= 0; -0.0 votes (-> -1) only arise when every weighted entry is 0, and then none agrees
    sign = torch.copysign(torch.ones((), dtype=votes.dtype, device=votes.device), votes)
    merged = torch.zeros_like(votes)
    divisor = torch.zeros_like(votes) if normalize else None
    agreeing = torch.empty_like(votes)
    for i, w in enumerate(ws):
        torch.mul(deltas[i], sign, out=agreeing).relu_()  # |w_i d_i| where it agrees with the elected sign, else 0
        merged += agreeing
        if divisor is not None:
            divisor.add_(agreeing.sign_(), alpha=w)
    merged *= sign
    if divisor is not None:
        if min(ws) > 0:  # a zero divisor means no entry agreed, so merged is 0 there: any positive divisor will do
            divisor.clamp_(min=torch.finfo(divisor.dtype).tiny)
        else:
            divisor = torch.where(divisor == 0, 1.0, divisor)
        merged /= divisor
    if scale != 1.0:
        merged *= scale
    return merged


def paper_votes(deltas: Tensor, consensus: str = "sum") -> Tensor:
    """The unweighted election's votes over trimmed ``deltas`` (K, n): their sum, or (``count``) their signs' sum."""
    if consensus not in ("sum", "count"):
        raise DmoError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    return deltas.sum(dim=0) if consensus == "sum" else deltas.sign().sum(dim=0)


def paper_elect_and_merge(
    deltas: Tensor, *, majority: float, consensus: str = "sum", normalize: bool = True, scale: float = 1.0
) -> Tensor:
    """The paper's sign election and disjoint mean over trimmed, unweighted ``deltas`` (K, ...).

    ``majority`` replaces a zero vote (its sign: -1, 0 or 1); an entry agrees when it is non-zero and has the
    elected sign; with ``normalize`` the agreeing entries' sum is divided by their number (at least 1).
    """
    sign = torch.sign(paper_votes(deltas, consensus))
    if majority != 0:
        sign = torch.where(sign == 0, torch.full_like(sign, math.copysign(1.0, majority)), sign)
    agree = (deltas * sign) > 0
    merged = (deltas * agree).sum(dim=0)
    if normalize:
        merged /= agree.sum(dim=0).clamp_(min=1)
    if scale != 1.0:
        merged *= scale
    return merged


def majority_votes(deltas: Tensor, consensus: str = "sum") -> float:
    """This chunk's share of the majority vote: the sum of its elected signs (before zeros are replaced)."""
    return float(torch.sign(paper_votes(deltas, consensus)).sum(dtype=torch.float64))


def trim_(delta: Tensor, lo: int, threshold: float, cut: int) -> None:
    """Zero, in place, the entries of chunk ``[lo, lo + n)`` that :func:`keep` drops."""
    hi = lo + delta.numel()
    if threshold == -math.inf:
        return
    if math.isfinite(threshold) and (hi <= cut or lo >= cut):
        if hi <= cut:  # ties at the threshold are kept: |x| >= t, i.e. |x| > the float just below t
            below = torch.nextafter(torch.tensor(threshold, dtype=torch.float32), torch.tensor(0.0))
            threshold = float(below)
        torch.hardshrink(delta, threshold, out=delta)  # x if |x| > threshold else 0, vectorised
        return
    delta.mul_(keep(delta.abs(), lo, threshold, cut))


class Trimmer:
    """Per-expert trim thresholds of flat tensors seen chunk by chunk (one float32 copy of one tensor at a time)."""

    def __init__(self, numel: int, k: int, density: float, weighted: bool):
        _check_density(density)
        self.numel, self.k, self.density = numel, k, density
        self.rule = trim_rule if weighted else paper_trim_rule
        self.rules: dict[int, tuple[float, int]] = {}
        self.mags: Tensor | None = None

    def observe(self, lo: int, values: Tensor) -> None:
        if self.mags is None or self.mags.device != values.device:
            self.mags = torch.empty(self.numel, dtype=torch.float32, device=values.device)
        torch.abs(values, out=self.mags[lo : lo + values.numel()])

    def done(self, index: int) -> None:
        assert self.mags is not None
        self.rules[index] = self.rule(self.mags, self.density)
        if len(self.rules) == self.k:
            self.mags = None  # keep only the rules

    def trim(self, deltas: Tensor, lo: int) -> None:
        """Zero, in place, what the rules drop from chunk ``[lo, lo + n)`` of every expert."""
        for i, (threshold, cut) in self.rules.items():
            trim_(deltas[i], lo, threshold, cut)


class TiesChunks(Chunked):
    """TIES in chunks: the statistics pass finds each expert's exact trim threshold; unweighted (the paper's), a
    joint pass finds the majority sign."""

    stats = True

    def __init__(
        self,
        weights: Tensor,
        numel: int,
        name: str = "",
        *,
        density: float,
        consensus: str,
        normalize: bool,
        scale: float,
        weighted: bool,
    ):
        super().__init__(weights, numel, name)
        _check_density(density)
        if consensus not in ("sum", "count"):
            raise DmoError(f"consensus must be 'sum' or 'count', got {consensus!r}")
        self.density, self.consensus, self.normalize, self.scale = density, consensus, normalize, scale
        self.weighted = weighted
        self.present = coefficients(weights, weighted)
        self.trimmer = Trimmer(numel, weights.numel(), density, weighted)
        self.stats = density < 1
        self.joint = not weighted
        self._votes = 0.0

    @property
    def rules(self) -> dict[int, tuple[float, int]]:
        return self.trimmer.rules

    def observe(self, index: int, lo: int, delta: Tensor) -> None:
        self.trimmer.observe(lo, delta)

    def done(self, index: int) -> None:
        self.trimmer.done(index)

    def _prepare(self, deltas: Tensor, lo: int) -> None:
        if self.density < 1:
            self.trimmer.trim(deltas, lo)
        if not self.weighted:
            for i, c in enumerate(self.present.tolist()):
                if c == 0:  # not in the mixture: takes no part in the paper's unweighted merge
                    deltas[i].zero_()

    def observe_all(self, deltas: Tensor, lo: int) -> None:
        self._prepare(deltas, lo)
        self._votes += majority_votes(deltas, self.consensus)

    def merge(self, deltas: Tensor, lo: int) -> Tensor:
        self._prepare(deltas, lo)
        if not self.weighted:
            return paper_elect_and_merge(
                deltas, majority=self._votes, consensus=self.consensus, normalize=self.normalize, scale=self.scale
            )
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
    weighted: bool = True,
) -> Tensor:
    """TIES: trim to density, elect sign, weighted disjoint mean (mergekit's ties; weighted=False: the paper's)."""
    params: dict[str, Any] = {"density": density, "consensus": consensus, "normalize": normalize, "scale": scale,
                              "weighted": weighted}  # fmt: skip
    return TiesChunks.whole(deltas.to(torch.float32), weights, **params)
