"""Tolerances that follow from the computation, not from one CPU's kernel path.

Two computations of the same float32 result (the method and its reference, a chunked and a whole-tensor merge, MKL's
AVX-512 and SSE kernels) may sum in different orders. What the maths bounds is then:

* a **sum of K terms** (linear merges, Fisher averaging, TIES' agreeing sum): each element is off by at most about
  ``K * eps * sum_i |term_i|`` (the classic bound of recursive summation), whatever the order. An element near zero
  after cancellation gets the absolute error of its terms, never a relative one: :func:`assert_close_sum`.
* anything through an **SVD, a solve or an optimiser** (TSV, Iso-C, WUDI): the error is bounded relative to the norm of
  the whole result (backward stability), not per element, so an element near zero may carry the full absolute error
  of the matrix: :func:`assert_close_norm`, with a tolerance of a small multiple of ``n * eps`` times the problem's
  conditioning, written where it is used.
"""

from __future__ import annotations

import torch

EPS32 = float(torch.finfo(torch.float32).eps)  # 1.19e-7


def assert_close_norm(got: torch.Tensor, want: torch.Tensor, rtol: float, msg: str = "") -> None:
    """``||got - want||_F <= rtol * ||want||_F`` (in float64)."""
    assert got.shape == want.shape, f"{msg} shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got.double() - want.double()).norm())
    scale = float(want.double().norm())
    assert err <= rtol * scale, (
        f"{msg} relative error {err / max(scale, 1e-300):.3g} > {rtol:.3g} (||want|| {scale:.3g})"
    )


def sum_bound(terms: torch.Tensor, ops: int | None = None) -> torch.Tensor:
    """Per-element bound on the rounding error of a float32 sum over the first dim of ``terms`` (the summands,
    weights applied), for any order of summation: ``ops * eps * sum |term|``, ``ops`` = the number of roundings on
    each element's path (K - 1 additions + K multiplications by default), doubled for the two computations compared,
    plus one rounding of the output itself."""
    k = terms.shape[0]
    ops = 2 * k if ops is None else ops
    return (2 * ops + 1) * EPS32 * terms.double().abs().sum(0)


def assert_close_sum(got: torch.Tensor, want: torch.Tensor, terms: torch.Tensor, msg: str = "", ops: int | None = None):
    """Every element of ``got`` within the float32 summation bound of ``want`` (see :func:`sum_bound`)."""
    assert got.shape == want.shape, f"{msg} shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs()
    bound = sum_bound(terms, ops).reshape(diff.shape) + torch.finfo(torch.float32).tiny
    worst = int((diff - bound).argmax())
    assert bool((diff <= bound).all()), (
        f"{msg} element {worst}: |got - want| {float(diff.reshape(-1)[worst]):.3g} > bound "
        f"{float(bound.reshape(-1)[worst]):.3g}"
    )
