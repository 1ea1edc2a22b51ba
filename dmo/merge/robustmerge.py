"""RobustMerge (Zeng et al. 2025) for LoRA experts, as its official code (``load_and_merge_pretrained_model``) does it.

For one LoRA module with ``T`` experts ``(A_t, B_t)``:

1. **Prune**: per expert, keep the entries of ``A_t`` (and of ``B_t``) whose magnitude is at least the
   ``int(n * (1 - prune_ratio))``-th smallest of its ``n`` entries, i.e. the top ``prune_ratio`` (0.2: 20%) plus
   ties; ``prune_ratio`` is the official ``mask_ratio``.
2. **Scale** (the "compensation"; there is no SVD step): per rank row ``j`` of ``A_t``,
   ``s_t[j] = sum|A_t[j]| / sum|pruned A_t[j]|``, clamped from below at the ``int(r * (1 - clamp_ratio))``-th
   smallest of that expert's ``r`` values (``clamp_ratio`` is the official ``att_ratio``, 0.2: the 80th percentile).
3. **Merge**: ``A = sum_t f_t pruned A_t`` and ``B = sum_t f_t s_t * pruned B_t / sum_t s_t``, with ``s_t`` applied
   to the columns of ``B_t`` and the division per column (cross-task normalisation).

``f_t = 2 T w_t``: the official code uses ``f_t = 2.0`` for its uniform merge of ``T`` experts; a mixture ``w``
generalises it and the uniform mixture reduces to it. Experts with weight 0 are dropped before (``T`` counts the
others). Non-LoRA trainables are averaged with the weights (``sum_t w_t x_t / sum_t w_t``; uniform: the official
mean); that part lives in :mod:`dmo.merge.stream`.

Deviation, on purpose: the official code divides by ``sum|pruned A_t[j]|`` unguarded, so a rank row that is pruned
away entirely (or is all zero) gives ``s = inf`` or ``NaN`` and poisons the merged ``B``. Here such a row gets
``s = 1`` before clamping. Computed in float32 (the official code works in the adapters' dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmo.errors import DmoError
from dmo.merge.registry import merge_method


def prune_mask(x: Tensor, prune_ratio: float) -> Tensor:
    """Per expert (first dim), keep ``|x| >= `` its ``int(n * (1 - prune_ratio))``-th smallest magnitude."""
    t = x.shape[0]
    flat = x.reshape(t, -1).abs()
    k = int(flat.shape[1] * (1 - prune_ratio))
    if k < 1:
        return torch.ones_like(x, dtype=torch.bool)
    kth = flat.kthvalue(k, dim=1, keepdim=True).values
    return (flat >= kth).reshape(x.shape)


def row_scales(a: Tensor, mask: Tensor, clamp_ratio: float) -> Tensor:
    """``s`` of shape (T, r): L1 norm of each rank row over that of its pruned row, clamped from below."""
    total = a.abs().sum(dim=-1)
    kept = (a * mask).abs().sum(dim=-1)
    s = torch.where(kept > 0, total / torch.where(kept > 0, kept, 1.0), 1.0)  # fully pruned row: s = 1 (guard)
    r = s.shape[1]
    index = min(int(r * (1 - clamp_ratio)), r - 1)
    floor = torch.sort(s, dim=1).values[:, index : index + 1]
    return torch.maximum(s, floor)


@merge_method("robustmerge", inputs="lora")
def robustmerge(
    a: Tensor, b: Tensor, weights: Tensor, prune_ratio: float = 0.2, clamp_ratio: float = 0.2
) -> tuple[Tensor, Tensor]:
    """RobustMerge for LoRA experts: prune, L1-ratio scaling of A's rows, cross-task normalised B."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise DmoError(f"robustmerge needs A (T, r, in) and B (T, out, r), got {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0 < prune_ratio <= 1:
        raise DmoError(f"prune_ratio (the fraction of entries kept) must be in (0, 1], got {prune_ratio}")
    if not 0 <= clamp_ratio <= 1:
        raise DmoError(f"clamp_ratio must be in [0, 1], got {clamp_ratio}")
    a = a.to(torch.float32)
    b = b.to(torch.float32)
    t = a.shape[0]
    f = (2.0 * t * weights.to(device=a.device, dtype=torch.float32)).reshape(t, 1, 1)
    mask_a = prune_mask(a, prune_ratio)
    s = row_scales(a, mask_a, clamp_ratio)  # (T, r)
    merged_a = (f * (a * mask_a)).sum(dim=0)
    pruned_b = b * prune_mask(b, prune_ratio)
    s_cols = s.unsqueeze(1)  # (T, 1, r): one factor per column of B_t
    merged_b = (f * s_cols * pruned_b).sum(dim=0) / s_cols.sum(dim=0)
    return merged_a, merged_b
