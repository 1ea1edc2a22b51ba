"""DARE (Yu et al. 2024): drop each task-vector entry with probability ``drop_rate``, rescale the survivors.

``dare`` then merges linearly (``scale * sum_i w_i delta_i``, optionally divided by ``sum_i w_i`` with
``normalize``); ``dare_ties`` merges the sparsified deltas with TIES' sign election and disjoint mean.

Masks are seeded: the keep-mask of expert ``i`` (its position among the merged experts) for parameter ``name`` is
drawn in blocks of :data:`MASK_BLOCK` flat entries, block ``b`` from a generator seeded by
``sha256(seed, name, i, b)``, so a merge is reproducible and independent of chunking, thread scheduling and device.
:func:`keep_mask` is that draw.

``rescale``: ``"inverse"`` multiplies survivors by ``1 / (1 - drop_rate)`` (the DARE paper); ``"l1"`` restores
each delta's L1 norm (what mergekit's ``rescale: true`` does); ``"none"`` keeps them as they are.

``dare_ties`` takes a ``density`` (default 1: no trim, as mergekit's ``dare_ties``, where the random drop replaces
TIES' magnitude trim): below 1, each sparsified, rescaled delta is then trimmed like TIES before the election.

``weighted=False`` is the DMO paper's ``dare_ta`` / ``dare_ties`` (MergeLM's ``mask_model_weights`` then its
``task_arithmetic`` / ``ties_merging``), which ignore the mixture's coefficients: ``dare`` sums the sparsified
deltas of the experts present (weight != 0), ``dare_ties`` trims them with the paper's rule and elects signs as the
paper's TIES does (see :mod:`dmo.merge.ties`). The paper's values are ``drop_rate=0.2``, ``rescale="inverse"`` and
(``dare_ties``) ``density=0.2`` (:data:`dmo.merge.registry.PAPER_PARAMS`); its masks come from ``torch.bernoulli``,
dmo's from the seeded draw above (the same distribution, not the same draw).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.merge.registry import Chunked, coefficients, merge_method
from dmo.merge.ties import Trimmer, elect_and_merge, majority_votes, paper_elect_and_merge

RESCALES = ("inverse", "l1", "none")
#: Entries per independently seeded block of a DARE mask.
MASK_BLOCK = 1 << 18


def mask_seed(seed: int, name: str, index: int, block: int = 0) -> int:
    digest = hashlib.sha256(f"dmo-dare-v2\0{int(seed)}\0{name}\0{int(index)}\0{int(block)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def keep_range(numel: int, lo: int, hi: int, drop_rate: float, seed: int, name: str, index: int) -> Tensor:
    """Entries ``[lo, hi)`` of the flat keep-mask of expert ``index`` on parameter ``name`` (on the CPU)."""
    parts = []
    for block in range(lo // MASK_BLOCK, (hi - 1) // MASK_BLOCK + 1 if hi > lo else lo // MASK_BLOCK):
        start = block * MASK_BLOCK
        size = min(MASK_BLOCK, numel - start)
        generator = torch.Generator().manual_seed(mask_seed(seed, name, index, block))
        values = torch.rand(size, generator=generator)
        parts.append(values[max(lo, start) - start : min(hi, start + size) - start])
    values = torch.cat(parts) if len(parts) != 1 else parts[0]
    return values >= drop_rate


def keep_mask(shape: torch.Size | tuple[int, ...], drop_rate: float, seed: int, name: str, index: int) -> Tensor:
    """The boolean keep-mask DARE uses for expert ``index`` on parameter ``name`` (drawn on the CPU)."""
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0:
        return torch.zeros(tuple(shape), dtype=torch.bool)
    return keep_range(numel, 0, numel, drop_rate, seed, name, index).reshape(tuple(shape))


def _check(drop_rate: float, rescale: str) -> None:
    if not 0 <= drop_rate < 1:
        raise DmoError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if rescale not in RESCALES:
        raise DmoError(f"rescale must be one of {', '.join(RESCALES)}, got {rescale!r}")


class DareChunks(Chunked):
    """DARE in chunks (DARE-TIES: :class:`DareTiesChunks`). The statistics pass is needed for ``rescale="l1"`` (each
    delta's L1 norms) and for a DARE-TIES trim (each sparsified delta's threshold); unweighted DARE-TIES also needs
    the joint pass (the paper's majority sign)."""

    ties = False

    def __init__(
        self,
        weights: Tensor,
        numel: int,
        name: str = "",
        *,
        drop_rate: float,
        rescale: str,
        seed: int,
        normalize: bool,
        scale: float,
        weighted: bool,
    ):
        super().__init__(weights, numel, name)
        _check(drop_rate, rescale)
        self.drop_rate, self.rescale, self.seed = drop_rate, rescale, seed
        self.normalize, self.scale = normalize, scale
        self.weighted = weighted
        self.coef = coefficients(weights, weighted)
        self.consensus = "sum"
        self.trimmer: Trimmer | None = None
        self.stats = rescale == "l1"
        self.joint = False
        self._norms: dict[int, list[float]] = {}
        self.factors: dict[int, float] = {}
        self._votes = 0.0

    def _mask(self, index: int, lo: int, n: int, device: torch.device) -> Tensor:
        mask = keep_range(self.numel, lo, lo + n, self.drop_rate, self.seed, self.name, index)
        return mask.to(device)

    def observe(self, index: int, lo: int, delta: Tensor) -> None:
        kept = delta * self._mask(index, lo, delta.numel(), delta.device)
        if self.rescale == "l1":
            before, after = self._norms.setdefault(index, [0.0, 0.0])
            self._norms[index] = [before + float(delta.abs().sum(dtype=torch.float64)),
                                  after + float(kept.abs().sum(dtype=torch.float64))]  # fmt: skip
        if self.trimmer is not None:
            if self.rescale == "inverse":  # the same float operation as in merge, so thresholds match exactly
                kept /= 1.0 - self.drop_rate
            self.trimmer.observe(lo, kept)

    def done(self, index: int) -> None:
        if self.rescale == "l1":
            before, after = self._norms.pop(index, [0.0, 0.0])
            # mergekit's rescaled_masked_tensor with RescaleNorm.l1: unchanged when either norm is below 1e-7
            self.factors[index] = 1.0 if before < 1e-7 or after < 1e-7 else before / after
        if self.trimmer is not None:
            if self.rescale == "l1" and self.trimmer.mags is not None:
                self.trimmer.mags *= self.factors[index]  # |x| * f == |x * f|: the magnitudes merge will see
            self.trimmer.done(index)

    def _sparsify(self, deltas: Tensor, lo: int) -> None:
        n = deltas.shape[1]
        for i in range(deltas.shape[0]):
            if not self.weighted and self.coef[i] == 0:  # not in the mixture: no part in the unweighted merge
                deltas[i].zero_()
                continue
            deltas[i] *= self._mask(i, lo, n, deltas.device)
            if self.rescale == "inverse":
                deltas[i] /= 1.0 - self.drop_rate
            elif self.rescale == "l1":
                deltas[i] *= self.factors[i]
        if self.trimmer is not None:
            self.trimmer.trim(deltas, lo)

    def observe_all(self, deltas: Tensor, lo: int) -> None:
        self._sparsify(deltas, lo)
        self._votes += majority_votes(deltas, self.consensus)

    def merge(self, deltas: Tensor, lo: int) -> Tensor:
        self._sparsify(deltas, lo)
        if self.ties and not self.weighted:
            return paper_elect_and_merge(
                deltas, majority=self._votes, consensus=self.consensus, normalize=self.normalize, scale=self.scale
            )
        if self.ties:
            return elect_and_merge(
                deltas, self.weights, consensus=self.consensus, normalize=self.normalize, scale=self.scale
            )
        w = self.coef.to(device=deltas.device, dtype=deltas.dtype)
        merged = torch.tensordot(w, deltas, dims=1)
        if self.normalize:
            total = float(w.sum())
            merged /= total if abs(total) >= 1e-8 else 1.0
        if self.scale != 1.0:
            merged *= self.scale
        return merged


class DareTiesChunks(DareChunks):
    ties = True

    def __init__(self, weights: Tensor, numel: int, name: str = "", *, consensus: str, density: float, **dare: Any):
        super().__init__(weights, numel, name, **dare)
        if consensus not in ("sum", "count"):
            raise DmoError(f"consensus must be 'sum' or 'count', got {consensus!r}")
        self.consensus = consensus
        self.trimmer = Trimmer(numel, weights.numel(), density, self.weighted) if density < 1 else None
        self.stats = self.rescale == "l1" or self.trimmer is not None
        self.joint = not self.weighted


@merge_method("dare", chunked=DareChunks)
def dare(
    deltas: Tensor,
    weights: Tensor,
    drop_rate: float = 0.9,
    rescale: str = "inverse",
    seed: int = 0,
    normalize: bool = False,
    scale: float = 1.0,
    weighted: bool = True,
    name: str = "",
) -> Tensor:
    """DARE: random drop with rescaling, then a linear merge (mergekit's dare_linear; weighted=False: the paper's)."""
    params = {"drop_rate": drop_rate, "rescale": rescale, "seed": seed, "normalize": normalize, "scale": scale,
              "weighted": weighted}  # fmt: skip
    return DareChunks.whole(deltas.to(torch.float32), weights, name, **params)


@merge_method("dare_ties", chunked=DareTiesChunks)
def dare_ties(
    deltas: Tensor,
    weights: Tensor,
    drop_rate: float = 0.9,
    rescale: str = "inverse",
    seed: int = 0,
    consensus: str = "sum",
    normalize: bool = True,
    scale: float = 1.0,
    density: float = 1.0,
    weighted: bool = True,
    name: str = "",
) -> Tensor:
    """DARE-TIES: random drop with rescaling, optional TIES trim (density), sign election and disjoint mean."""
    params = {"drop_rate": drop_rate, "rescale": rescale, "seed": seed, "consensus": consensus,
              "normalize": normalize, "scale": scale, "density": density, "weighted": weighted}  # fmt: skip
    return DareTiesChunks.whole(deltas.to(torch.float32), weights, name, **params)
