"""Parametrising the probability simplex for black-box samplers.

Optuna samplers propose points in a box, so a K-domain mixture is encoded as K-1 numbers u in [0, 1] by
**stick-breaking**: v_i = 1 - (1 - u_i) ** (1 / (K - i)) (the inverse CDF of Beta(1, K - i)), and
w_i = v_i * prod_{j<i} (1 - v_j), with the last weight taking what is left. Why this one:
- it is a bijection between the open box and the open simplex, with no redundant dimension (the
  normalised-exponential trick uses K numbers for K-1 degrees of freedom, which wastes a GP's or TPE's budget);
- a uniform u gives a uniform (Dirichlet(1)) mixture, so random sampling is unbiased over the simplex;
- every u maps to a valid mixture, so no proposal is ever rejected.
:func:`to_box` inverts it, which lets known mixtures (a preset grid) be enqueued as trials.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmo.mixture import Mixture


def param_names(domains: Sequence[str]) -> list[str]:
    """Optuna parameter names: one per stick break, named after the domain whose share it sets."""
    return [f"u_{d}" for d in domains[:-1]]


def from_box(domains: Sequence[str], u: Sequence[float]) -> Mixture:
    """Map u in [0, 1]^(K-1) to a mixture (the last weight takes what is left of the stick)."""
    k = len(domains)
    if len(u) != k - 1:
        raise ValueError(f"need {k - 1} box coordinates for {k} domains, got {len(u)}")
    weights, rest = [], 1.0
    for i, ui in enumerate(u):
        v = 1.0 - (1.0 - min(max(float(ui), 0.0), 1.0)) ** (1.0 / (k - 1 - i))
        weights.append(rest * v)
        rest -= rest * v
    return Mixture(tuple(domains), (*weights, max(rest, 0.0)))


def to_box(mixture: Mixture) -> list[float]:
    """Inverse of :func:`from_box` (up to rounding); a break after the stick is used up is set to 0."""
    k = len(mixture.domains)
    u, rest = [], 1.0
    for i, w in enumerate(mixture.weights[:-1]):
        if rest <= 1e-12:
            u.append(0.0)
            continue
        v = min(max(w / rest, 0.0), 1.0)
        u.append(1.0 - (1.0 - v) ** (k - 1 - i))
        rest -= w
    return u
