"""Hugging Face checkpoints on disk, read and written tensor by tensor without loading them.

:class:`Checkpoint` opens a model folder (``model.safetensors``, or shards listed in
``model.safetensors.index.json``), validates every header against the file sizes (a truncated download is named
with its first incomplete tensor) and hands out zero-copy views of the memory-mapped tensors. :class:`ShardWriter`
plans the output shards up front (names, dtypes, shapes and offsets are known before any data is computed), writes
the headers, reserves the space, and takes tensor data in any order through ``pwrite``, so that no shard is ever
held in memory. ``.bin`` checkpoints are refused unless asked for (then read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import shutil
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmo.errors import DmoError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
#: Largest safetensors header dmo accepts (the format's own limit is 100 MB).
MAX_HEADER = 100_000_000

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
#: Files of a model folder that are weights (never copied into a merged model) or not wanted there.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
NOT_COPIED = {SAFE_INDEX, BIN_INDEX, "README.md", ".gitattributes"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``start`` is its absolute byte offset in ``file`` (-1 for ``.bin`` checkpoints)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors header: ``({name: TensorInfo}, metadata)``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise DmoError(f"corrupt {path}: {size} bytes is too short for a safetensors file; re-copy it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise DmoError(
                    f"corrupt or truncated {path}: its header claims {n} bytes but the file has {size}; re-copy it"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise DmoError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise DmoError(f"corrupt {path}: the safetensors header is not valid JSON ({exc}); re-copy it") from exc
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DmoError(f"corrupt {path}: tensor {name} has a bad header entry {entry!r}") from exc
        info = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
        expected = info.numel * (torch.finfo(dtype).bits if dtype.is_floating_point else _bits(dtype)) // 8
        if end < begin or end - begin != expected or any(d < 0 for d in shape):
            raise DmoError(f"corrupt {path}: tensor {name} has {end - begin} bytes for shape {list(shape)} {dtype}")
        if end > data_size:
            raise DmoError(
                f"truncated {path}: tensor {name} ends at byte {data_start + end} but the file has {size} bytes; "
                "the download or copy is incomplete, re-copy it"
            )
        tensors[name] = info
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _bits(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.bool else torch.iinfo(dtype).bits


class Checkpoint:
    """A model folder's tensors, memory-mapped on first use. Use as a context manager or call :meth:`close`."""

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo], *, what: str, bin_state: dict | None = None):
        self.folder = folder
        self.tensors = tensors
        self.what = what
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: dict[Path, int] = {}
        self._bin = bin_state

    # ------------------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, folder: str | os.PathLike[str], *, what: str = "model", allow_bin: bool = False) -> Checkpoint:
        """Open a folder holding ``model.safetensors`` or an indexed set of safetensors shards.

        ``what`` names the folder in error messages (e.g. ``"expert 'ocr'"``).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise DmoError(f"{what} folder {folder} does not exist or is not a folder")
        index = folder / SAFE_INDEX
        if index.is_file():
            return cls(folder, _open_indexed(index, what), what=what)
        if (folder / SAFE_SINGLE).is_file():
            return cls(folder, read_header(folder / SAFE_SINGLE)[0], what=what)
        shards = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
        if shards:
            tensors: dict[str, TensorInfo] = {}
            for shard in shards:
                _add_unique(tensors, read_header(shard)[0], shard)
            return cls(folder, tensors, what=what)
        bins = [p for p in (folder / BIN_INDEX, folder / BIN_SINGLE) if p.is_file()]
        if bins:
            if not allow_bin:
                raise DmoError(
                    f"{what} {folder} has only PyTorch .bin weights: re-save it with safe_serialization=True, or "
                    "pass --allow-bin to read them with torch.load(weights_only=True)"
                )
            return cls._open_bin(folder, bins[0], what)
        if (folder / "adapter_config.json").is_file():
            raise DmoError(f"{what} {folder} is a LoRA adapter, not a full model checkpoint")
        raise DmoError(f"{what} {folder} holds no model.safetensors or {SAFE_INDEX}: is it a model folder?")

    @classmethod
    def _open_bin(cls, folder: Path, path: Path, what: str) -> Checkpoint:
        files = [path]
        if path.name == BIN_INDEX:
            weight_map = _read_index(path)
            files = sorted({folder / f for f in weight_map.values()})
        state: dict[str, Tensor] = {}
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            try:
                loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for truncated or malicious pickles
                raise DmoError(f"cannot read {file}: {exc}; re-copy it or convert it to safetensors") from exc
            for name, t in loaded.items():
                if not isinstance(t, Tensor):
                    continue
                info = TensorInfo(name, file, t.dtype, tuple(t.shape), -1, t.numel() * t.element_size())
                _add_unique(tensors, {name: info}, file)
                state[name] = t
        return cls(folder, tensors, what=what, bin_state=state)

    # ------------------------------------------------------------------------------------------------ reading

    def view(self, name: str) -> Tensor:
        """The tensor as a read-only view of the memory map (no data is read until it is touched)."""
        info = self.tensors[name]
        if self._bin is not None:
            return self._bin[name]
        buf = self._map(info.file)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer": dmo never writes through these views
            flat = torch.frombuffer(buf, dtype=torch.uint8, count=info.nbytes, offset=info.start)
        return flat.view(info.dtype).reshape(info.shape)

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    # larger read-ahead on the file, not MADV_SEQUENTIAL on the map: with that the kernel may drop
                    # the pages right after use, which makes the next merge of the same experts cold
                    with contextlib.suppress(OSError, AttributeError):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                finally:
                    os.close(fd)
            except (OSError, ValueError) as exc:
                raise DmoError(f"cannot map {path}: {exc}") from exc
            self._maps[path] = m
        return m

    def advise(self, name: str, begin: int, end: int, advice: int) -> None:
        """``madvise`` the byte range ``[begin, end)`` of tensor ``name`` (no-op for ``.bin``; raises OSError)."""
        if self._bin is not None:
            return
        info = self.tensors[name]
        m = self._map(info.file)
        lo = (info.start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(info.start + end, len(m))
        if hi > lo:
            m.madvise(advice, lo, hi - lo)

    def close(self) -> None:
        for m in self._maps.values():
            with contextlib.suppress(BufferError):  # a live view still points into it; the GC unmaps it later
                m.close()
        self._maps.clear()
        self._bin = None if self._bin is None else {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _read_index(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise DmoError(f"corrupt {path}: {exc}; re-copy it") from exc
    return {str(k): str(v) for k, v in weight_map.items()}


def _open_indexed(index: Path, what: str) -> dict[str, TensorInfo]:
    weight_map = _read_index(index)
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    tensors: dict[str, TensorInfo] = {}
    for file, names in sorted(by_file.items()):
        path = index.parent / file
        if Path(file).name != file or not path.is_file():
            raise DmoError(f"{what}: {index} lists tensor {names[0]} in {path}, which is missing; re-copy the model")
        found = read_header(path)[0]
        for name in names:
            if name not in found:
                raise DmoError(f"corrupt {path}: {index} lists tensor {name} in it but the file has no such tensor")
        _add_unique(tensors, {n: found[n] for n in names}, path)
    return tensors


def _add_unique(into: dict[str, TensorInfo], new: Mapping[str, TensorInfo], path: Path) -> None:
    for name, info in new.items():
        if name in into:
            raise DmoError(f"tensor {name} is stored twice, in {into[name].file} and {path}; remove one copy")
        into[name] = info


def copy_side_files(base: Path, out: Path) -> list[str]:
    """Copy the base's config, tokenizer, processor and other non-weight files (top level only)."""
    copied = []
    for path in sorted(base.iterdir()):
        if not path.is_file() or path.name in NOT_COPIED or path.name.startswith("."):
            continue
        if path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, out / path.name)
        copied.append(path.name)
    return copied


