"""Write files and folders so that a crash or a full disk never leaves half an output behind.

Everything is written under a temporary name in the destination's own folder (same filesystem, so the
final ``os.replace`` is atomic) and renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dmo.errors import DmoError


def explain_os_error(exc: OSError, target: Path) -> DmoError:
    if exc.errno == errno.ENOSPC:
        return DmoError(f"no space left on device while writing {target}: free some disk space and re-run")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DmoError(f"cannot write {target}: permission denied; choose another output folder")
    return DmoError(f"cannot write {target}: {exc.strerror or exc}")


def _umask() -> int:
    # mkstemp/mkdtemp create 0600/0700 entries; outputs (reports, tables, merged models) are meant to be shared,
    # so they get the mode a plain open()/mkdir() would give. Linux shows the umask without changing it.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError as exc:
        raise explain_os_error(exc, target) from exc
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise explain_os_error(exc, target) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_file(target, "w") as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` when the block exits without error."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise DmoError(f"output folder {target} already exists: remove it or pass --overwrite")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        tmp.chmod(0o777 & ~_umask())
    except OSError as exc:
        raise explain_os_error(exc, target) from exc
    try:
        yield tmp
        replace_dir(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise explain_os_error(exc, target) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(lock: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (created if missing); the kernel drops it if the process dies."""
    lock = Path(lock)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock, "a")
    except OSError as exc:
        raise explain_os_error(exc, lock) from exc
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def replace_dir(src: Path, target: Path) -> None:
    """Move folder ``src`` to ``target``, replacing a folder there: the old one is renamed away first, so that at
    every moment ``target`` is either the old folder or the new one, never half of each."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)
