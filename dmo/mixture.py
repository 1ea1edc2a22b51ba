"""Data mixtures: points on the probability simplex over named domains.

A :class:`Mixture` is immutable, validated on construction, and has a canonical id that is stable across
runs and safe as a folder name, e.g. ``general-0.25+ocr-0.75``. Candidate sets are produced by
:func:`lattice` (a regular grid on the simplex) and :func:`dirichlet` (random draws).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dmo.errors import DmoError

#: Sum-to-one tolerance. Published mixtures are rounded to 4-6 decimals, so exact equality is too strict.
TOLERANCE = 1e-6

_DOMAIN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_ID_PART = re.compile(r"^([a-z][a-z0-9_]{0,31})-([0-9.]+)$")


def check_domain_name(name: str) -> str:
    if not isinstance(name, str) or not _DOMAIN.match(name):
        raise DmoError(f"invalid domain name {name!r}: use lower-case letters, digits and '_', starting with a letter")
    return name


def _format_weight(w: float) -> str:
    text = f"{round(w, 6):.6f}".rstrip("0").rstrip(".")
    return text or "0"


@dataclass(frozen=True)
class Mixture:
    """Weights over domains, in the order of ``domains``; validated, immutable and hashable."""

    domains: tuple[str, ...]
    weights: tuple[float, ...]
    #: Ids round weights to 6 decimals, so a parsed id may be off by up to K * 5e-7; parsing widens this.
    tolerance: float = field(default=TOLERANCE, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.domains) != len(self.weights):
            raise DmoError(f"mixture has {len(self.domains)} domains but {len(self.weights)} weights")
        if not self.domains:
            raise DmoError("a mixture needs at least one domain")
        for d in self.domains:
            check_domain_name(d)
        if len(set(self.domains)) != len(self.domains):
            raise DmoError(f"mixture names a domain twice: {list(self.domains)}")
        for d, w in zip(self.domains, self.weights):
            if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)):
                raise DmoError(f"weight of domain {d!r} is {w!r}, not a number")
            if not math.isfinite(w):
                raise DmoError(f"weight of domain {d!r} is {w}: weights must be finite numbers")
            if w < 0:
                raise DmoError(f"weight of domain {d!r} is {w}: weights must be >= 0")
        total = math.fsum(self.weights)
        if abs(total - 1.0) > self.tolerance:
            raise DmoError(
                f"weights {self._pretty()} sum to {total:.8g}, not 1 (tolerance {self.tolerance:g}); "
                "rescale them so they sum to 1"
            )
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    def _pretty(self) -> str:
        return "{" + ", ".join(f"{d}: {w:g}" for d, w in zip(self.domains, self.weights)) + "}"

    @classmethod
    def from_mapping(
        cls, weights: Mapping[str, float], domains: Sequence[str] | None = None, tolerance: float = TOLERANCE
    ) -> Mixture:
        """Build from ``{domain: weight}``; with ``domains``, unknown names are refused and missing ones are 0."""
        if not isinstance(weights, Mapping):
            raise DmoError(f"a mixture must be a mapping domain -> weight, got {weights!r}")
        if domains is None:
            return cls(tuple(weights), tuple(weights.values()), tolerance)
        unknown = [d for d in weights if d not in domains]
        if unknown:
            raise DmoError(f"unknown domain {unknown[0]!r}: this space has domains {list(domains)}")
        return cls(tuple(domains), tuple(weights.get(d, 0.0) for d in domains), tolerance)

    @classmethod
    def parse(cls, text: str, domains: Sequence[str] | None = None) -> Mixture:
        """Parse ``general=0.25,ocr=0.75`` (command-line form) or a canonical id ``general-0.25+ocr-0.75``."""
        text = text.strip()
        parts: dict[str, float] = {}
        tolerance = TOLERANCE
        if "=" in text:
            items = [p for p in re.split(r"[,\s]+", text) if p]
            for item in items:
                name, sep, value = item.partition("=")
                if not sep:
                    raise DmoError(f"cannot parse {item!r} in mixture {text!r}: write domain=weight")
                parts[name.strip()] = _parse_float(value, text)
        else:
            for item in text.split("+"):
                m = _ID_PART.match(item)
                if not m:
                    raise DmoError(
                        f"cannot parse mixture {text!r}: write general=0.25,ocr=0.75 or general-0.25+ocr-0.75"
                    )
                parts[m.group(1)] = _parse_float(m.group(2), text)
            tolerance = max(TOLERANCE, len(parts) * 5e-7 + 1e-12)
        return cls.from_mapping(parts, domains, tolerance)

    @property
    def id(self) -> str:
        """Canonical id: domains sorted by name, weights rounded to 6 decimals; safe as a folder name."""
        order = sorted(range(len(self.domains)), key=lambda i: self.domains[i])
        return "+".join(f"{self.domains[i]}-{_format_weight(self.weights[i])}" for i in order)

    def canonical(self) -> Mixture:
        """The mixture its id stands for (weights rounded to 6 decimals), so equal ids mean equal weights."""
        return Mixture.parse(self.id, self.domains)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.domains, self.weights))

    def __getitem__(self, domain: str) -> float:
        try:
            return self.weights[self.domains.index(domain)]
        except ValueError:
            raise KeyError(domain) from None

    def __str__(self) -> str:
        return self.id

    def rounded_to_budget(self, budget: int) -> dict[str, float]:
        """The DMO paper's merge coefficients: round(w_i * budget) / budget, zero-weight domains dropped.

        The paper does not renormalise after rounding, so the coefficients may sum to slightly less or more
        than 1; that is reproduced on purpose.
        """
        out = {}
        for d, w in zip(self.domains, self.weights):
            n = round(w * budget)
            if n > 0:
                out[d] = n / budget
        return out

    def counts(self, budget: int) -> dict[str, int]:
        """Samples per domain for a training budget, as in the paper's names (``general-25600++ocr-76800``)."""
        return {d: round(w * budget) for d, w in zip(self.domains, self.weights)}


