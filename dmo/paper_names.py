"""The DMO paper's model names, read into what they say (pure functions; no file or network is touched).

The paper's scripts name every model ``<family>_<size>_<ft>_<type>_<composition>`` (``utils/eval_bench_utils.py``,
``scripts/*/train_*.sh`` at commit 9d6b426): ``qwen2_2b_lora_expert_ocr-102400`` (an expert trained on 102,400 OCR
samples), ``qwen2_2b_lora_mixed_general-25600++ocr-76800`` (a model trained on a mixture of 25,600 general and 76,800
OCR samples), ``qwen2_2b_lora_merged_general-25600++ocr-76800--task_arithmetic`` (a merged proxy). The family is e.g.
``qwen2``, ``qwen2instr``, ``intern35``, ``intern35instr``. A name may end in a training seed, ``_seed<N>``,
``.seed<N>`` or ``-seed<N>`` (dmo's run names; the paper's scripts at 9d6b426 name no seed, which reads as seed 0).

Weights. A name gives sample counts ``n_i``; the mixture is ``n_i / budget``. The paper rounds
``n_i = round(w_i * budget)``, so a count may be off ``w_i * budget`` by half a sample: a candidate mixture whose
counts at the budget are exactly the name's is taken as the mixture it names (so that trained and proxy rows get the
same ids), any other name's weights are ``n_i / sum(n)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dmo.errors import DmoError
from dmo.mixture import Mixture, check_domain_name

SEED = re.compile(r"^(?P<model>.+?)[._-]seed(?P<seed>\d+)$")
PAPER_MODEL = re.compile(
    r"^(?P<tag>(?P<base>(?P<family>[a-z][a-z0-9]*)_(?P<size>\d+(?:\.\d+)?[bm]))_(?P<ft>[a-z][a-z0-9]*))"
    r"_(?P<type>expert|mixed|merged)_(?P<composition>[a-z][a-z0-9_]*-\d+(?:\+\+[a-z][a-z0-9_]*-\d+)*)"
    r"(?:--(?P<method>[A-Za-z0-9_.]+))?$"
)
#: the paper's name of a model's type -> the results table's kind
KINDS = {"expert": "expert", "mixed": "trained", "merged": "proxy"}


@dataclass(frozen=True)
class PaperName:
    """What one of the paper's model names says."""

    kind: str  # expert | trained | proxy
    tag: str  # <family>_<size>_<ft>, e.g. qwen2_2b_lora
    counts: dict[str, int]  # samples per domain (zero counts left out, as the paper's merging drops them)
    method: str = ""  # proxies: the merge method
    seed: int | None = None  # a training seed suffix, if the name has one


def split_seed(name: str) -> tuple[str, int | None]:
    """``name`` without a ``[._-]seed<N>`` suffix, and ``N`` (None without one)."""
    m = SEED.match(name)
    return (m["model"], int(m["seed"])) if m else (name, None)


def read_paper_name(name: str) -> PaperName | None:
    """What a name in the paper's naming says; None for a name in another naming; :class:`DmoError` for a paper
    name that contradicts itself (a domain twice, a merged model without its method, no samples)."""
    m = PAPER_MODEL.match(name)
    seed = None
    if m is None:
        stem, seed = split_seed(name)
        m = PAPER_MODEL.match(stem) if seed is not None else None
        if m is None:
            return None
    counts: dict[str, int] = {}
    for item in m["composition"].split("++"):
        domain, _, n = item.rpartition("-")
        check_domain_name(domain)
        if domain in counts:
            raise DmoError(f"model folder {name!r} names domain {domain!r} twice")
        counts[domain] = int(n)
    counts = {d: n for d, n in counts.items() if n > 0}
    kind = KINDS[m["type"]]
    method = m["method"] or ""
    if (kind == "proxy") != bool(method):
        want = "ends in --<merge method>" if kind == "proxy" else "has no --<merge method>"
        raise DmoError(f"cannot tell which model {name!r} is: a paper {m['type']} model's name {want}")
    if not counts:
        raise DmoError(f"cannot tell which model {name!r} is: it names no samples")
    if kind == "expert" and len(counts) != 1:
        raise DmoError(f"cannot tell which model {name!r} is: an expert names one domain")
    return PaperName(kind, m["tag"], counts, method, seed)


def paper_mixture(
    counts: Mapping[str, int],
    domains: Sequence[str] | None,
    budget: int | None,
    candidates: Sequence[Mixture] = (),
    name: str = "",
) -> Mixture:
    """The mixture a paper name's sample counts stand for (see the module docstring)."""
    total = sum(counts.values())
    if budget is not None and abs(total - budget) > len(counts) / 2:
        raise DmoError(
            f"model folder {name!r} names {total} samples in all, not the budget {budget} (give the right budget, or "
            "rename the folder)"
        )
    if domains is not None and any(d not in domains for d in counts):
        raise DmoError(f"unknown domain {next(d for d in counts if d not in domains)!r}: domains are {list(domains)}")
    at = budget if budget is not None else total
    found: dict[str, Mixture] = {}
    for c in candidates:
        if {d: n for d, n in c.counts(at).items() if n > 0} == dict(counts):
            found.setdefault(c.id, c)
    if len(found) == 1:
        (c,) = found.values()
        used = {d: w for d, w in c.as_dict().items() if w > 0}
        return Mixture.from_mapping(used, list(domains) if domains is not None else None, tolerance=c.tolerance)
    weights = {d: n / total for d, n in counts.items()}
    if domains is not None:
        return Mixture.from_mapping(weights, list(domains))
    return Mixture.from_mapping(weights)


def paper_mixtures() -> list[Mixture]:
    """Every mixture the paper trained (:mod:`dmo.presets`): the names of its models stand for these."""
    from dmo.presets import PRESETS

    return [m for make in PRESETS.values() for m in make(True)]


def trained_folder(
    name: str, domains: Sequence[str] | None = None, budget: int | None = None, candidates: Sequence[Mixture] = ()
) -> tuple[Mixture, int] | None:
    """The mixture and seed of a folder of mixture-trained models, as the paper names them
    (``qwen2_2b_lora_mixed_general-25600++ocr-76800``, ``..._seed1``); None for one of the paper's experts (they sit
    in the same folder after its download scripts). Anything else is a one-line :class:`DmoError` naming the folder.

    ``budget``: the samples of one training run (the counts are divided by it); ``candidates``: the mixtures the
    names stand for when their counts are those mixtures' rounded counts (default: the paper's published mixtures).
    """
    paper = read_paper_name(name)
    if paper is None:
        raise DmoError(
            f"folder {name!r} is not named as the DMO paper names mixture-trained models "
            "(<family>_<size>_<ft>_mixed_<domain>-<n>++<domain>-<n>..., e.g. "
            "qwen2_2b_lora_mixed_general-25600++ocr-76800, optionally _seed<N>): rename it or list the model under "
            "trained: with its mixture"
        )
    if paper.kind == "expert" or (paper.kind == "trained" and len(paper.counts) == 1):
        return None
    if paper.kind != "trained":
        raise DmoError(f"folder {name!r} is a merged proxy, not a model trained on a mixture: move it elsewhere")
    try:
        mixture = paper_mixture(paper.counts, domains, budget, candidates or paper_mixtures(), name)
    except DmoError as exc:
        raise DmoError(str(exc) if repr(name) in str(exc) else f"folder {name!r}: {exc}") from None
    return mixture, paper.seed if paper.seed is not None else 0
