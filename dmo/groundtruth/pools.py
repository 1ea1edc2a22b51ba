"""A domain's data, read from any format LLaMA-Factory reads for SFT with images or the tiny world's own (sharegpt,
alpaca, dmo), converted to sharegpt ``messages`` + ``images`` (see :mod:`dmo.groundtruth.data_mix` for the formats
and the validation splits).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmo.errors import DmoError
from dmo.mixture import check_domain_name

DATASET_INFO = "dataset_info.json"
#: LLaMA-Factory's image placeholder in message text (``IMAGE_PLACEHOLDER`` in llamafactory.extras.constants).
IMAGE_PLACEHOLDER = "<image>"

#: Source files looked for per domain under a data root, in this order.
_SOURCE_PATTERNS = (
    "domains/{d}.jsonl",  # a dmo data folder (this module's output) is a valid source too
    "{d}/train.jsonl",  # the tiny world's layout: data/<domain>/train.jsonl
    "{d}/train.json",
    "{d}.jsonl",
    "{d}.json",
)
#: Validation sources looked for per domain, in this order (a dmo data folder's own split first).
_VAL_PATTERNS = (
    "validation/{d}.jsonl",
    "{d}/val.jsonl",
    "{d}/val.json",
    "{d}/validation.jsonl",
    "{d}/validation.json",
    "{d}.val.jsonl",
    "{d}.val.json",
)
#: Rows of a validation split that dmo keeps: the DMO paper evaluates during training on ``<dataset>_eval_small``,
#: the first 500 rows of each domain's held-out split (utils/create_jsonl_from_mixture_config.py).
VAL_ROWS = 500
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# --------------------------------------------------------------------------------------------------- sources


@dataclass
class Pool:
    """One domain's rows, converted to sharegpt; ``images`` hold absolute paths until written."""

    domain: str
    source: Path
    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)


def find_sources(root: Path, domains: Sequence[str]) -> dict[str, Path]:
    """The source file of each domain under ``root`` (see ``_SOURCE_PATTERNS``)."""
    root = Path(root)
    if not root.is_dir():
        raise DmoError(f"data folder {root} does not exist: give a folder with one dataset per domain")
    out = {}
    for d in domains:
        path = _first_file(root, d, _SOURCE_PATTERNS)
        if path is None:
            tried = ", ".join(p.format(d=d) for p in _SOURCE_PATTERNS)
            raise DmoError(f"no data for domain {d!r} under {root}: expected one of {tried}")
        out[d] = path
    return out


def _first_file(root: Path, domain: str, patterns: Sequence[str]) -> Path | None:
    check_domain_name(domain)
    return next((root / p.format(d=domain) for p in patterns if (root / p.format(d=domain)).is_file()), None)


def find_val_sources(root: Path, domains: Sequence[str]) -> dict[str, Path]:
    """The validation source of each domain under ``root`` that has one (see ``_VAL_PATTERNS``)."""
    root = Path(root)
    found = {d: _first_file(root, d, _VAL_PATTERNS) for d in domains}
    return {d: path for d, path in found.items() if path is not None}


def discover_domains(root: Path) -> list[str]:
    """Domains present under ``root``: sub-folders with a train file, or ``<domain>.json[l]`` files."""
    root = Path(root)
    if (root / "domains").is_dir() and (root / DATASET_INFO).is_file():
        return sorted(p.stem for p in (root / "domains").glob("*.jsonl"))
    found = set()
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.is_dir() and ((p / "train.jsonl").is_file() or (p / "train.json").is_file()):
            found.add(p.name)
        elif p.is_file() and p.suffix in (".jsonl", ".json") and p.name != DATASET_INFO:
            found.add(p.stem)
    return sorted(d for d in found if valid_domain(d))


def valid_domain(name: str) -> bool:
    try:
        check_domain_name(name)
    except DmoError:
        return False
    return True


def read_pool(path: Path, domain: str, media_dir: Path | None = None) -> Pool:
    """Read and convert one domain's source file; refuse missing images and placeholder mismatches."""
    path = Path(path)
    media = Path(media_dir) if media_dir is not None else path.parent
    raw = _read_rows(path)
    if not raw:
        raise DmoError(f"{path} has no rows: domain {domain!r} needs at least one training example")
    rows = []
    missing: list[str] = []
    for i, rec in enumerate(raw):
        where = f"{path} row {i + 1}"
        row = _convert(rec, where)
        images = []
        for img in row["images"]:
            full = Path(img).expanduser()
            full = full if full.is_absolute() else media / full
            if not full.is_file():
                missing.append(str(full))
            images.append(str(full.resolve()) if full.is_file() else str(full))
        row["images"] = images
        n_ph = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in row["messages"])
        if n_ph != len(images):
            raise DmoError(
                f"{where} has {len(images)} image(s) but {n_ph} {IMAGE_PLACEHOLDER} placeholder(s): "
                f"LLaMA-Factory needs one {IMAGE_PLACEHOLDER} in the text per image"
            )
        rows.append(row)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DmoError(f"domain {domain!r} ({path}) refers to missing image file {missing[0]}{more}: fix the paths")
    return Pool(domain, path, rows)


def _read_rows(path: Path) -> list[Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DmoError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DmoError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
        if not isinstance(data, list):
            raise DmoError(f"{path} must hold a JSON list of examples")
        return data
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DmoError(f"{path} line {n} is not valid JSON: {exc.msg}") from None
    return rows


def _convert(rec: Any, where: str) -> dict[str, Any]:
    """One source row as ``{"messages": [{role, content}...], "images": [...]}``."""
    if not isinstance(rec, dict):
        raise DmoError(f"{where} is not a JSON object")
    images = rec.get("images", rec.get("image"))
    images = [] if images in (None, "", []) else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise DmoError(f"{where}: 'images' must be a list of file paths")
    system = rec.get("system") or ""
    if "question" in rec and "answer" in rec:  # dmo / tiny world
        question = str(rec["question"])
        if images and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER * len(images) + question
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": str(rec["answer"])}]
    elif isinstance(rec.get("messages"), list) or isinstance(rec.get("conversations"), list):
        turns = rec["messages"] if isinstance(rec.get("messages"), list) else rec["conversations"]
        messages = []
        for t in turns:
            if not isinstance(t, dict):
                raise DmoError(f"{where}: every message must be an object with role/content (or from/value)")
            role = t.get("role", t.get("from"))
            content = t.get("content", t.get("value"))
            if role not in _SHAREGPT_ROLES or not isinstance(content, str):
                raise DmoError(
                    f"{where}: message {t!r} needs role user/assistant/system (or from human/gpt/system) and text"
                )
            messages.append({"role": _SHAREGPT_ROLES[role], "content": content})
    elif "instruction" in rec and "output" in rec:  # alpaca
        query = "\n".join(str(x) for x in (rec.get("instruction"), rec.get("input")) if x)
        messages = [{"role": "user", "content": query}, {"role": "assistant", "content": str(rec["output"])}]
    else:
        raise DmoError(
            f"{where}: unknown format (keys {sorted(rec)}): give sharegpt 'messages'/'conversations', alpaca "
            "'instruction'/'output', or dmo 'question'/'answer'"
        )
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    if not roles or len(roles) % 2 or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise DmoError(f"{where}: messages must alternate user/assistant, starting with user and ending with assistant")
    if system:
        messages = [{"role": "system", "content": str(system)}, *messages]
    return {"messages": messages, "images": list(images)}
