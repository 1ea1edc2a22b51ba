"""The results table: one tidy row per (model, benchmark) score, shared by every dmo command.

Stored as JSON lines (``scores.jsonl``) because many processes append to it at once: each row is one
``write`` of one line under an exclusive ``flock``, fsynced, so a crashed writer can at worst leave a torn
last line, which readers skip. Reading gives a pandas DataFrame with one ``w_<domain>`` column per domain.

The table doubles as the score cache: a row's ``key`` hashes everything that determines the score
(model fingerprint, benchmark, limit, generation settings, scorer version); a key already present with
``status == "ok"`` is never evaluated again.

A proxy scored on part of a benchmark's items (a stage of a study with ``scoring.stages``, see
:mod:`dmo.scoring.items`) gets a row with ``status == "partial"``: its ``items`` say how many items it covers, of
``items_total``. Such a row is never a cached score, and every reader that keeps ``status == "ok"`` rows (correlate,
compare, the report, calibration) leaves it out; :func:`partial_as_scores` is how a reader is told otherwise.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dmo.atomic import explain_os_error
from dmo.errors import DmoError

if TYPE_CHECKING:  # pandas is imported when a table is read (~0.3 s that 'dmo --help' need not pay)
    import pandas as pd

Kind = Literal["proxy", "trained", "expert", "base"]
KINDS: tuple[str, ...] = ("proxy", "trained", "expert", "base")
#: The columns of a read table besides the ``w_<domain>`` weights (which come after ``mixture``), with their meaning
#: (the documentation's results-table reference is rendered from this).
COLUMNS: dict[str, str] = {
    "kind": "what was scored: proxy (a merged model), trained (a model trained on the mixture), expert or base",
    "group": "the name of the space the row was scored for (dmo ingest: --group, else the space's name)",
    "mixture": "canonical mixture id such as general-0.25+ocr-0.75; an expert's domain; base",
    "method": "the merge method of a proxy (empty for other kinds)",
    "seed": "the training seed of a trained model (empty for other kinds)",
    "benchmark": "the benchmark: an lmms-eval task, <task>/<sub-score>, or loss:<domain>",
    "metric": "the result key the score was read from (see the metric map)",
    "score": "the score in [0, 1], higher is better (empty when the row failed)",
    "status": "ok, failed, or partial (a staged score over a prefix of the benchmark's items: never a full score)",
    "error": "the one-line reason of a failed row",
    "source": "what produced the score: the scoring backend's name, or the ingested file",
    "fingerprint": "what identifies the scored weights",
    "key": "the cache key: a hash of everything that determines the score; an ok row with this key is never "
    "scored again",
    "seconds": "time taken to score it",
    "time": "when the row was written (UTC, ISO 8601)",
    "items": "items of the benchmark the score covers (empty: scored in full without item scores)",
    "items_total": "items of the benchmark in all (empty: scored in full without item scores)",
}
BASE_COLUMNS = list(COLUMNS)


@dataclass
class ScoreRow:
    kind: Kind
    mixture: str
    benchmark: str
    score: float | None
    metric: str = ""
    weights: dict[str, float] = field(default_factory=dict)
    group: str = ""
    method: str = ""
    seed: int | None = None
    status: Literal["ok", "failed", "partial"] = "ok"
    error: str = ""
    source: str = ""
    fingerprint: str = ""
    key: str = ""
    seconds: float | None = None
    #: items of the benchmark this score covers, of ``items_total`` (None: scored in full, without item scores)
    items: int | None = None
    items_total: int | None = None
    time: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DmoError(f"result kind must be one of {KINDS}, got {self.kind!r}")
        partial = self.items is not None and self.items_total is not None and self.items < self.items_total
        if partial != (self.status == "partial") and self.status != "failed":
            raise DmoError(
                f"a score of {self.mixture} on {self.benchmark} over {self.items} of {self.items_total} items must "
                f"have status {'partial' if partial else 'ok'}, not {self.status!r}"
            )


def cache_key(**parts: Any) -> str:
    """A stable hash of everything that determines a score."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class ResultsTable:
    """Append-only, multi-process-safe score table at ``path`` (a ``.jsonl`` file)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self, mode: str) -> Iterator[Any]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, mode)
        except OSError as exc:
            raise explain_os_error(exc, self.path) from exc
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX if "a" in mode else fcntl.LOCK_SH)
            yield fh
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    def append(self, rows: Iterable[ScoreRow]) -> None:
        self.append_records(asdict(r) for r in rows)

    def append_records(self, records: Iterable[dict[str, Any]]) -> None:
        """Append plain JSON records (rows of another table kept the same way, e.g. per-item scores)."""
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        if not lines:
            return
        with self._locked("a") as fh:
            fd = fh.fileno()
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                # A torn line from a crashed writer must not swallow our first row.
                if start > 0:
                    with open(self.path, "rb") as rd:
                        rd.seek(-1, os.SEEK_END)
                        if rd.read(1) != b"\n":
                            lines = "\n" + lines
                # Unbuffered, so that a failed write leaves nothing behind to be flushed again at close.
                data = memoryview(lines.encode())
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            except OSError as exc:
                # A full disk must not leave half a row: cut the file back to what it was (we hold the lock).
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise explain_os_error(exc, self.path) from exc

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        with self._locked("r") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn line of a writer that died mid-write
                if isinstance(rec, dict) and "kind" in rec:
                    out.append(rec)
        return out

    def cached(self, key: str) -> dict[str, Any] | None:
        """The newest successful row with this cache key, if any."""
        hit = None
        for rec in self.records():
            if rec.get("key") == key and rec.get("status") == "ok":
                hit = rec
        return hit

    def cached_keys(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r for r in self.records() if r.get("status") == "ok" and r.get("key")}

    def frame(self, latest: bool = True) -> pd.DataFrame:
        """All rows as a DataFrame; with ``latest``, only the newest row per (key or model, benchmark)."""
        return to_frame(self.records(), latest=latest)


def to_frame(records: list[dict[str, Any]], latest: bool = True) -> pd.DataFrame:
    import pandas as pd

    if not records:
        return pd.DataFrame(columns=BASE_COLUMNS)
    flat = []
    for rec in records:
        row = {k: v for k, v in rec.items() if k != "weights"}
        for d, w in (rec.get("weights") or {}).items():
            row[f"w_{d}"] = w
        flat.append(row)
    df = pd.DataFrame(flat)
    for col in BASE_COLUMNS:
        if col not in df:
            df[col] = None
    df["seed"] = df["seed"].astype("Int64")
    if latest and len(df):
        has_key = df["key"].fillna("").astype(str).str.len() > 0
        seed = df["seed"].map(lambda v: "" if pd.isna(v) else str(int(v)))
        ident = df["key"].where(has_key, df["kind"] + "|" + df["mixture"] + "|" + seed)
        df = df.assign(_id=ident)
        # a partial score never hides the full one of the same model and benchmark, whichever came last
        full = set(zip(df["_id"][df["status"] == "ok"], df["benchmark"][df["status"] == "ok"]))
        stale = (df["status"] == "partial") & pd.Series(
            [k in full for k in zip(df["_id"], df["benchmark"])], index=df.index
        )
        df = df[~stale].drop_duplicates(subset=["_id", "benchmark"], keep="last").drop(columns="_id")
    weight_cols = sorted(c for c in df.columns if c.startswith("w_"))
    rest = [c for c in df.columns if c not in BASE_COLUMNS and c not in weight_cols]
    return df[BASE_COLUMNS[:3] + weight_cols + BASE_COLUMNS[3:] + rest].reset_index(drop=True)


def partial_as_scores(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The frame with its partial rows (proxies scored on part of their items) counted as scores, for a reader told
    to use them; and how many there were. A full row of the same model and benchmark wins over a partial one."""
    partial = df["status"] == "partial"
    if not partial.any():
        return df, 0
    import pandas as pd

    seed = df["seed"].map(lambda v: "" if pd.isna(v) else str(int(v)))
    ident = df["kind"].astype(str) + "|" + df["mixture"].astype(str) + "|" + seed + "|" + df["benchmark"].astype(str)
    full = set(ident[df["status"] == "ok"])
    use = partial & ~ident.isin(full)
    out = df.copy()
    out.loc[use, "status"] = "ok"
    return out, int(use.sum())


def partial_rows(df: pd.DataFrame) -> int:
    """How many (model, benchmark) scores of the frame cover only part of their items (left out as partial)."""
    return int((df["status"] == "partial").sum()) if "status" in df else 0
