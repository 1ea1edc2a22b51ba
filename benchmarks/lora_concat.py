"""How long building one concatenated LoRA proxy takes (target: < 100 ms for 4 rank-16 experts on a 2B model).

Experts are random in-memory tensors shaped like PEFT LoRA on every linear layer of the language model: a tiny
test-sized model, and Qwen2-VL-2B's LLM (hidden 1536, intermediate 8960, 28 layers, 12 query / 2 key-value heads
of 128). The proxy is rank 64 and mostly float32, so most of the time goes into obtaining fresh memory: "cold" is
the first call, "warm" the median of the next ones. With glibc's defaults every call gets new pages from the
kernel; the ``heap`` rows re-run with ``mallopt`` keeping freed memory in the heap, as a long-running scoring
process would want (or use jemalloc/tcmalloc). Run: ``python benchmarks/lora_concat.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dmo.merge.lora import LoraAdapter, LoraModule, concat_adapter, lora_delta, write_adapter

SHAPES = {
    # name: (hidden, intermediate, layers, q_out, kv_out)
    "tiny": (64, 128, 2, 64, 32),
    "qwen2-vl-2b": (1536, 8960, 28, 1536, 256),
}
WEIGHTS = {"d0": 0.4, "d1": 0.3, "d2": 0.2, "d3": 0.1}


def make_experts(shape: str, k: int, rank: int, dtype: torch.dtype, seed: int = 0) -> dict[str, LoraAdapter]:
    hidden, inter, layers, q_out, kv_out = SHAPES[shape]
    linear = {
        "self_attn.q_proj": (q_out, hidden), "self_attn.k_proj": (kv_out, hidden), "self_attn.v_proj": (kv_out, hidden),
        "self_attn.o_proj": (hidden, q_out), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    experts = {}
    for i in range(k):
        modules = {}
        for layer in range(layers):
            for name, (out_f, in_f) in linear.items():
                module = f"model.language_model.layers.{layer}.{name}"
                a = torch.randn(rank, in_f, generator=g).to(dtype)
                b = torch.randn(out_f, rank, generator=g).to(dtype)
                modules[f"{module}.weight"] = LoraModule(module, a, b, scale=2.0)
        experts[f"d{i}"] = LoraAdapter(
            folder=Path(f"mem/d{i}"), r=rank, lora_alpha=2.0 * rank, use_rslora=False, target_modules=list(linear),
            base_model_name_or_path=None, task_type=None, rank_pattern={}, alpha_pattern={}, modules=modules,
            content_hash=f"{i:064d}",
        )  # fmt: skip
    return experts


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call, median of the next ``repeats``) wall time in milliseconds."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
        del result  # free before the next call, as a scoring loop would
    return times[0], statistics.median(times[1:])


def keep_freed_memory_in_heap() -> bool:
    """Ask glibc to serve allocations below 32 MiB from the heap and never trim it (Linux/glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def measure(repeats: int, allocator: str) -> list[tuple]:
    rows = []
    for shape in SHAPES:
        for expert_dtype in (torch.float32, torch.bfloat16):
            experts = make_experts(shape, k=4, rank=16, dtype=expert_dtype)
            config, tensors = concat_adapter(experts, WEIGHTS)
            size_mib = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
            cold, warm = timed(lambda e=experts: concat_adapter(e, WEIGHTS), repeats)
            with tempfile.TemporaryDirectory() as tmp:
                folders = (Path(tmp) / f"p{i}" for i in range(10**6))
                _, write = timed(lambda c=config, t=tensors, f=folders: write_adapter(next(f), c, t), 3)
            delta = timed(lambda e=experts: lora_delta(e, WEIGHTS), 3)[1] if shape == "tiny" else float("nan")
            dtype = str(expert_dtype).removeprefix("torch.")
            rows.append((shape, dtype, allocator, len(tensors) // 2, size_mib, cold, warm, write, delta))
            del experts, tensors
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # copies are memory-bound; extra threads only help on an idle machine
    rows = measure(args.repeats, "default")
    if keep_freed_memory_in_heap():
        rows += measure(args.repeats, "heap")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(
        f"4 experts of rank 16 -> one rank-64 proxy; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {load}"
    )
    header = ("model", "experts", "malloc", "modules", "proxy MiB", "cold ms", "warm ms", "write ms", "dense ms")
    print(" | ".join(f"{h:>11}" for h in header))
    for row in rows:
        shape, dtype, allocator, modules, size, cold, warm, write, delta = row
        cells = (
            shape,
            dtype,
            allocator,
            modules,
            f"{size:.1f}",
            f"{cold:.1f}",
            f"{warm:.1f}",
            f"{write:.1f}",
            f"{delta:.1f}",
        )
        print(" | ".join(f"{c:>11}" for c in cells))


if __name__ == "__main__":
    main()
