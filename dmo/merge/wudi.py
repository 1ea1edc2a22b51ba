"""WUDI merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via
Task Vectors", ICML 2025): per linear layer, a merged task matrix that interferes least with each task's inputs.

The task vector ``tau_i`` (``m x n``) of a linear layer spans the inputs that task ``i`` feeds it, so WUDI looks for
a merged ``tau`` whose difference from each ``tau_i`` is small on ``tau_i``'s own rows, solving by gradient descent,
data-free. As the DMO paper's code runs it (``wudi_merging`` and ``wudi_merging2`` in its ``model_merging.py``),
for every 2-D parameter whose name does not contain ``lm_head``:

* ``wudi``: minimise ``sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2`` from ``tau = sum_i tau_i`` with Adam
  (lr 1e-5, betas 0.9/0.999, eps 1e-8) for 300 steps.
* ``wudi2``: with ``r = int(min(m, n) / K)`` and each task's truncated SVD ``U_i S_i V_i^T`` (top ``r``), minimise
  ``sum_i ||(tau - U_i S_i V_i^T) V_i S_i||_F^2 / ||tau_i||_F^2`` from ``tau = mean_i tau_i`` with SGD (lr 1e-4,
  momentum 0.9) for 300 steps. (The paper's code multiplies by the ``m x n`` matrix ``[S_i V_i^T; 0]`` padded with
  zero rows, whose extra columns of the product are zero: the same loss.)

Every other parameter gets the mean of the experts' deltas. All of it runs on the device of the deltas, float32.

How it is computed here: both losses are quadratics ``sum_i ||(tau - X_i) F_i^T||^2`` (``wudi``: ``X_i = tau_i``,
``F_i = tau_i / ||tau_i||``; ``wudi2``: ``X_i = U_i S_i V_i^T``, ``F_i = S_i V_i^T / ||tau_i||``), whose gradient
is ``2 (tau H - B)`` with ``H = sum_i F_i^T F_i`` (``n x n``) and ``B = sum_i X_i F_i^T F_i`` fixed. So ``H`` and
``B`` are formed once and each step costs one ``m x n`` by ``n x n`` product (or ``(tau F^T) F`` with all ``F_i``
stacked when that is smaller), independent of K, instead of the paper's autograd over K ``m x m`` products; the
optimiser steps are torch's Adam / SGD formulas written out. The result equals the paper's up to float rounding
(Adam's sign-like steps amplify none of it beyond that).

Weights: ``weighted=True`` runs the method on the scaled task vectors ``w_i tau_i`` (targets ``w_i X_i``, start
``sum_i w_i tau_i`` for ``wudi``; the norms cancel), and the means (``wudi2``'s start and the fallback) become
weighted means ``sum_i w_i tau_i / sum_i w_i``; with every weight 1 both are the paper's. ``weighted=False`` is the
paper's: the experts present in the mixture (weight != 0) count alike. ``scale`` multiplies the result.

Deviation, on purpose: an expert whose task matrix is exactly 0 (a LoRA expert that does not adapt the layer) has
``||tau_i|| = 0`` and makes the paper's loss NaN; here its term is left out (it still counts in the means and in K).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.merge.registry import coefficients, merge_method, weighted_mean

#: torch.optim.Adam's defaults, which the paper's code uses.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Quadratic:
    """``sum_i ||(tau - X_i) F_i^T||_F^2`` for targets ``X_i`` (m x n) and factors ``F_i`` (r_i x n)."""

    def __init__(self, targets: list[Tensor], factors: list[Tensor], shape: tuple[int, int], like: Tensor):
        m, n = shape
        rows = sum(f.shape[0] for f in factors)
        self.b = torch.zeros((m, n), dtype=like.dtype, device=like.device)
        # tau H as one n x n product, or as (tau F^T) F with F stacked (R x n) when 2 R < n
        self.dense = n <= 2 * rows
        self.h: Tensor | None = None
        self.f: Tensor | None = None
        if self.dense:
            self.h = torch.zeros((n, n), dtype=like.dtype, device=like.device)
        for x, f in zip(targets, factors):
            a = f.T @ f if self.dense or 2 * f.shape[0] >= n else None
            if self.h is not None and a is not None:  # a is always formed when dense
                self.h += a
            # X_i F_i^T F_i: through the n x n product, or through r_i x n factors when that is smaller
            if a is not None and 2 * f.shape[0] >= n:
                self.b.addmm_(x, a)
            else:
                self.b.addmm_(x @ f.T, f)
        if not self.dense and rows:
            self.f = torch.cat(factors)

    def grad(self, tau: Tensor, out: Tensor) -> Tensor:
        """``out = 2 (tau H - B)``."""
        if self.h is not None:
            torch.mm(tau, self.h, out=out)
        elif self.f is not None:
            torch.mm(tau @ self.f.T, self.f, out=out)
        else:
            out.zero_()
        return out.sub_(self.b).mul_(2.0)


def adam(tau: Tensor, grad: Callable[[Tensor, Tensor], Tensor], steps: int, lr: float) -> Tensor:
    """``steps`` of torch.optim.Adam (defaults) on ``tau``, in place."""
    beta1, beta2 = ADAM_BETAS
    g = torch.empty_like(tau)
    exp_avg = torch.zeros_like(tau)
    exp_avg_sq = torch.zeros_like(tau)
    denom = torch.empty_like(tau)
    for step in range(1, steps + 1):
        grad(tau, g)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        torch.sqrt(exp_avg_sq, out=denom).div_(math.sqrt(1 - beta2**step)).add_(ADAM_EPS)
        tau.addcdiv_(exp_avg, denom, value=-step_size)
    return tau


def sgd(tau: Tensor, grad: Callable[[Tensor, Tensor], Tensor], steps: int, lr: float, momentum: float) -> Tensor:
    """``steps`` of torch.optim.SGD (momentum, no dampening) on ``tau``, in place."""
    g = torch.empty_like(tau)
    buf: Tensor | None = None
    for _ in range(steps):
        grad(tau, g)
        if momentum == 0:
            tau.add_(g, alpha=-lr)
            continue
        if buf is None:
            buf = g.clone()
        else:
            buf.mul_(momentum).add_(g)
        tau.add_(buf, alpha=-lr)
    return tau


def _check(iterations: int, lr: float) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise DmoError(f"iterations must be a whole number >= 0, got {iterations!r}")
    if not lr > 0:
        raise DmoError(f"lr must be > 0, got {lr!r}")


def _solved(deltas: Tensor, name: str) -> bool:
    return deltas.dim() == 3 and "lm_head" not in name


def _norms(deltas: Tensor) -> list[float]:
    return [float(x) for x in torch.linalg.vector_norm(deltas.flatten(1), dim=1)]


@merge_method("wudi")
def wudi(
    deltas: Tensor,
    weights: Tensor,
    iterations: int = 300,
    lr: float = 1e-5,
    weighted: bool = True,
    scale: float = 1.0,
    name: str = "",
) -> Tensor:
    """WUDI: per linear layer, Adam on the task-vector interference loss from the sum (else the mean)."""
    _check(iterations, lr)
    deltas = deltas.to(torch.float32)
    coef = coefficients(weights, weighted).to(deltas.device)
    if not _solved(deltas, name):
        out = weighted_mean(deltas, coef)
        return out if scale == 1.0 else out.mul_(scale)
    m, n = deltas.shape[1:]
    norms = _norms(deltas)
    targets, factors = [], []
    for i, c in enumerate(coef.tolist()):
        if c != 0 and norms[i] > 0:
            targets.append(deltas[i] * c)
            factors.append(deltas[i] / norms[i])
    loss = Quadratic(targets, factors, (m, n), deltas)
    del targets, factors
    tau = torch.tensordot(coef, deltas, dims=1)
    adam(tau, loss.grad, iterations, lr)
    return tau if scale == 1.0 else tau.mul_(scale)


@merge_method("wudi2")
def wudi2(
    deltas: Tensor,
    weights: Tensor,
    iterations: int = 300,
    lr: float = 1e-4,
    momentum: float = 0.9,
    weighted: bool = True,
    scale: float = 1.0,
    name: str = "",
) -> Tensor:
    """WUDI v2: per linear layer, SGD on the low-rank interference loss from the mean (else the mean)."""
    _check(iterations, lr)
    if not 0 <= momentum < 1:
        raise DmoError(f"momentum must be in [0, 1), got {momentum!r}")
    deltas = deltas.to(torch.float32)
    coef = coefficients(weights, weighted).to(deltas.device)
    mean = weighted_mean(deltas, coef)
    if not _solved(deltas, name):
        return mean if scale == 1.0 else mean.mul_(scale)
    m, n = deltas.shape[1:]
    present = [i for i, c in enumerate(coef.tolist()) if c != 0]
    rank = int(min(m, n) / len(present))  # the paper's int(s.shape[0] / K)
    norms = _norms(deltas)
    targets, factors = [], []
    for i in present:
        if norms[i] == 0 or rank == 0:
            continue
        u, s, vh = torch.linalg.svd(deltas[i], full_matrices=False)
        sv = s[:rank, None] * vh[:rank]  # S_r V_r^T
        targets.append((u[:, :rank] @ sv).mul_(coef[i]))
        factors.append(sv.div_(norms[i]))
    loss = Quadratic(targets, factors, (m, n), deltas)
    del targets, factors
    sgd(mean, loss.grad, iterations, lr, momentum)
    return mean if scale == 1.0 else mean.mul_(scale)
