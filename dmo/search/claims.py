"""One evaluation per proxy across workers: an exclusive claim on scoring it (see :mod:`dmo.search.study`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from dmo.atomic import explain_os_error
from dmo.results import cache_key
from dmo.scoring.base import Scorer, Target

__all__ = ["claim_key", "scoring_claim"]


def claim_key(scorer: Scorer, target: Target) -> str:
    """Names one scoring of one proxy: the model's fingerprint and the scorer's settings."""
    return cache_key(model=scorer.fingerprint(target), claim="score", **scorer.settings())


@contextlib.contextmanager
def scoring_claim(folder: Path, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the exclusive claim on scoring proxy ``key``; wait (calling ``on_wait`` once) while another holds it.

    An ``flock`` on ``folder/.claims/<key>.lock``: the kernel releases it when its holder exits or is killed,
    so a dead holder's claim passes to the next waiter at once. Lock files are left in place (deleting one
    while another process waits on it would let a third take a second lock).
    """
    path = folder / ".claims" / f"{key}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise explain_os_error(exc, path) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------- the ledger
