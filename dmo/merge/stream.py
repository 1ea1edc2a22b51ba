"""Streaming dense merges of whole checkpoints: ``theta_base + merge(theta_i - theta_base)``, tensor by tensor.

:func:`merge_checkpoints` reads the base and the experts (full safetensors checkpoints and/or PEFT LoRA adapters)
through memory maps, merges every tensor in float32 and writes the result as (sharded) safetensors with the base's
config, tokenizer and processor files, atomically (a temporary folder renamed into place: an error or Ctrl-C leaves
nothing behind).

How it stays near the hardware's limit:

* Nothing is loaded whole. Output shards are planned up front (:class:`~dmo.merge.checkpoint.ShardWriter`), so
  each block of output is written with ``pwrite`` where it belongs as soon as it is computed; anonymous memory is a
  few cache-sized float32 buffers per thread, independent of model size (whole-tensor methods: see below).
* ``linear`` / ``task_arithmetic`` run block by block: a cache-sized chunk of each input is converted to float32
  and accumulated (converting first and then adding is much faster than mixed-dtype in-place adds), LoRA experts
  contribute one ``addmm`` of their concatenated factors per chunk of rows. With weights ``w`` and scale ``l`` the
  result is ``c * base + l * sum_full w_i theta_i + l * sum_lora w_i s_i B_i A_i`` with ``c = 1 - l * sum_full w_i``;
  when ``c`` is 0 (a mixture of full fine-tunes) the base is not read at all.
* Worker threads (``threads``, default: one per CPU) take blocks in file order while a prefetch thread populates
  the page tables of the blocks ahead (``MADV_POPULATE_READ``, or ``MADV_WILLNEED`` on old kernels), so reading
  overlaps computing; finished input ranges are unmapped again (``MADV_DONTNEED``), which keeps the resident set
  small. On a GPU (``device="cuda"``, the default when one is present) chunks are larger and the arithmetic runs
  there.
* TIES, DARE and DARE-TIES stream too, through their chunked form (:class:`~dmo.merge.registry.Chunked`): TIES first
  finds each expert's exact trim threshold in a statistics pass (holding one float32 copy of the tensor's
  magnitudes, i.e. one tensor, at a time), DARE draws its masks per fixed block; then chunks are merged as above.
  RobustMerge merges each LoRA module's factors first and then streams like ``linear``. A method registered without
  a chunked form runs one whole tensor at a time and holds ``K + 3`` float32 copies of it (K experts), plus what
  the method itself needs: the matrix methods (``svd``, ``iso``, ``wudi``, ``wudi2``) work on one whole linear
  layer at a time, so memory stays flat in the model's size (it grows with its largest tensor).
* Methods with per-expert inputs (Fisher merging) read them memory-mapped from the files given in ``extra``
  (``{"fisher": {expert: folder or file}}``), one parameter at a time, after one pass over them for the statistics
  the method needs over the whole model (the Fisher norms).

Which tensors are merged: ``include`` / ``exclude`` are regular expressions searched in the base checkpoint's tensor
names; a tensor is merged when it matches an include pattern (all do without ``include``) and no exclude pattern,
otherwise the base value is kept. The default ``exclude`` is the DMO paper's: for LoRA-trained experts
:data:`PAPER_EXCLUDE` ``["lora"]`` (vision tower, projector, embeddings, head, norms, biases), for full fine-tunes
``["full"]`` (vision blocks and patch embedding). Non-floating tensors are always copied from the base.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import mmap
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmo.atomic import atomic_dir
from dmo.errors import DmoError
from dmo.manifest import FinetuneKind
from dmo.merge.checkpoint import (
    Checkpoint,
    ShardWriter,
    copy_side_files,
    set_config_dtype,
)
from dmo.merge.experts import Expert, check_weights, close_experts, expert_kind, merge_filter, open_experts
from dmo.merge.plans import ExtraInputs, Plan, output_dtype, plan_tensor
from dmo.merge.registry import Chunked, get_method

#: Default largest output shard (bytes), as transformers' ``save_pretrained`` used to.
DEFAULT_SHARD_SIZE = 5 * 10**9
#: Elements per compute chunk on the CPU: one float32 chunk fits in a core's L2 cache.
CPU_CHUNK = 1 << 18
#: Elements per compute chunk on a GPU.
GPU_CHUNK = 1 << 24
#: Elements per block: the unit a thread takes and writes with one pwrite.
BLOCK = 1 << 22
#: How many blocks the prefetch thread may run ahead of the workers.
LOOKAHEAD = 8
#: Linux MADV_POPULATE_READ (5.14+): fault the pages in without touching them from Python.
MADV_POPULATE_READ = 22

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class MergeStats:
    """What a merge read and wrote and how long it took."""

    out: Path
    tensors: int
    merged: int
    copied: int
    bytes_read: int
    bytes_written: int
    seconds: float
    device: str
    threads: int
    #: adapted parameters (LoRA modules or non-LoRA trainables) that include/exclude kept at the base value
    excluded_adapted: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    #: seconds spent opening and validating, streaming the tensors, and finishing the folder
    phases: Mapping[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        s = max(self.seconds, 1e-9)
        return (
            f"read {self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB in {self.seconds:.2f} s "
            f"({self.bytes_read / 1e9 / s:.2f} GB/s read, {self.bytes_written / 1e9 / s:.2f} GB/s written; "
            f"{self.merged} tensors merged, {self.copied} copied from the base)"
        )


# ------------------------------------------------------------------------------------------------------ running


@dataclass
class _Block:
    plan: Plan
    lo: int  # element range of the flattened tensor
    hi: int


class _Runner:
    def __init__(
        self,
        plans: list[Plan],
        writer: ShardWriter,
        device: torch.device,
        threads: int,
        chunk: int,
        block: int,
        progress: Progress | None,
    ):
        self.writer = writer
        self.device = device
        self.threads = threads
        self.chunk = chunk
        self.progress = progress
        self.total = len(plans)
        self.blocks: list[_Block] = []
        for plan in plans:
            if plan.mode == "whole":
                plan._pending = 1
                self.blocks.append(_Block(plan, 0, plan.numel))
                continue
            unit = plan.cols
            step = max(unit, block // unit * unit)
            bounds = list(range(0, plan.numel, step)) or [0]
            plan._pending = len(bounds)
            for lo in bounds:
                self.blocks.append(_Block(plan, lo, min(lo + step, plan.numel)))
        self._next = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._done: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.bytes_read = 0
        self._populate = True

    # -- scheduling

    def _take(self) -> _Block | None:
        with self._cond:
            if self._stop.is_set() or self._next >= len(self.blocks):
                return None
            blk = self.blocks[self._next]
            self._next += 1
            self._cond.notify_all()
            return blk

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._stop.set()
            self._cond.notify_all()

    def run(self) -> int:
        workers = [threading.Thread(target=self._work, name=f"dmo-merge-{i}", daemon=True) for i in range(self.threads)]
        prefetch = threading.Thread(target=self._prefetch, name="dmo-prefetch", daemon=True)
        prefetch.start()
        for w in workers:
            w.start()
        finished = 0
        try:
            while any(w.is_alive() for w in workers):
                try:
                    name = self._done.get(timeout=0.05)
                except queue.Empty:
                    continue
                finished += 1
                if self.progress is not None:
                    self.progress(finished, self.total, name)
            while True:
                try:
                    name = self._done.get_nowait()
                except queue.Empty:
                    break
                finished += 1
                if self.progress is not None:
                    self.progress(finished, self.total, name)
        except BaseException as exc:  # Ctrl-C: stop the workers before the output folder is removed
            self._fail(exc)
            raise
        finally:
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            for w in workers:
                w.join()
            if prefetch.is_alive():
                prefetch.join()
        if self._error is not None:
            raise self._error
        return finished

    # -- prefetching

    def _prefetch(self) -> None:
        i = 0
        try:
            while i < len(self.blocks):
                with self._cond:
                    while not self._stop.is_set() and i >= self._next + LOOKAHEAD:
                        self._cond.wait(0.1)
                    if self._stop.is_set():
                        return
                    i = max(i, self._next)
                if i >= len(self.blocks):
                    return
                self._advise(self.blocks[i], MADV_POPULATE_READ)
                i += 1
        except Exception:  # prefetching is only a hint
            return

    def _advise(self, blk: _Block, advice: int) -> None:
        plan = blk.plan
        for term in plan.terms if plan.mode != "whole" else ():  # (chunked: the base and the full values)
            if term.source is None or term.info is None:
                continue
            size = term.info.dtype.itemsize
            if advice == MADV_POPULATE_READ and not self._populate:
                advice = mmap.MADV_WILLNEED
            try:
                term.source.advise(term.info.name, blk.lo * size, blk.hi * size, advice)
            except OSError:
                if advice == MADV_POPULATE_READ:  # kernel < 5.14: asynchronous read-ahead instead
                    self._populate = False
                    with contextlib.suppress(OSError):
                        term.source.advise(term.info.name, blk.lo * size, blk.hi * size, mmap.MADV_WILLNEED)

    # -- working

    def _work(self) -> None:
        try:
            n = self.chunk
            dev = self.device
            acc = torch.empty(n, dtype=torch.float32, device=dev)
            tmp = torch.empty(n, dtype=torch.float32, device=dev)
            staging: dict[torch.dtype, Tensor] = {}
            stacks: dict[int, Tensor] = {}
            while (blk := self._take()) is not None:
                plan = blk.plan
                if plan.mode == "copy":
                    self._copy(blk, staging)
                elif plan.mode == "linear":
                    self._linear(blk, acc, tmp, staging)
                elif plan.mode == "chunked":
                    self._chunked(blk, acc, staging, stacks)
                else:
                    self._whole(blk)
                if plan.mode != "whole":  # unmap the finished range (the page cache keeps the data)
                    self._advise(blk, mmap.MADV_DONTNEED)
                with plan._lock:
                    plan._pending -= 1
                    done = plan._pending == 0
                    if done:
                        plan._factors = None
                        plan._chunker = None
                if done:
                    self._done.put(plan.name)
        except BaseException as exc:
            self._fail(exc)

    def _stage(self, staging: dict[torch.dtype, Tensor], dtype: torch.dtype, n: int) -> Tensor:
        buf = staging.get(dtype)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, BLOCK), dtype=dtype)
            staging[dtype] = buf
        return buf[:n]

    def _write(self, plan: Plan, data: Tensor, lo: int) -> None:
        flat = data.reshape(-1)
        raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
        # numpy arrays are buffers; numpy's stubs do not say so
        mv = memoryview(raw.numpy()) if raw.numel() else memoryview(b"")  # type: ignore[arg-type]
        self.writer.write(plan.out, mv, lo * plan.out.dtype.itemsize)

    def _copy(self, blk: _Block, staging: dict[torch.dtype, Tensor]) -> None:
        plan = blk.plan
        src = plan.terms[0].flat()[blk.lo : blk.hi]  # the base's tensor
        with self._lock:
            self.bytes_read += (blk.hi - blk.lo) * src.element_size()
        if src.dtype == plan.out.dtype:
            self._write(plan, src, blk.lo)
        else:
            out = self._stage(staging, plan.out.dtype, blk.hi - blk.lo)
            out.copy_(src)
            self._write(plan, out, blk.lo)

    def _linear(self, blk: _Block, acc_buf: Tensor, tmp_buf: Tensor, staging: dict[torch.dtype, Tensor]) -> None:
        plan = blk.plan
        dev = self.device
        on_cpu = dev.type == "cpu"
        out_dtype = plan.out.dtype
        out = self._stage(staging, out_dtype, blk.hi - blk.lo)
        cols = plan.cols
        chunk = max(cols, self.chunk // cols * cols)
        if chunk > acc_buf.numel():
            acc_buf = torch.empty(chunk, dtype=torch.float32, device=dev)
            tmp_buf = torch.empty(chunk, dtype=torch.float32, device=dev)
        factors = plan.factors(dev) if plan.lora is not None else None
        flats = [t.flat() for t in plan.terms]
        nread = 0
        for lo in range(blk.lo, blk.hi, chunk):
            hi = min(lo + chunk, blk.hi)
            n = hi - lo
            acc = acc_buf[:n]
            tmp = tmp_buf[:n]
            started = False
            for term, flat in zip(plan.terms, flats):
                src = flat[lo:hi]
                nread += n * src.element_size()
                if not on_cpu:
                    src = src.to(dev, non_blocking=True)
                if not started:
                    acc.copy_(src)
                    if term.coef != 1.0:
                        acc.mul_(term.coef)
                    started = True
                elif src.dtype == torch.float32:
                    acc.add_(src, alpha=term.coef)
                else:
                    tmp.copy_(src)
                    acc.add_(tmp, alpha=term.coef)
            if factors is not None:
                b, a = factors
                rows = acc.view(n // cols, cols)
                r0, r1 = lo // cols, hi // cols
                if started:
                    rows.addmm_(b[r0:r1], a)
                else:
                    torch.mm(b[r0:r1], a, out=rows)
            check = float(acc.sum())
            if not math.isfinite(check):
                self._diagnose(plan, lo, hi, acc)
            out[lo - blk.lo : hi - blk.lo].copy_(acc)
        with self._lock:
            self.bytes_read += nread
        self._write(plan, out, blk.lo)

    def _chunk_size(self, plan: Plan) -> int:
        cols = plan.cols
        return max(cols, self.chunk // cols * cols)

    def _base_chunk(self, plan: Plan, flat: Tensor, lo: int, hi: int, out: Tensor) -> Tensor:
        src = flat[lo:hi]
        return out[: hi - lo].copy_(src if self.device.type == "cpu" else src.to(self.device, non_blocking=True))

    def _chunker(self, plan: Plan, acc: Tensor, stack: Tensor) -> Chunked:
        """The plan's chunked method, with its statistics (and joint) pass run once (by the first worker to need it).

        ``stack`` is a (K, chunk) float32 buffer; its first row is the statistics pass's scratch.
        """
        scratch = stack[0]
        with plan._lock:
            if plan._chunker is not None:
                return plan._chunker
            assert plan.chunked is not None
            method = plan.chunked()
            if method.stats:
                base_flat = plan.terms[0].flat()
                chunk = min(self._chunk_size(plan), acc.numel(), scratch.numel())
                chunk = max(plan.cols, chunk // plan.cols * plan.cols)
                nread = 0
                for i, value in enumerate(plan.values):
                    flat = value.full.flat() if value.full is not None else None
                    for lo in range(0, plan.numel, chunk):
                        hi = min(lo + chunk, plan.numel)
                        b32 = self._base_chunk(plan, base_flat, lo, hi, acc)
                        delta = scratch[: hi - lo]
                        value.delta_into(delta, flat, b32, lo, plan.cols)
                        nread += (hi - lo) * (plan.base.dtype.itemsize + (value.full.info.dtype.itemsize if
                                  value.full is not None and value.full.info is not None else 0))  # fmt: skip
                        if not math.isfinite(float(delta.sum())):
                            self._diagnose(plan, lo, hi, delta)
                        method.observe(i, lo, delta)
                    method.done(i)
                with self._lock:
                    self.bytes_read += nread
            if method.joint:  # every chunk of all K deltas once more, before any chunk is merged
                base_flat = plan.terms[0].flat()
                fulls = [v.full.flat() if v.full is not None else None for v in plan.values]
                chunk = min(self._chunk_size(plan), acc.numel(), stack.shape[1])
                chunk = max(plan.cols, chunk // plan.cols * plan.cols)
                for lo in range(0, plan.numel, chunk):
                    hi = min(lo + chunk, plan.numel)
                    b32 = self._base_chunk(plan, base_flat, lo, hi, acc)
                    deltas = stack[:, : hi - lo]
                    for i, value in enumerate(plan.values):
                        value.delta_into(deltas[i], fulls[i], b32, lo, plan.cols)
                    method.observe_all(deltas, lo)
                with self._lock:
                    self.bytes_read += sum(t.info.nbytes for t in plan.terms if t.info is not None)
            plan._chunker = method
            return method

    def _chunked(
        self, blk: _Block, acc_buf: Tensor, staging: dict[torch.dtype, Tensor], stacks: dict[int, Tensor]
    ) -> None:
        plan = blk.plan
        k = len(plan.values)
        chunk = self._chunk_size(plan)
        if acc_buf.numel() < chunk:
            acc_buf = torch.empty(chunk, dtype=torch.float32, device=self.device)
        stack = stacks.get(k)
        if stack is None or stack.shape[1] < chunk:
            stack = stacks[k] = torch.empty((k, chunk), dtype=torch.float32, device=self.device)
        method = self._chunker(plan, acc_buf, stack)
        out = self._stage(staging, plan.out.dtype, blk.hi - blk.lo)
        base_flat = plan.terms[0].flat()
        fulls = [v.full.flat() if v.full is not None else None for v in plan.values]
        nread = 0
        for lo in range(blk.lo, blk.hi, chunk):
            hi = min(lo + chunk, blk.hi)
            n = hi - lo
            b32 = self._base_chunk(plan, base_flat, lo, hi, acc_buf)
            deltas = stack[:, :n]
            for i, value in enumerate(plan.values):
                value.delta_into(deltas[i], fulls[i], b32, lo, plan.cols)
            nread += sum(t.info.nbytes for t in plan.terms if t.info is not None) * n // max(plan.numel, 1)
            merged = method.merge(deltas, lo)
            acc = b32.add_(merged)
            if not math.isfinite(float(acc.sum())):
                self._diagnose(plan, lo, hi, acc)
            out[lo - blk.lo : hi - blk.lo].copy_(acc)
        with self._lock:
            self.bytes_read += nread
        self._write(plan, out, blk.lo)

    def _whole(self, blk: _Block) -> None:
        plan = blk.plan
        assert plan.whole is not None
        merged = plan.whole(self.device)
        with self._lock:
            self.bytes_read += plan.read_bytes
        if not bool(torch.isfinite(merged).all()):
            self._diagnose(plan, 0, plan.numel, merged.reshape(-1))
        out = merged.to(plan.out.dtype).cpu()
        del merged
        flat = out.reshape(-1)
        step = max(1, BLOCK)
        for lo in range(0, plan.numel, step):
            self._write(plan, flat[lo : lo + step], lo)

    def _diagnose(self, plan: Plan, lo: int, hi: int, result: Tensor) -> None:
        for term in plan.terms:
            src = term.flat()[lo:hi]
            if src.is_floating_point():
                bad = (~torch.isfinite(src)).nonzero()
                if bad.numel():
                    where = term.file or (term.info.file if term.info is not None else "?")
                    raise DmoError(
                        f"{term.who}: tensor {plan.name} in {where} holds NaN or Inf values (element "
                        f"{lo + int(bad[0])}): the training diverged or the file is corrupt; fix or drop it"
                    )
        raise DmoError(
            f"merged tensor {plan.name} has NaN or Inf values (its inputs are finite, so an expert tensor or the "
            "weights/scale are too large for float32); check the experts and the merge parameters"
        )


# ------------------------------------------------------------------------------------------------------- driver


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DmoError(f"device {device} requested but torch sees no CUDA GPU; use --device cpu")
    return dev


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, names.get(dtype, dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise DmoError(f"unknown output dtype {dtype!r}: use bfloat16, float16 or float32")
    return value


@dataclass(frozen=True)
class MergeOptions:
    """How :func:`merge_checkpoints` merges and writes (every field has the CLI's default).

    ``kind`` picks the default ``exclude`` (default: ``"lora"`` when every expert is a LoRA adapter, else ``"full"``);
    ``include``/``exclude``: see the module docstring. ``dtype``: output dtype of floating tensors (default: each
    base tensor's). ``extra``: the per-expert inputs the method needs (``fisher``/``fisher_nn``:
    ``{"fisher": {expert: folder or .safetensors}}``). ``metadata`` is added to ``dmo_merge.json``.
    """

    method: str = "linear"
    params: Mapping[str, Any] = field(default_factory=dict)
    kind: FinetuneKind | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    dtype: str | torch.dtype | None = None
    max_shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    device: str | torch.device | None = None
    threads: int | None = None
    chunk: int | None = None
    allow_bin: bool = False
    fsync: bool = False
    metadata: Mapping[str, Any] | None = None
    extra: Mapping[str, Mapping[str, str | os.PathLike[str]]] | None = None


def merge_checkpoints(
    base: str | os.PathLike[str],
    experts: Mapping[str, str | os.PathLike[str]],
    weights: Mapping[str, float],
    out: str | os.PathLike[str],
    options: MergeOptions | None = None,
    *,
    progress: Progress | None = None,
) -> MergeStats:
    """Merge ``experts`` (name -> folder) into ``base`` with ``weights`` and write the model to ``out``.

    ``weights`` are used as given (zeros drop the expert; pass :meth:`dmo.mixture.Mixture.rounded_to_budget` for
    the paper's coefficients). ``progress(done, total, tensor)`` is called from the calling thread after each output
    tensor. Raises :class:`DmoError` (one line naming the file and tensor) on bad input; nothing is left at ``out``
    then.
    """
    opts = options or MergeOptions()
    start = time.perf_counter()
    spec = get_method(opts.method)
    params = spec.check_params(dict(opts.params))
    out = Path(out)
    if out.exists() and not opts.overwrite:
        raise DmoError(f"output folder {out} already exists: remove it or pass --overwrite")
    base_folder = Path(base)
    active = check_weights(list(experts), weights)
    kind = opts.kind or ("lora" if all(expert_kind(experts[n]) == "lora" for n in active) else "full")
    keep = merge_filter(base_folder, kind, opts.include, opts.exclude)
    out_dtype = parse_dtype(opts.dtype)
    dev = resolve_device(opts.device)
    with contextlib.ExitStack() as stack:
        base_ckpt = stack.enter_context(Checkpoint.open(base_folder, what="base model", allow_bin=opts.allow_bin))
        opened = open_experts(base_ckpt, experts, active, opts.allow_bin)
        stack.callback(close_experts, opened)
        kinds = {e.kind for e in opened}
        if spec.inputs == "lora" and kinds != {"lora"}:
            full = next(e for e in opened if e.kind == "full")
            raise DmoError(f"merge method {spec.name!r} merges LoRA experts only, but {full.what} ({full.folder}) is "
                           "a full checkpoint")  # fmt: skip
        inputs = ExtraInputs.open(spec, base_ckpt, opened, opts.extra)
        if inputs is not None:
            stack.callback(inputs.close)
        adapted = {n for e in opened for n in (*e.modules, *e.extra)}
        excluded_adapted = tuple(sorted(n for n in adapted if not keep(n)))
        names = list(base_ckpt.tensors)  # file order of the base, which is the order it is read in
        lora_bytes = sum(_adapter_bytes(e) for e in opened)
        tmp = stack.enter_context(atomic_dir(out, overwrite=opts.overwrite))
        writer = ShardWriter(
            tmp,
            [(n, output_dtype(base_ckpt.tensors[n], out_dtype), base_ckpt.tensors[n].shape) for n in names],
            max_shard_size=opts.max_shard_size,
            metadata={"dmo_method": spec.name},
        )
        _check_space(out, writer.nbytes)
        prepared: dict[str, Any] = {}  # filled in below, before any plan runs
        plans = [plan_tensor(t, base_ckpt, opened, spec, params, keep, inputs, prepared) for t in writer.order]
        extra_bytes = 0
        if inputs is not None:  # model-wide statistics (Fisher norms) over exactly the tensors merged
            computed, extra_bytes = inputs.prepare(spec, [p.name for p in plans if p.mode == "whole"])
            prepared.update(computed)
        merged = sum(p.mode != "copy" for p in plans)
        whole_only = any(p.mode == "whole" for p in plans)
        n_threads = 1 if whole_only else opts.threads or (1 if dev.type != "cpu" else max(1, os.cpu_count() or 1))
        chunk = opts.chunk or (GPU_CHUNK if dev.type != "cpu" else CPU_CHUNK)
        t_setup = time.perf_counter()
        runner = _Runner(plans, writer, dev, n_threads, chunk, BLOCK, progress)
        _stream(runner, writer, single_threaded_torch=not whole_only and dev.type == "cpu", fsync=opts.fsync)
        t_run = time.perf_counter()
        copy_side_files(base_folder, tmp)
        if out_dtype is not None:
            set_config_dtype(tmp, out_dtype)
        record = {
            "method": spec.name,
            "params": params,
            "weights": active,
            "base": str(base_folder),
            "experts": {e.name: {"path": str(e.folder), "kind": e.kind} for e in opened},
            "dtype": None if out_dtype is None else str(out_dtype).removeprefix("torch."),
            **keep.describe(),
            **_inputs_record(opts.extra, opened),
            **dict(opts.metadata or {}),
        }
        (tmp / "dmo_merge.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        files = tuple(sorted(p.name for p in tmp.iterdir()))
    end = time.perf_counter()
    return MergeStats(
        out=out,
        tensors=len(plans),
        merged=merged,
        copied=len(plans) - merged,
        bytes_read=runner.bytes_read + lora_bytes + extra_bytes,
        bytes_written=writer.nbytes,
        seconds=end - start,
        device=str(dev),
        threads=n_threads,
        excluded_adapted=excluded_adapted,
        files=files,
        phases={"setup": t_setup - start, "stream": t_run - t_setup, "finish": end - t_run},
    )


def _stream(runner: _Runner, writer: ShardWriter, *, single_threaded_torch: bool, fsync: bool) -> None:
    """Open the shards, run every plan and finish the files."""
    previous_threads = torch.get_num_threads()
    collecting = gc.isenabled()
    gc.disable()  # the loop makes many short-lived tensor views; full collections would walk torch's objects
    try:
        if single_threaded_torch:
            # the workers are the parallelism: intra-op threads on top of small chunks only wait for each other
            # (OpenMP barriers on a busy machine cost more than the work)
            torch.set_num_threads(1)
        writer.open()
        runner.run()
        writer.finish(fsync=fsync)
    finally:
        writer.close()
        torch.set_num_threads(previous_threads)
        if collecting:
            gc.enable()


def _inputs_record(
    extra: Mapping[str, Mapping[str, str | os.PathLike[str]]] | None, experts: Sequence[Expert]
) -> dict[str, Any]:
    if not extra:
        return {}
    return {"inputs": {key: {e.name: str(paths[e.name]) for e in experts} for key, paths in extra.items()}}


def _adapter_bytes(e: Expert) -> int:
    if e.adapter is None:
        return 0
    return sum(p.stat().st_size for p in e.folder.glob("adapter_model.*") if p.is_file())


def _check_space(out: Path, needed: int) -> None:
    parent = out.parent if out.parent.exists() else Path(".")
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < needed:
        raise DmoError(
            f"not enough disk space for {out}: the merged model needs {needed / 1e9:.2f} GB but only "
            f"{free / 1e9:.2f} GB are free on {parent.resolve()}; free some space or choose another --out"
        )
