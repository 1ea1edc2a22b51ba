"""Naive references of merge methods, written from the papers' definitions one element at a time (slow, obvious)."""

from __future__ import annotations

import math

import torch


def naive_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    flat = x.reshape(-1).tolist()
    n = len(flat)
    k = n if density >= 1 else max(1, int(density * n))
    order = sorted(range(n), key=lambda i: (-abs(flat[i]), i))  # largest first, ties: lowest index
    keep = set(order[:k])
    return torch.tensor([v if i in keep else 0.0 for i, v in enumerate(flat)]).reshape(x.shape)


def naive_ties(deltas, weights, density, consensus="sum", normalize=True, scale=1.0) -> torch.Tensor:
    k = deltas.shape[0]
    trimmed = [naive_trim(deltas[i], density) * float(weights[i]) for i in range(k)]
    out = torch.zeros_like(deltas[0]).reshape(-1)
    flat = [t.reshape(-1) for t in trimmed]
    for j in range(out.numel()):
        values = [float(f[j]) for f in flat]
        if consensus == "sum":
            sign = 1.0 if sum(values) >= 0 else -1.0
        else:
            sign = 1.0 if sum(math.copysign(1, v) if v else 0 for v in values) >= 0 else -1.0
        agree = [i for i, v in enumerate(values) if v != 0 and math.copysign(1, v) == sign]
        total = sum(values[i] for i in agree)
        if normalize:
            divisor = sum(float(weights[i]) for i in agree) or 1.0
            total /= divisor
        out[j] = total * scale
    return out.reshape(deltas.shape[1:])
