"""Merges through the singular value decomposition of task matrices: TSV-Merge (``svd``) and Iso-C (``iso``).

Both work on a whole 2-D parameter (one linear layer's weight) at a time, so they have no chunked form: the
streaming merge and the live bank run them one parameter at a time. Parameters that are not matrices (biases,
norms) fall back to the mean of the experts' deltas, as the methods' official code and the DMO paper's do.

**TSV-M** (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025), as
the DMO paper's ``svd_merging`` computes it: for K experts and an ``m x n`` task matrix with ``p = min(m, n)``,
keep each expert's top ``r = int(p * (1 / K))`` singular triplets ``U_i[:, :r], s_i[:r], V_i[:, :r]``,
concatenate them (``U`` is ``m x Kr``, ``s`` has ``Kr`` entries, ``V`` is ``n x Kr``), replace ``U`` and ``V`` by
their nearest orthonormal matrices (the polar factors ``P Q^T`` of their thin SVDs ``P S Q^T``) and return
``polar(U) diag(s) polar(V)^T``. The paper's code pads ``U``, ``s`` and ``V`` with zeros to ``p`` columns; the
padded columns meet zero singular values, so the compact form here is the same matrix.

**Iso-C** (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025), the DMO paper's ``iso_merging``: the sum of the task matrices ``M = U diag(s) V^T`` with
every singular value replaced by their mean: ``mean(s) U V^T``.

Weights: ``weighted=True`` runs the method on the scaled task vectors ``w_i delta_i`` (TSV-M: each expert's
singular values times ``w_i``; Iso-C: the spectrum of ``sum_i w_i delta_i``) and the fallback mean becomes the
weighted mean ``sum_i w_i delta_i / sum_i w_i``; with every weight 1 both are the paper's. ``weighted=False`` is
the paper's: every expert present in the mixture (weight != 0) counts alike. ``scale`` multiplies the result (the
paper's ``scaling_coefficient``, 1.0 there).

Deviations from the paper's code, on purpose:

* ``svd``: the paper's ``svd_merging`` applies TSV only to the tensor named ``lm_head.weight`` and averages every
  other tensor (a condition inherited from MLLMerging's ``model_merging.py``), so for LoRA experts, whose merge
  excludes ``lm_head``, its ``svd`` is the plain mean of the task vectors. ``scope="all"`` (the default) applies
  TSV to every 2-D parameter, as the TSV paper does; ``scope="lm_head"`` reproduces the paper's code.
* ``svd``: an expert whose delta of a parameter is exactly 0 (a LoRA expert that does not adapt it) adds no
  singular vectors: the SVD of a zero matrix returns arbitrary ones, which would rotate the others'. ``K`` in
  ``r`` still counts it, as in the paper.
* ``iso``: the paper's code calls the SVD on every merged tensor and fails on 1-D ones (full fine-tunes merge
  norms and biases); here they get the mean, as in Iso-C's official code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.merge.registry import coefficients, merge_method, weighted_mean

SCOPES = ("all", "lm_head")


def polar(x: Tensor) -> Tensor:
    """The orthonormal factor of ``x``'s polar decomposition (``P Q^T`` of its thin SVD ``P S Q^T``)."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def fallback_mean(deltas: Tensor, coef: Tensor) -> Tensor:
    """What the matrix methods do with non-matrix parameters: the (weighted) mean of the experts' deltas."""
    return weighted_mean(deltas, coef)


def tsv_merge(deltas: Tensor, coef: Tensor) -> Tensor:
    """TSV-M of the task matrices ``deltas`` (K, m, n) scaled by ``coef`` (K,); experts with ``coef`` 0 are absent."""
    present = [i for i, c in enumerate(coef.tolist()) if c != 0]
    m, n = deltas.shape[1:]
    if not present:
        return torch.zeros((m, n), dtype=deltas.dtype, device=deltas.device)
    rank = int(min(m, n) * (1.0 / len(present)))  # the paper's int(p * sv_reduction), sv_reduction = 1 / K
    us, ss, vhs = [], [], []
    for i in present:
        if rank == 0 or not bool(deltas[i].any()):
            continue
        u, s, vh = torch.linalg.svd(deltas[i], full_matrices=False)
        us.append(u[:, :rank])
        ss.append(s[:rank] * coef[i])
        vhs.append(vh[:rank])
    if not us:
        return torch.zeros((m, n), dtype=deltas.dtype, device=deltas.device)
    u_all, s_all, vh_all = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    return torch.linalg.multi_dot([polar(u_all), torch.diag(s_all), polar(vh_all)])


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise DmoError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")


@merge_method("svd")
def svd(
    deltas: Tensor, weights: Tensor, weighted: bool = True, scope: str = "all", scale: float = 1.0, name: str = ""
) -> Tensor:
    """TSV-Merge: each expert's top 1/K singular triplets, orthogonalised together (matrices; else the mean)."""
    _check_scope(scope)
    deltas = deltas.to(torch.float32)
    coef = coefficients(weights, weighted).to(deltas.device)
    matrix = deltas.dim() == 3 and (scope == "all" or name == "lm_head.weight")
    out = tsv_merge(deltas, coef) if matrix else fallback_mean(deltas, coef)
    return out if scale == 1.0 else out.mul_(scale)


@merge_method("iso")
def iso(deltas: Tensor, weights: Tensor, weighted: bool = True, scale: float = 1.0) -> Tensor:
    """Iso-C: the summed task matrix with its singular values flattened to their mean (matrices; else the mean)."""
    deltas = deltas.to(torch.float32)
    coef = coefficients(weights, weighted).to(deltas.device)
    if deltas.dim() != 3:
        out = fallback_mean(deltas, coef)
    else:
        summed = torch.tensordot(coef, deltas, dims=1)
        u, s, vh = torch.linalg.svd(summed, full_matrices=False)
        out = (u * s.mean()) @ vh
    return out if scale == 1.0 else out.mul_(scale)