def set_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """Record a new storage dtype in ``config.json`` (``dtype`` and/or ``torch_dtype``, whichever it has)."""
    path = folder / "config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int


@dataclass
class _Shard:
    name: str
    tensors: list[OutTensor]
    size: int
    header: bytes


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class ShardWriter:
    """Output shards planned from ``(name, dtype, shape)`` in order; tensors keep that order within a shard
    except that wider dtypes come first (so every tensor is aligned to its element size).

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``. :meth:`open` creates the files with their headers and reserves their full
    size (a full disk fails here, before any work); :meth:`write` takes bytes at any offset from any thread.
    """

    def __init__(
        self,
        folder: Path,
        tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        *,
        max_shard_size: int,
        metadata: Mapping[str, str] | None = None,
    ):
        if max_shard_size <= 0:
            raise DmoError(f"max shard size must be positive, got {max_shard_size}")
        self.folder = folder
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in tensors:
            n = _itemsize(dtype)
            for d in shape:
                n *= d
            if groups[-1] and size + n > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append((name, dtype, tuple(shape), n))
            size += n
        header_meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        total = len(groups)
        self.shards: list[_Shard] = []
        self.by_name: dict[str, OutTensor] = {}
        for i, group in enumerate(groups):
            file = SAFE_SINGLE if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            order = sorted(range(len(group)), key=lambda j: (-_itemsize(group[j][1]), j))
            entries: dict[str, Any] = {"__metadata__": header_meta}
            offset = 0
            for j in order:
                name, dtype, shape, n = group[j]
                entries[name] = {
                    "dtype": DTYPE_NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + n],
                }
                offset += n
            raw = json.dumps(entries, separators=(",", ":")).encode()
            raw += b" " * (-(len(raw)) % 8)
            header = struct.pack("<Q", len(raw)) + raw
            outs = []
            for name, meta in entries.items():
                if name == "__metadata__":
                    continue
                begin, end = meta["data_offsets"]
                out = OutTensor(name, DTYPES[meta["dtype"]], tuple(meta["shape"]), i, len(header) + begin, end - begin)
                outs.append(out)
                self.by_name[name] = out
            self.shards.append(_Shard(file, outs, len(header) + offset, header))
        self._fds: list[int] = []

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def order(self) -> Iterator[OutTensor]:
        """Tensors in file order (shard by shard, offset by offset): the order to compute them in."""
        for shard in self.shards:
            yield from shard.tensors

    def open(self) -> None:
        for shard in self.shards:
            path = self.folder / shard.name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except OSError as exc:
                raise write_error(exc, path, None) from exc
            self._fds.append(fd)
            try:
                _reserve(fd, shard.size)
                self.write_at(len(self._fds) - 1, shard.header, 0, None)
            except OSError as exc:
                raise write_error(exc, path, None) from exc

    def write(self, out: OutTensor, data: memoryview | bytes, begin: int = 0) -> None:
        """Write ``data`` at byte ``begin`` of tensor ``out``."""
        self.write_at(out.shard, data, out.offset + begin, out.name)

    def write_at(self, shard: int, data: memoryview | bytes, offset: int, tensor: str | None) -> None:
        fd = self._fds[shard]
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                n = pwrite(fd, view[done:], offset + done)
            except OSError as exc:
                raise write_error(exc, self.folder / self.shards[shard].name, tensor) from exc
            if n <= 0:
                raise write_error(OSError(errno.EIO, "short write"), self.folder / self.shards[shard].name, tensor)
            done += n

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def finish(self, fsync: bool = False) -> None:
        """Close the shards (after an optional fsync) and write the index when there are several."""
        try:
            if fsync:
                for fd in self._fds:
                    os.fsync(fd)
        except OSError as exc:
            raise write_error(exc, self.folder, None) from exc
        finally:
            self.close()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in self.by_name.values())},
                "weight_map": {t.name: self.shards[t.shard].name for t in sorted(self.by_name.values(), key=_key)},
            }
            try:
                (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            except OSError as exc:
                raise write_error(exc, self.folder / SAFE_INDEX, None) from exc


def _key(t: OutTensor) -> str:
    return t.name


def pwrite(fd: int, data: memoryview, offset: int) -> int:
    """``os.pwrite`` (a module-level function so that tests can make the disk "full")."""
    return os.pwrite(fd, data, offset)


def _reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes now, so that a full disk fails before the merge starts (best effort)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)
    except AttributeError:  # not on this platform
        os.ftruncate(fd, size)


def write_error(exc: OSError, path: Path, tensor: str | None) -> DmoError:
    what = f"tensor {tensor} to {path}" if tensor else str(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DmoError(f"no space left on device while writing {what}: free some disk space (or choose another --out) "
                        "and re-run; nothing was left behind")  # fmt: skip
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DmoError(f"cannot write {what}: permission denied; choose another output folder")
    return DmoError(f"cannot write {what}: {exc.strerror or exc}")
