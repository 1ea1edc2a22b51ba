"""Training sets of data mixtures, in LLaMA-Factory's dataset format.

A *data folder* is what LLaMA-Factory calls a ``dataset_dir``::

    <out>/dataset_info.json                  one entry per domain pool and per materialised mixture
    <out>/domains/<domain>.jsonl             each domain's pool, converted once (see below)
    <out>/validation/<domain>.jsonl          each domain's held-out validation split, where the source has one
    <out>/mixtures/<name>.jsonl              an exactly mixed training set (strategy "exact")
    <out>/mixtures/<name>.json               what a mixture is: weights, counts, seed, strategy, repeats

``<name>`` is the DMO paper's naming, sample counts per domain joined by ``++`` (``general-25600++ocr-76800``,
domains sorted by name, zero counts left out); :func:`dmo.mixture.from_paper_name` reads it back into weights.

**Sources.** A domain's data is one file, in any of the formats LLaMA-Factory reads for SFT with images or the
tiny world's own: sharegpt (``messages`` with role/content, or ``conversations`` with from/value; optional
``system`` and ``images``), alpaca (``instruction``/``input``/``output``, optional ``system``/``images``), or dmo
(``question``/``answer``/``image``, as ``dmo.tinyworld.data`` writes). Every row becomes sharegpt ``messages``
(role/content) + ``images``, image paths relative to ``<out>`` (LLaMA-Factory resolves them against its
``media_dir``, which defaults to the dataset folder). Relative image paths in a source resolve against the source
file's folder. Every image must exist and every row must hold as many ``<image>`` placeholders as images (the
placeholder is prepended to dmo-format questions), as LLaMA-Factory requires: a source that breaks either is
refused before anything is written.

**Validation splits.** A domain's source may come with a held-out split (``<domain>/val.jsonl``, ``<domain>/val.json``,
``<domain>/validation.jsonl`` or ``<domain>.val.json[l]``, same formats): its first :data:`VAL_ROWS` rows (the DMO
paper's ``_eval_small`` size) become ``validation/<domain>.jsonl``, registered as dataset ``<domain>-val``
(:func:`val_name`; a domain name has no ``-``, so it never collides with a pool or a mixture). ``dmo train`` gives
LLaMA-Factory these splits as its ``eval_dataset``; a source without one is trained without evaluation, as before.

**Strategies.** ``exact`` (the default) takes ``n_i = round(w_i * budget)`` rows of domain ``i``: the first ``n_i``
of a permutation of its pool that depends only on (seed, domain), so a mixture with more of a domain contains every
row of one with less, and the result is shuffled with the same seed. A domain whose pool is smaller than ``n_i`` is
refused unless repeats are allowed; then its pool is repeated whole and the rest drawn without replacement (each
row ``k`` or ``k + 1`` times), and the record and the command say so. ``interleave`` is the DMO paper's way: no new
file, but LLaMA-Factory's ``mix_strategy: interleave_under`` with ``interleave_probs = w`` over the domain pools,
which draws each training sample's domain at random, so the per-domain counts are only *about* ``w_i * budget``
(binomial noise of ``sqrt(budget * w_i * (1 - w_i))`` samples), and sampling stops when the first pool runs out.
Exact counts are the default because the proxy merges experts with exactly the weights ``w``: the ground truth
should be trained on exactly that mixture, so that its noise is the training's, not the sampler's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dmo.atomic import atomic_file, file_lock
from dmo.errors import DmoError
from dmo.groundtruth.pools import (
    DATASET_INFO,
    VAL_ROWS,
    Pool,
    discover_domains,
    find_sources,
    find_val_sources,
    read_pool,
    valid_domain,
)
from dmo.mixture import Mixture, check_domain_name, from_paper_name

Strategy = Literal["exact", "interleave"]
STRATEGIES: tuple[str, ...] = ("exact", "interleave")

#: The dataset_info.json description of every file dmo writes: sharegpt, role/content messages, an image list.
SHAREGPT_ENTRY: dict[str, Any] = {
    "formatting": "sharegpt",
    "columns": {"messages": "messages", "images": "images"},
    "tags": {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
    },
}

# --------------------------------------------------------------------------------------------------- naming


def paper_name(counts: Mapping[str, int]) -> str:
    """The DMO paper's name of a training set: ``general-25600++ocr-76800`` (sorted, zero counts dropped)."""
    parts = [f"{check_domain_name(d)}-{int(n)}" for d, n in sorted(counts.items()) if n > 0]
    if not parts:
        raise DmoError("a mixture needs at least one sample: every domain count is 0")
    return "++".join(parts)