def _parse_float(value: str, context: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DmoError(f"weight {value!r} in mixture {context!r} is not a number") from None


def from_paper_name(name: str, domains: Sequence[str] | None = None) -> Mixture:
    """Read the DMO paper's naming ``general-25600++ocr-76800`` (sample counts) back into weights."""
    counts: dict[str, int] = {}
    for item in name.split("++"):
        dom, sep, n = item.rpartition("-")
        if not sep or not n.isdigit():
            raise DmoError(f"cannot read {name!r} as a paper mixture name like general-25600++ocr-76800")
        counts[dom] = int(n)
    total = sum(counts.values())
    if total <= 0:
        raise DmoError(f"mixture name {name!r} has no samples")
    return Mixture.from_mapping({d: n / total for d, n in counts.items()}, domains)


def lattice(
    domains: Sequence[str],
    resolution: int,
    *,
    min_weight: float = 0.0,
    max_weight: float = 1.0,
    drop_vertices: bool = False,
) -> list[Mixture]:
    """Every mixture whose weights are multiples of ``1/resolution``: C(resolution+K-1, K-1) points.

    ``min_weight``/``max_weight`` bound each weight (inclusive, up to float rounding); ``drop_vertices``
    removes the single-domain corners (whose proxy is just one expert).
    """
    k = len(domains)
    if k < 1:
        raise DmoError("a lattice needs at least one domain")
    if resolution < 1:
        raise DmoError(f"lattice resolution must be a positive integer, got {resolution}")
    if not 0 <= min_weight <= max_weight <= 1:
        raise DmoError(f"need 0 <= min_weight <= max_weight <= 1, got {min_weight}, {max_weight}")
    eps = 1e-9
    out = []
    for counts in _compositions(resolution, k):
        weights = tuple(c / resolution for c in counts)
        if any(w < min_weight - eps or w > max_weight + eps for w in weights):
            continue
        if drop_vertices and max(counts) == resolution:
            continue
        out.append(Mixture(tuple(domains), weights))
    return out


def _compositions(n: int, k: int) -> Iterator[tuple[int, ...]]:
    """Ordered k-tuples of non-negative ints summing to n, in lexicographic order (first weight largest)."""
    if k == 1:
        yield (n,)
        return
    for first in range(n, -1, -1):
        for rest in _compositions(n - first, k - 1):
            yield (first, *rest)


def dirichlet(
    domains: Sequence[str], n: int, *, alpha: float | Sequence[float] = 1.0, seed: int = 0, decimals: int | None = 4
) -> list[Mixture]:
    """``n`` draws from Dirichlet(alpha) with numpy's ``default_rng(seed)``.

    With ``decimals``, each draw is rounded and its last weight adjusted so the sum is exactly 1, which is how
    the DMO paper's 4-domain mixtures were made.
    """
    k = len(domains)
    alphas = [float(alpha)] * k if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if len(alphas) != k or any(a <= 0 for a in alphas):
        raise DmoError(f"dirichlet alpha must be positive, one per domain ({k}), got {alpha}")
    if n < 1:
        raise DmoError(f"number of dirichlet draws must be >= 1, got {n}")
    draws = np.random.default_rng(seed).dirichlet(alphas, size=n)
    out = []
    for row in draws:
        if decimals is not None:
            row = np.round(row, decimals)
            row[-1] = round(1.0 - float(row[:-1].sum()), decimals)
            if row[-1] < 0:  # rounding pushed the others over 1; take it from the largest
                i = int(np.argmax(row[:-1]))
                row[i] = round(row[i] + row[-1], decimals)
                row[-1] = 0.0
        out.append(Mixture(tuple(domains), tuple(float(x) for x in row)))
    return out


def uniform(domains: Sequence[str], decimals: int = 6) -> Mixture:
    """The uniform mixture, rounded as the paper's launch scripts write it (last weight takes the rest)."""
    k = len(domains)
    w = [round(1.0 / k, decimals)] * k
    w[-1] = round(1.0 - sum(w[:-1]), decimals)
    return Mixture(tuple(domains), tuple(w))


def dedupe(mixtures: Iterable[Mixture]) -> list[Mixture]:
    seen: set[str] = set()
    out = []
    for m in mixtures:
        if m.id not in seen:
            seen.add(m.id)
            out.append(m)
    return out
