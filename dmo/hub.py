"""Models on the Hugging Face hub: fetched through ``huggingface_hub`` into its cache, once.

``huggingface_hub`` decides where the cache is (``HF_HUB_CACHE``, else ``HF_HOME/hub``) and whether the network may be
used: with ``HF_HUB_OFFLINE=1`` everything is read from the cache and nothing is requested. Every failure (a missing or
private repository, a gated one, a revision that does not exist, a file that is not cached while offline) is one
:class:`HubError` line that names the repository and says what to do.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

from dmo.errors import DmoError

__all__ = ["HubAccessDenied", "HubError", "HubNotCached", "HubRepoNotFound", "fetch", "list_folders", "offline"]


class HubError(DmoError):
    """A hub repository (or a folder in it) that cannot be read."""


class HubRepoNotFound(HubError):
    """The repository, its revision or a folder in it does not exist (or is private and the token cannot see it)."""


class HubAccessDenied(HubError):
    """A gated repository whose terms the token has not accepted."""


class HubNotCached(HubError):
    """Not in the cache, and the hub may not (``HF_HUB_OFFLINE=1``) or cannot be reached."""


def offline() -> bool:
    """Whether ``huggingface_hub`` is in offline mode (``HF_HUB_OFFLINE=1`` when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _where(repo: str, revision: str | None, subfolder: str | None) -> str:
    at = f"@{revision}" if revision else ""
    return f"hub repository {repo}{at}" + (f" (folder {subfolder})" if subfolder else "")


def _cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


@contextlib.contextmanager
def _errors(repo: str, revision: str | None, subfolder: str | None) -> Iterator[None]:
    """``huggingface_hub``'s exceptions as one-line :class:`HubError` messages."""
    from huggingface_hub import errors

    where = _where(repo, revision, subfolder)
    try:
        yield
    except errors.GatedRepoError:
        raise HubAccessDenied(
            f"{where} is gated: accept its terms on huggingface.co and log in with a token that did (hf auth login)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubRepoNotFound(
            f"{where} does not exist or is private: check the name in the manifest, or log in with a token that can "
            "read it (hf auth login)"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubRepoNotFound(f"{where}: no such revision; fix 'revision:' in the manifest") from None
    except errors.HFValidationError:
        raise HubRepoNotFound(f"{where}: not a valid repository id (owner/name)") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        if offline():
            raise HubNotCached(
                f"{where} is not in the hub cache {_cache()} and HF_HUB_OFFLINE=1: fetch it once without "
                "HF_HUB_OFFLINE, or point HF_HUB_CACHE / HF_HOME at the cache that holds it"
            ) from None
        raise HubNotCached(
            f"{where} cannot be reached and is not in the hub cache {_cache()}: check the network connection"
        ) from None
    except errors.EntryNotFoundError:
        raise HubRepoNotFound(f"{where}: the repository has no such folder; fix its name in the manifest") from None
    except errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise HubError(f"{where}: the hub answered HTTP {status}; try again later") from None
    except _connection_errors():
        raise HubNotCached(f"{where} cannot be reached: check the network connection") from None


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What the HTTP library under ``huggingface_hub`` raises when the hub cannot be reached (httpx from 1.0 on,
    requests before; both derive from neither each other nor a common class of the standard library)."""
    out: list[type[BaseException]] = []
    for module, name in (("httpx", "TransportError"), ("requests", "ConnectionError")):
        with contextlib.suppress(ImportError, AttributeError):
            out.append(getattr(importlib.import_module(module), name))
    return tuple(out)


def _snapshot(repo: str, revision: str | None, patterns: list[str] | None, local_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=local_only))


#: folders already fetched (or listed) in this process, by (repository, revision, folder, cache, offline)
_FETCHED: dict[tuple[str, str | None, str | None, str, bool], Path] = {}
_LISTED: dict[tuple[str, str | None, str | None, str, bool], list[str]] = {}


def fetch(repo: str, revision: str | None = None, subfolder: str | None = None) -> Path:
    """The local folder of ``repo`` (or of ``subfolder`` in it) in the hub cache: downloaded the first time, read from
    the cache afterwards (with ``HF_HUB_OFFLINE=1``, only read). Asked of ``huggingface_hub`` once per process."""
    sub = subfolder.strip("/") if subfolder else None
    key = (repo, revision, sub, _cache(), offline())
    if key not in _FETCHED:
        _FETCHED[key] = _fetch(repo, revision, sub)
    return _FETCHED[key]


def _fetch(repo: str, revision: str | None, sub: str | None) -> Path:
    with _errors(repo, revision, sub):
        root = _snapshot(repo, revision, [f"{sub}/*"] if sub else None)
    folder = root / sub if sub else root
    if not folder.is_dir() or not any(folder.iterdir()):
        where = _where(repo, revision, sub)
        if offline():
            raise HubNotCached(
                f"{where} is not in the hub cache {_cache()} and HF_HUB_OFFLINE=1: fetch it once without "
                "HF_HUB_OFFLINE, or fix the folder's name"
            )
        raise HubRepoNotFound(f"{where}: the repository has no such folder; fix the folder's name in the manifest")
    return folder


def list_folders(repo: str, revision: str | None = None, subfolder: str | None = None) -> list[str]:
    """The names of the folders at the top of ``repo`` (or of ``subfolder`` in it): as the hub lists them, or, offline
    or when the hub cannot be reached, as far as the cache holds them. Listed once per process."""
    sub = subfolder.strip("/") if subfolder else None
    key = (repo, revision, sub, _cache(), offline())
    if key not in _LISTED:
        _LISTED[key] = _list_folders(repo, revision, sub)
    return list(_LISTED[key])


def _list_folders(repo: str, revision: str | None, sub: str | None) -> list[str]:
    if not offline():
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFolder

        try:
            with _errors(repo, revision, sub):
                entries = list(HfApi().list_repo_tree(repo, path_in_repo=sub, revision=revision))
            return sorted(Path(e.path).name for e in entries if isinstance(e, RepoFolder))
        except (HubRepoNotFound, HubAccessDenied):
            raise
        except HubError:
            pass  # the hub cannot be reached or fails: list what the cache holds
    with _errors(repo, revision, sub):
        root = _snapshot(repo, revision, [], local_only=True)  # no pattern: only the snapshot's folder, no file
    folder = root / sub if sub else root
    if not folder.is_dir():
        raise HubNotCached(f"{_where(repo, revision, sub)} is not in the hub cache {_cache()}")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