def mixture_name(mixture: Mixture, budget: int) -> str:
    return paper_name(mixture.counts(budget))


def val_name(domain: str) -> str:
    """The dataset_info name of a domain's validation split: ``<domain>-val``."""
    return f"{check_domain_name(domain)}-val"


def read_name(name: str, domains: Sequence[str] | None = None) -> Mixture:
    """A paper name (``general-25600++ocr-76800``) or a mixture id/``a=0.25,b=0.75`` text, as a mixture."""
    if "=" not in name and ("++" in name or _looks_like_counts(name)):
        return from_paper_name(name, domains)
    return Mixture.parse(name, domains)


def _looks_like_counts(name: str) -> bool:
    _, sep, n = name.rpartition("-")
    return bool(sep) and n.isdigit() and "+" not in name and "." not in n


# --------------------------------------------------------------------------------------------------- sampling


@dataclass
class Draw:
    """Which pool rows a mixture takes: indices per domain, and the domains that had to repeat rows."""

    indices: dict[str, np.ndarray]
    repeated: dict[str, dict[str, int]] = field(default_factory=dict)  # domain -> {"pool": n, "requested": m}


def domain_order(seed: int, domain: str, n: int) -> np.ndarray:
    """A permutation of a pool of ``n`` rows that depends only on (seed, domain): nested mixtures share rows."""
    return np.random.default_rng([int(seed), zlib.crc32(domain.encode())]).permutation(n)


def draw(counts: Mapping[str, int], pool_sizes: Mapping[str, int], seed: int, allow_repeats: bool) -> Draw:
    """Rows per domain for exact counts; repeats only where a pool is too small and they are allowed."""
    short = {d: (n, pool_sizes[d]) for d, n in counts.items() if n > pool_sizes[d]}
    if short and not allow_repeats:
        d, (n, have) = next(iter(sorted(short.items())))
        others = f" (and {len(short) - 1} more domain(s))" if len(short) > 1 else ""
        raise DmoError(
            f"the mixture needs {n} samples of {d!r} but its pool has only {have}{others}: lower --budget, or pass "
            "--allow-repeats to repeat rows"
        )
    out = Draw({})
    for d, n in counts.items():
        if n <= 0:
            continue
        order = domain_order(seed, d, pool_sizes[d])
        if n <= len(order):
            out.indices[d] = order[:n]
        else:
            k, rest = divmod(n, len(order))
            out.indices[d] = np.concatenate([np.tile(order, k), order[:rest]])
            out.repeated[d] = {"pool": len(order), "requested": int(n)}
    return out


# --------------------------------------------------------------------------------------------------- data folder


@dataclass
class MixRecord:
    """What a materialised (or interleaved) mixture is; stored as ``mixtures/<name>[.interleave].json``."""

    name: str
    mixture: str
    weights: dict[str, float]
    budget: int
    counts: dict[str, int]
    seed: int
    strategy: str
    repeated: dict[str, dict[str, int]] = field(default_factory=dict)
    #: the LLaMA-Factory keys that train on this mixture (dataset, and mix_strategy/interleave_probs)
    llamafactory: dict[str, Any] = field(default_factory=dict)

    def notes(self) -> list[str]:
        out = []
        if self.strategy != "exact" and self.repeated:
            total = sum(self.counts.values())
            stop = min(r["pool"] * total / self.counts[d] for d, r in self.repeated.items())
            small = ", ".join(
                f"{d!r} has {r['pool']} rows for about {r['requested']}" for d, r in self.repeated.items()
            )
            return [
                f"{self.name}: {small}: interleave_under stops after about {stop:.0f} of {self.budget} samples and "
                "training repeats that epoch to reach its steps"
            ]
        for d, r in sorted(self.repeated.items()):
            out.append(
                f"{self.name}: domain {d!r} has {r['pool']} rows but the mixture needs {r['requested']}: "
                f"rows repeated ({r['requested'] / r['pool']:.2f}x on average)"
            )
        return out


