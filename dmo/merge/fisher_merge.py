"""Fisher-weighted averaging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022).

Each expert brings a diagonal Fisher ``F_i`` (one non-negative tensor per parameter, the mean squared gradient of
its log-likelihood on a sample of its domain's data). As the DMO paper's ``fisher_merging`` (from MergeLM) does it,
per parameter:

    theta = sum_i c_i (F_i + eps) theta_i / sum_i c_i (F_i + eps),   eps = ``minimal`` (1e-6)

with ``c_i`` the mixture's weight ``w_i`` (the paper passes its alphas; ``weighted=False``: 1 for every expert
present). ``fisher`` (``normalize``) also divides each expert's ``c_i`` by ``||F_i|| + eps``, the L2 norm of its
Fisher over *all* merged parameters together, so that an expert with a larger Fisher overall does not dominate;
``fisher_nn`` does not. Since ``sum_i a_i theta_b / sum_i a_i = theta_b``, the same formula holds for the deltas
``theta_i - theta_b``, which is what the function merges (float32).

The norms are one number per expert over the whole model, so they come in from outside (``fisher_norms``, computed
by :func:`fisher_norms`; the streaming merge, the live bank and :func:`~dmo.merge.registry.merge_deltas` do that
over the parameters they merge). Called on one parameter with ``fisher_norms=None``, the norm is that parameter's
own.

Fisher weights are per-expert *inputs* (``extra=("fisher",)``), stacked like the deltas: ``fisher`` of shape
``(K, *param_shape)``; an expert's Fisher file is a safetensors file (or a folder of them) with one tensor per
merged parameter, named like the base checkpoint's tensors (or like the model's parameters; dmo maps the names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.merge.registry import coefficients, merge_method


def fisher_norms(fishers: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """Each expert's Fisher L2 norm over every tensor it holds (float64 accumulation), shape (K,)."""
    out = []
    for per_param in fishers:
        total = 0.0
        for value in per_param.values():
            total += float(torch.linalg.vector_norm(value.to(torch.float32), dtype=torch.float64) ** 2)
        out.append(total**0.5)
    return torch.tensor(out, dtype=torch.float64)


def _prepare(extra: Mapping[str, Sequence[Mapping[str, Tensor]]]) -> dict[str, Any]:
    return {"fisher_norms": fisher_norms(extra["fisher"])}


def fisher_average(
    deltas: Tensor,
    weights: Tensor,
    fisher: Tensor,
    norms: Tensor | None,
    *,
    normalize: bool,
    weighted: bool,
    minimal: float,
) -> Tensor:
    """The Fisher-weighted average of ``deltas`` (K, ...) with ``fisher`` (K, ...) and the model-wide ``norms``."""
    if fisher.shape != deltas.shape:
        raise DmoError(f"Fisher weights of shape {list(fisher.shape)} for deltas of shape {list(deltas.shape)}")
    if not minimal >= 0:
        raise DmoError(f"minimal must be >= 0, got {minimal!r}")
    deltas = deltas.to(torch.float32)
    coef = coefficients(weights, weighted).to(device=deltas.device, dtype=torch.float64)
    if bool((coef < 0).any()):
        raise DmoError(f"Fisher merging needs non-negative weights, got {weights.tolist()}")
    if normalize:
        if norms is None:
            norms = torch.linalg.vector_norm(fisher.flatten(1).to(torch.float64), dim=1)
        inverse = 1.0 / (norms.to(device=deltas.device, dtype=torch.float64) + minimal)
        coef = coef * (inverse / inverse.sum())
    k = deltas.shape[0]
    c = coef.to(torch.float32).reshape(k, *([1] * (deltas.dim() - 1)))
    weighted_fisher = (fisher.to(device=deltas.device, dtype=torch.float32) + minimal).mul_(c)
    return (weighted_fisher * deltas).sum(dim=0).div_(weighted_fisher.sum(dim=0))


@merge_method("fisher", extra=("fisher",), prepare=_prepare)
def fisher(
    deltas: Tensor,
    weights: Tensor,
    fisher: Tensor,
    fisher_norms: Tensor | None,
    weighted: bool = True,
    minimal: float = 1e-6,
) -> Tensor:
    """Fisher-weighted average, each expert's Fisher normalised by its model-wide L2 norm (the paper's fisher)."""
    return fisher_average(deltas, weights, fisher, fisher_norms, normalize=True, weighted=weighted, minimal=minimal)


@merge_method("fisher_nn", extra=("fisher",))
def fisher_nn(deltas: Tensor, weights: Tensor, fisher: Tensor, weighted: bool = True, minimal: float = 1e-6) -> Tensor:
    """Fisher-weighted average without normalising the Fisher weights (the paper's fisher_nn)."""
    return fisher_average(deltas, weights, fisher, None, normalize=False, weighted=weighted, minimal=minimal)