class DataFolder:
    """A LLaMA-Factory dataset folder managed by dmo (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    @property
    def info_path(self) -> Path:
        return self.root / DATASET_INFO

    def info(self) -> dict[str, Any]:
        if not self.info_path.is_file():
            return {}
        try:
            data = json.loads(self.info_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DmoError(f"corrupt {self.info_path}: {exc}; remove the folder and run 'dmo data mix' again") from None
        if not isinstance(data, dict):
            raise DmoError(f"corrupt {self.info_path}: expected a JSON object")
        return data

    def is_dmo(self) -> bool:
        return (self.root / "domains").is_dir() and self.info_path.is_file()

    def domains(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "domains").glob("*.jsonl"))

    def pool_path(self, domain: str) -> Path:
        return self.root / "domains" / f"{check_domain_name(domain)}.jsonl"

    def val_path(self, domain: str) -> Path:
        return self.root / "validation" / f"{check_domain_name(domain)}.jsonl"

    def val_domains(self) -> list[str]:
        """Domains with a validation split in this folder (``validation/<domain>.jsonl``)."""
        return sorted(p.stem for p in (self.root / "validation").glob("*.jsonl") if valid_domain(p.stem))

    def record_path(self, name: str, strategy: str) -> Path:
        return self.root / "mixtures" / (f"{name}.json" if strategy == "exact" else f"{name}.{strategy}.json")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers of this folder (dataset_info.json is read-modify-written)."""
        with file_lock(self.root / ".dmo-data.lock"):
            yield

    def pool_sizes(self, domains: Sequence[str]) -> dict[str, int]:
        sizes = {}
        for d in domains:
            path = self.pool_path(d)
            if not path.is_file():
                raise DmoError(
                    f"data folder {self.root} has no pool for domain {d!r}: run 'dmo data mix' with its data"
                )
            with open(path, "rb") as fh:
                sizes[d] = sum(1 for line in fh if line.strip())
        return sizes

    def read_pool_lines(self, domain: str) -> list[str]:
        return [ln for ln in self.pool_path(domain).read_text().splitlines() if ln.strip()]

    # ---------------------------------------------------------------- writing

    def add_pools(self, pools: Sequence[Pool], split: Literal["train", "val"] = "train") -> list[str]:
        """Write each pool (unless the same bytes are there already); returns the domains written.

        ``split="val"`` writes validation splits (their first :data:`VAL_ROWS` rows) instead of training pools.
        """
        written = []
        path_of = self.pool_path if split == "train" else self.val_path
        texts = {p.domain: self._pool_text(p, VAL_ROWS if split == "val" else None) for p in pools}
        for d, text in texts.items():
            path = path_of(d)
            if path.is_file():
                if path.read_text() == text:
                    continue
                raise DmoError(
                    f"{path} was made from other data than {next(p.source for p in pools if p.domain == d)}: "
                    "write to a new --out folder (mixtures made from the old pool would no longer match)"
                )
        for d, text in texts.items():
            path = path_of(d)
            if not path.is_file():
                with atomic_file(path) as fh:
                    fh.write(text)
                written.append(d)
        return written

    def _pool_text(self, pool: Pool, limit: int | None = None) -> str:
        lines = []
        for row in pool.rows[:limit]:
            images = [os.path.relpath(p, self.root) for p in row["images"]]
            lines.append(json.dumps({"messages": row["messages"], "images": images}, ensure_ascii=False))
        return "\n".join(lines) + "\n"

    def update_info(self, entries: Mapping[str, dict[str, Any]]) -> None:
        info = self.info()
        info.update(entries)
        with atomic_file(self.info_path) as fh:
            fh.write(json.dumps(info, indent=2, sort_keys=True) + "\n")

    def plan_mix(
        self,
        mixture: Mixture,
        budget: int,
        sizes: Mapping[str, int],
        *,
        seed: int = 0,
        strategy: Strategy = "exact",
        allow_repeats: bool = False,
        overwrite: bool = False,
    ) -> tuple[MixRecord, Draw | None]:
        """What :meth:`write_mix` will write for one mixture; refuses before anything is written."""
        if strategy not in STRATEGIES:
            raise DmoError(f"unknown mixing strategy {strategy!r}: choose exact or interleave")
        if budget < 1:
            raise DmoError(f"budget must be a positive number of samples, got {budget}")
        counts = {d: n for d, n in mixture.counts(budget).items() if n > 0}
        name = paper_name(counts)
        picked: Draw | None = None
        short: dict[str, dict[str, int]] = {}
        if strategy == "exact":
            picked = draw(counts, sizes, seed, allow_repeats)
            lf: dict[str, Any] = {"dataset": name}
        else:
            doms = sorted(counts)
            # interleave_under stops at the first exhausted pool; say so when that comes before the budget
            short = {d: {"pool": int(sizes[d]), "requested": n} for d, n in counts.items() if n > sizes[d]}
            # The paper's interleave_probs are the mixture's weights themselves (scripts/simple/train_mixed.sh), and
            # datasets' sampler refuses probabilities that do not sum to 1 within 1.5e-8: so the weights of the
            # domains used, renormalised, at full precision (0.25, not 0.250000; 0.3247, not the count's 0.324697).
            kept = math.fsum(mixture[d] for d in doms)
            lf = {
                "dataset": ",".join(doms),
                "mix_strategy": "interleave_under",
                "interleave_probs": ",".join(repr(mixture[d] / kept) for d in doms),
            }
        record = MixRecord(
            name=name,
            mixture=mixture.id,
            weights=mixture.as_dict(),
            budget=budget,
            counts=counts,
            seed=seed,
            strategy=strategy,
            repeated=picked.repeated if picked is not None else short,
            llamafactory=lf,
        )
        rec_path = self.record_path(name, strategy)
        if rec_path.is_file() and not overwrite:
            try:
                old = json.loads(rec_path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != asdict(record):
                seed_text = f" (seed {old.get('seed')})" if isinstance(old, dict) else ""
                raise DmoError(
                    f"{rec_path} already describes {name} with other settings{seed_text}: pass --overwrite or use "
                    "another --out folder"
                )
        return record, picked

    def write_mix(self, record: MixRecord, picked: Draw | None) -> None:
        rec_path = self.record_path(record.name, record.strategy)
        if picked is not None:
            data_path = self.root / "mixtures" / f"{record.name}.jsonl"
            if not (rec_path.is_file() and data_path.is_file() and json.loads(rec_path.read_text()) == asdict(record)):
                lines = {d: self.read_pool_lines(d) for d in picked.indices}
                rows = [lines[d][i] for d in sorted(picked.indices) for i in picked.indices[d]]
                order = np.random.default_rng([int(record.seed), 0x6D6978]).permutation(len(rows))
                with atomic_file(data_path) as fh:
                    fh.write("\n".join(rows[i] for i in order) + "\n")
            if record.name not in self.info():
                self.update_info({record.name: {"file_name": f"mixtures/{record.name}.jsonl", **SHAREGPT_ENTRY}})
        with atomic_file(rec_path) as fh:
            fh.write(json.dumps(asdict(record), indent=2, sort_keys=True) + "\n")


def source_pools(
    source: Path, domains: Sequence[str], media_dir: Path | None
) -> tuple[dict[str, Pool] | None, dict[str, int]]:
    """Read (and check) the domains' pools from ``source``: (pools, sizes); pools is None for a dmo folder."""
    src = DataFolder(source)
    if src.is_dmo():
        return None, src.pool_sizes(domains)
    pools = {d: read_pool(p, d, media_dir) for d, p in find_sources(source, domains).items()}
    return pools, {d: len(p) for d, p in pools.items()}


def source_val_pools(source: Path, domains: Sequence[str], media_dir: Path | None) -> dict[str, Pool]:
    """Read (and check) the validation splits that ``source`` has for ``domains`` (see the module docstring)."""
    src = DataFolder(source)
    media = src.root if src.is_dmo() else media_dir
    return {d: read_pool(p, d, media) for d, p in find_val_sources(Path(source), domains).items()}


def prepare(
    source: Path,
    out: Path,
    domains: Sequence[str] | None = None,
    media_dir: Path | None = None,
    pools: Mapping[str, Pool] | None = None,
    val_pools: Mapping[str, Pool] | None = None,
) -> DataFolder:
    """Make ``out`` a dmo data folder holding the pools of ``domains`` read from ``source``, and their validation
    splits where ``source`` has them.

    Everything is read and checked before anything is written. ``source`` may itself be a dmo data folder.
    """
    source, folder = Path(source), DataFolder(out)
    src = DataFolder(source)
    if domains is None:
        domains = src.domains() if src.is_dmo() else discover_domains(source)
        if not domains:
            raise DmoError(
                f"found no domain datasets under {source}: expected <domain>/train.jsonl or <domain>.json[l] files"
            )
    if src.is_dmo() and src.root == folder.root:
        missing = [d for d in domains if not folder.pool_path(d).is_file()]
        if missing:
            raise DmoError(f"data folder {folder.root} has no pool for domain {missing[0]!r}: run 'dmo data mix' first")
        return folder
    if pools is None:
        media = src.root if src.is_dmo() else media_dir
        pools = {d: read_pool(p, d, media) for d, p in find_sources(source, domains).items()}
    if val_pools is None:
        val_pools = source_val_pools(source, domains, media_dir)
    with folder.locked():
        written = folder.add_pools([pools[d] for d in domains])
        folder.add_pools([val_pools[d] for d in domains if d in val_pools], split="val")
        info = folder.info()
        entries = {d: {"file_name": f"domains/{d}.jsonl", **SHAREGPT_ENTRY} for d in domains}
        entries.update(
            {val_name(d): {"file_name": f"validation/{d}.jsonl", **SHAREGPT_ENTRY} for d in domains if d in val_pools}
        )
        if written or any(name not in info for name in entries):
            folder.update_info(entries)
    return folder


def mix(
    source: Path,
    out: Path,
    mixtures: Sequence[Mixture],
    budget: int,
    *,
    seed: int = 0,
    strategy: Strategy = "exact",
    allow_repeats: bool = False,
    overwrite: bool = False,
    media_dir: Path | None = None,
) -> list[MixRecord]:
    """``dmo data mix``: convert the domains the mixtures use, then materialise or describe each mixture.

    Every mixture is checked (sources, images, pool sizes, existing records) before any file is written.
    """
    if not mixtures:
        raise DmoError("no mixtures given: pass --mixture general=0.25,ocr=0.75 (repeatable) or --space FILE")
    if budget < 1:
        raise DmoError(f"budget must be a positive number of samples, got {budget}")
    domains = sorted({d for m in mixtures for d, n in m.counts(budget).items() if n > 0})
    if not domains:
        raise DmoError(f"every mixture rounds to 0 samples at budget {budget}: raise --budget")
    pools, sizes = source_pools(Path(source), domains, media_dir)
    val_pools = source_val_pools(Path(source), domains, media_dir)
    folder = DataFolder(out)
    plans = [
        folder.plan_mix(
            m, budget, sizes, seed=seed, strategy=strategy, allow_repeats=allow_repeats, overwrite=overwrite
        )
        for m in mixtures
    ]
    folder = prepare(Path(source), out, domains, media_dir, pools, val_pools)
    with folder.locked():
        for record, picked in plans:
            folder.write_mix(record, picked)
    return [record for record, _ in plans]
