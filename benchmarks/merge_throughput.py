"""Throughput of dense checkpoint merges: dmo's streaming merge against mergekit, the paper's naive path and a copy.

Generates (locally, never committed) a synthetic checkpoint set shaped like Qwen2-0.5B: a base and 4 experts, bf16,
each sharded into ~400 MB safetensors files (~0.99 GB per model), plus config.json so that transformers and mergekit
can load them. Then times, each in a fresh subprocess, once cold (the inputs evicted from the page cache with
``posix_fadvise(DONTNEED)``) and ``--repeats`` times warm (interleaved, so that a busy moment on a shared machine
hurts every contender alike; the table shows the run with the least work time, and the median):

* ``copy``: read every input byte once (mmap, the fastest plain read here) and write one model's bytes: the
  practical limit of any merge that reads everything;
* ``dmo``: ``merge_checkpoints`` linear, weights summing to 1 (the base is then not read: theta = sum_i w_i theta_i);
* ``dmo-base``: the same with task-arithmetic scale 0.9, which needs the base too (reads what ``copy`` reads);
* ``mergekit``: ``mergekit-yaml``'s linear merge of the same files (in-process API after its imports);
* ``naive``: what the DMO paper's code does: ``from_pretrained`` every model, fp32 task vectors for the whole
  model, weighted sum, ``save_pretrained``.

Reported per run: process wall time, "work" time (measured inside the process after imports), CPU time (user + sys
of the whole process), peak RSS (the kernel's high-water mark VmHWM) and peak anonymous memory (RssAnon, sampled
every 5 ms; file-backed pages, i.e. the memory-mapped inputs, are not anonymous), and ratios to the copy. A second,
larger size (``--sizes 0.5b,1.5b``) checks that dmo's anonymous memory does not grow with the model.

``naive`` runs last, once cold and once warm (its ~15 GB push everything else out of the page cache).

Run: ``python benchmarks/merge_throughput.py [--sizes 0.5b,1.5b] [--repeats 3] [--skip naive,mergekit] [--root DIR]``.
Generated checkpoints go to a temporary folder that is deleted at the end unless ``--keep`` or ``--root``.

``--layer`` measures instead what the whole-matrix methods (``svd``, ``iso``, ``wudi``, ``wudi2``; ``ties`` as the
chunked baseline) cost on *one* linear layer, the unit they work on: K random float32 task matrices of a 2B-scale
shape (Qwen2-VL-2B's MLP: ``8960x1536`` for gate/up, ``1536x8960`` for down), each method in a fresh subprocess,
reporting its time and peak memory (anonymous RSS sampled every 5 ms on the CPU, ``max_memory_allocated`` on a GPU)
above what holding the inputs costs. WUDI runs ``--layer-iterations`` optimiser steps (the paper: 300), timed apart
from its setup (SVDs, the fixed ``H`` and ``B``); the table extrapolates to 300 steps (each step costs the same).

Run: ``python benchmarks/merge_throughput.py --layer [--shapes 8960x1536,1536x8960] [--experts 4]
[--layer-methods svd,iso,wudi,wudi2,ties] [--layer-iterations 3] [--device cpu]``.

``--check`` catches a slip of ``dmo merge`` itself (the command as a user runs it, its imports included: task
arithmetic, scale 0.9, of the 4 full experts of the 0.5B-shaped set) without an absolute time: rounds of it, the same
merge called as a library and ``copy`` in the same script, the median ratios of their CPU times (command to library,
library to copy), and the command's peak anonymous memory and peak RSS per byte of one model, each against the
baseline saved in ``benchmarks/results/merge_check_baseline.json``; more than ``TOLERANCE`` worse fails with exit
status 1. ``--save-baseline`` measures and saves a new baseline (after a
change that is meant to cost more, or on another machine).

Run: ``python benchmarks/merge_throughput.py --check [--repeats 7] [--root DIR]``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "0.5b": (896, 4864, 24, 14, 2, 151936),
    "1.5b": (1536, 8960, 28, 12, 2, 151936),
    "tiny": (64, 256, 2, 4, 2, 1000),
}
WEIGHTS = {"e0": 0.4, "e1": 0.3, "e2": 0.2, "e3": 0.1}
SHARD = 400 * 10**6


# ---------------------------------------------------------------------------------------------------- generation


def qwen2_config(size: str) -> dict:
    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "hidden_act": "silu", "rope_theta": 1000000.0,
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip


def qwen2_shapes(size: str) -> dict[str, tuple[int, ...]]:
    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden), p + "self_attn.q_proj.bias": (heads * head_dim,),
            p + "self_attn.k_proj.weight": (kv * head_dim, hidden), p + "self_attn.k_proj.bias": (kv * head_dim,),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden), p + "self_attn.v_proj.bias": (kv * head_dim,),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }  # fmt: skip
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def generate(root: Path, size: str) -> Path:
    """base/ and e0..e3/ under root/size (reused when complete)."""
    import torch
    from safetensors.torch import save_file

    folder = root / size
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    shapes = qwen2_shapes(size)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for model in ["base", *WEIGHTS]:
        out = folder / model
        out.mkdir(parents=True)
        shards: list[dict] = [{}]
        size_now = 0
        for name, shape in shapes.items():
            n = 2
            for d in shape:
                n *= d
            if shards[-1] and size_now + n > SHARD:
                shards.append({})
                size_now = 0
            # base ~ N(0, 0.02); expert = base + N(0, 0.002): regenerate the base stream for the same values
            gb = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            value = torch.randn(shape, generator=gb).mul_(0.02)
            if model != "base":
                value.add_(torch.randn(shape, generator=g).mul_(0.002))
            shards[-1][name] = value.to(torch.bfloat16)
            size_now += n
        index = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            index |= dict.fromkeys(shard, file)
        total = sum(t.numel() * 2 for s in shards for t in s.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
        )
        (out / "config.json").write_text(json.dumps(qwen2_config(size), indent=1))
        (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        del shards
    (folder / ".complete").write_text(f"{time.perf_counter() - t0:.1f}s\n")
    return folder


def input_files(folder: Path, with_base: bool = True) -> list[Path]:
    models = (["base"] if with_base else []) + list(WEIGHTS)
    return [p for m in models for p in sorted((folder / m).glob("*.safetensors"))]


def evict(paths: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


# ------------------------------------------------------------------------------------------------ the contenders


def child_copy(folder: Path, out: Path) -> dict:
    """Read all inputs (mmap, chunk copies) and write the base's bytes once."""
    t0 = time.perf_counter()
    out.mkdir(parents=True)
    import numpy as np

    read = written = 0
    chunk = 8 << 20
    buf = np.empty(chunk, dtype=np.uint8)
    for p in input_files(folder):
        is_base = p.parent.name == "base"
        fd_out = os.open(out / p.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if is_base else None
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            data = np.frombuffer(m, dtype=np.uint8)
            for i in range(0, len(m), chunk):
                n = min(chunk, len(m) - i)
                buf[:n] = data[i : i + n]  # numpy copy: faster than readinto or slicing the mmap here
                read += n
                if fd_out is not None:
                    written += os.write(fd_out, memoryview(buf)[:n])
            del data
        if fd_out is not None:
            os.close(fd_out)
    return {"work_s": time.perf_counter() - t0, "read": read, "written": written}


def child_dmo(folder: Path, out: Path, scale: float = 1.0) -> dict:
    from dmo.merge.stream import MergeOptions, merge_checkpoints

    t0 = time.perf_counter()
    params = {} if scale == 1.0 else {"scale": scale}
    experts = {e: folder / e for e in WEIGHTS}
    stats = merge_checkpoints(folder / "base", experts, WEIGHTS, out, MergeOptions(params=params, kind="full"))
    return {"work_s": time.perf_counter() - t0, "read": stats.bytes_read, "written": stats.bytes_written}


def child_mergekit(folder: Path, out: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = {
        "merge_method": "linear",
        "models": [{"model": str(folder / e), "parameters": {"weight": w}} for e, w in WEIGHTS.items()],
        "dtype": "bfloat16",
        "out_dtype": "bfloat16",
    }
    t0 = time.perf_counter()
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=True)
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    read = sum(p.stat().st_size for p in input_files(folder, with_base=False))
    return {"work_s": time.perf_counter() - t0, "read": read, "written": written}


def child_naive(folder: Path, out: Path) -> dict:
    """The DMO paper's path: from_pretrained every model, fp32 task vectors of the whole model, save_pretrained."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    cls = transformers.Qwen2ForCausalLM
    base = cls.from_pretrained(str(folder / "base"), dtype=torch.bfloat16)
    base_sd = {k: v.detach().to(torch.float32) for k, v in base.state_dict().items()}
    task_vectors = []
    for e in WEIGHTS:
        model = cls.from_pretrained(str(folder / e), dtype=torch.bfloat16)
        task_vectors.append({k: v.detach().to(torch.float32) - base_sd[k] for k, v in model.state_dict().items()})
        del model
    merged = {k: base_sd[k] + sum(w * tv[k] for w, tv in zip(WEIGHTS.values(), task_vectors)) for k in base_sd}
    base.load_state_dict({k: v.to(torch.bfloat16) for k, v in merged.items()})
    base.save_pretrained(str(out))
    read = sum(p.stat().st_size for p in input_files(folder))
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"work_s": time.perf_counter() - t0, "read": read, "written": written}


def child_layer(spec: str) -> dict:
    """``method:MxN:K:iterations:device``: one merge of K random m x n task matrices, timed inside the process."""
    import torch

    from dmo.merge.registry import get_method

    method, shape, k, iterations, device = spec.split(":")
    m, n = (int(x) for x in shape.split("x"))
    k, iterations = int(k), int(iterations)
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    deltas = torch.randn((k, m, n), generator=g, device=dev).mul_(0.002)  # like the checkpoints' expert noise
    weights = torch.full((k,), 1.0 / k, device=dev)
    import dmo.merge.wudi as wudi_module

    fn = get_method(method).fn
    extra = {"name": "model.layers.0.mlp.up_proj.weight"} if get_method(method).takes_name else {}
    wudi = method in ("wudi", "wudi2")
    loop_s = [0.0]

    def timed(optimiser):  # the optimiser's steps apart from the setup (SVDs, H and B), in the same call
        def run_steps(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            result = optimiser(*args, **kwargs)
            sync()
            loop_s[0] += time.perf_counter() - t0
            return result

        return run_steps

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    wudi_module.adam, wudi_module.sgd = timed(wudi_module.adam), timed(wudi_module.sgd)
    if dev.type == "cuda":
        fn(deltas[:, :64, :64].contiguous(), weights, **({"iterations": 1} if wudi else {}), **extra)  # warm-up
        torch.cuda.reset_peak_memory_stats()
    loop_s[0] = 0.0
    before = _status(os.getpid()).get("RssAnon", 0)
    cuda_before = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    sync()
    t0 = time.perf_counter()
    fn(deltas, weights, **({"iterations": iterations} if wudi else {}), **extra)
    sync()
    total = time.perf_counter() - t0
    setup = total - loop_s[0] if wudi else None
    out = {"work_s": total, "setup_s": setup, "anon_before": before, "inputs": deltas.numel() * 4}
    if dev.type == "cuda":
        out["cuda_peak_extra"] = torch.cuda.max_memory_allocated() - cuda_before
        out["device_name"] = torch.cuda.get_device_name(dev)
    return out


def child_dmo_cli(folder: Path, out: Path) -> dict:
    """``dmo merge`` as a user runs it (task arithmetic, scale 0.9, of the 4 full experts): its imports count."""
    t0 = time.perf_counter()
    manifest = folder / "experts.yaml"
    if not manifest.exists():
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(
            f"name: bench-{folder.name}\nbase: ./base\nexperts: {{{', '.join(f'{e}: ./{e}' for e in WEIGHTS)}}}\n"
        )
        tmp.replace(manifest)
    from dmo.cli import main as dmo_main

    weights = ",".join(f"{e}={w}" for e, w in WEIGHTS.items())
    sys.argv = [
        "dmo",
        "merge",
        "--experts",
        str(manifest),
        "--weights",
        weights,
        "--out",
        str(out),
        "--param",
        "scale=0.9",
    ]
    try:
        dmo_main()
    except SystemExit as exc:
        if exc.code:
            raise
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"work_s": time.perf_counter() - t0, "read": 0, "written": written}


CHILDREN = {
    "copy": child_copy,
    "dmo": child_dmo,
    "dmo-base": lambda f, o: child_dmo(f, o, scale=0.9),
    "dmo-cli": child_dmo_cli,
    "mergekit": child_mergekit,
    "naive": child_naive,
}


# ------------------------------------------------------------------------------------------------------ measuring


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile", "VmRSS"):
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run_child(name: str, folder: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--folder", str(folder), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"VmHWM": 0, "RssAnon": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = _status(proc.pid)
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"error": (stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
    result = json.loads(stdout.strip().splitlines()[-1])
    # VmHWM, not ru_maxrss: the latter also counts the (torch-sized) parent the child was forked from
    result |= {
        "wall_s": wall,
        "peak_rss": peak["VmHWM"],
        "peak_anon": peak["RssAnon"],
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }
    return result


def _once(name: str, size: str, folder: Path, root: Path, cache: str) -> dict:
    out = root / f"out-{size}-{name}"
    shutil.rmtree(out, ignore_errors=True)
    if cache == "cold":
        evict(input_files(folder))
    else:
        warm(input_files(folder))
    load = os.getloadavg()[0]
    result = run_child(name, folder, out)
    shutil.rmtree(out, ignore_errors=True)
    result |= {"size": size, "name": name, "cache": cache, "load": load}
    print(json.dumps(result), file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5b,1.5b", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--skip", default="", help="contenders to skip: mergekit, naive, dmo-base")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per contender (the table shows the best)")
    parser.add_argument("--root", type=Path, help="keep the generated checkpoints here (reused next time)")
    parser.add_argument("--keep", action="store_true", help="do not delete the generated checkpoints")
    parser.add_argument("--layer", action="store_true", help="per-layer cost of the whole-matrix merge methods")
    parser.add_argument("--shapes", default="8960x1536,1536x8960", help="--layer: comma-separated MxN task matrices")
    parser.add_argument("--experts", type=int, default=4, help="--layer: number of experts K")
    parser.add_argument("--layer-methods", default="svd,iso,wudi,wudi2,ties", help="--layer: methods to time")
    parser.add_argument("--layer-iterations", type=int, default=300, help="--layer: WUDI steps to run (paper: 300)")
    parser.add_argument("--device", default="cpu", help="--layer: cpu or cuda")
    parser.add_argument("--check", action="store_true", help="compare `dmo merge` against the saved baseline")
    parser.add_argument(
        "--save-baseline", action="store_true", help="--check, then save what it measured as the baseline"
    )
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="--check: the baseline file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child.startswith("layer:"):
            print(json.dumps(child_layer(args.child.removeprefix("layer:"))))
        else:
            print(json.dumps(CHILDREN[args.child](args.folder, args.out)))
        return
    if args.layer:
        layer_costs(args)
        return
    if args.check or args.save_baseline:
        sys.exit(check(args))

    root = args.root or Path(tempfile.mkdtemp(prefix="dmo-merge-bench-"))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    rows: list[dict] = []
    try:
        folders = {}
        for size in sizes:
            t0 = time.perf_counter()
            folders[size] = generate(root, size)
            print(f"[{size}] checkpoints ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for si, size in enumerate(sizes):
            folder = folders[size]
            for other in sizes:  # only this size's files in the page cache
                if other != size:
                    evict(input_files(folders[other]))
            contenders = ["copy", "dmo", "dmo-base", "mergekit"] if si == 0 else ["copy", "dmo"]
            contenders = [c for c in contenders if c not in skip]
            for name in contenders:
                rows.append(_once(name, size, folder, root, "cold"))
            for _ in range(args.repeats):  # interleaved, so that a busy moment hurts every contender alike
                for name in contenders:
                    rows.append(_once(name, size, folder, root, "warm"))
            if si == 0 and "naive" not in skip:  # last: its ~15 GB push the inputs out of the page cache
                rows.append(_once("naive", size, folder, root, "cold"))
                rows.append(_once("naive", size, folder, root, "warm"))
    finally:
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    print_table(rows)


# ------------------------------------------------------------------------------------------- the slip check

#: what --save-baseline wrote last; --check compares against it
BASELINE = Path(__file__).resolve().parent / "results" / "merge_check_baseline.json"
#: how much worse than the baseline a measure may come out before --check fails. Peak memory varies by well under
#: 1 % between runs. The CPU-time ratios do not: ``command_vs_merge`` (the command against the same merge called as
#: a library, two runs that a busy machine slows alike) moved by a few percent between runs on the shared 2-core
#: machine, ``merge_vs_copy`` (compute against a plain read) by up to ~25 % as the load changed
TOLERANCE = {"command_vs_merge": 0.06, "merge_vs_copy": 0.25, "anon_per_model": 0.03, "rss_per_model": 0.03}
#: the contenders of --check, run in a rotating order in every round
CHECKED = ("copy", "dmo-base", "dmo-cli")


def check(args: argparse.Namespace) -> int:
    """``dmo merge`` (the command, imports included), the same merge called as a library (``dmo-base``) and ``copy``
    in the same script, in rounds of the three in a rotating order on the 0.5B-shaped set: the median per-round
    ratios of CPU time (user + sys, which a busy shared machine inflates far less than wall time) of the command to
    the library merge (what the command adds: imports, parsing) and of the merge to the copy, and the command's peak
    anonymous memory and peak RSS per byte of one model. Each is compared with the saved baseline
    (``--baseline``); a value more than :data:`TOLERANCE` above it is a slip: exit status 1."""
    import statistics

    root = args.root or Path(tempfile.mkdtemp(prefix="dmo-merge-bench-"))
    try:
        folder = generate(root, "0.5b")
        rounds = []
        for i in range(max(args.repeats, 3)):
            order = CHECKED[i % 3 :] + CHECKED[: i % 3]
            runs = {name: _once(name, "0.5b", folder, root, "warm") for name in order}
            if any("error" in r for r in runs.values()):
                print(f"a run failed: {runs}", file=sys.stderr)
                return 2
            rounds.append(runs)
    finally:
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    model = statistics.median(r["copy"]["written"] for r in rounds)
    measured = {
        "command_vs_merge": statistics.median(r["dmo-cli"]["cpu_s"] / r["dmo-base"]["cpu_s"] for r in rounds),
        "merge_vs_copy": statistics.median(r["dmo-base"]["cpu_s"] / r["copy"]["cpu_s"] for r in rounds),
        "anon_per_model": statistics.median(r["dmo-cli"]["peak_anon"] for r in rounds) / model,
        "rss_per_model": statistics.median(r["dmo-cli"]["peak_rss"] for r in rounds) / model,
    }
    wall = statistics.median(r["dmo-cli"]["wall_s"] / r["copy"]["wall_s"] for r in rounds)
    print(f"{len(rounds)} rounds; median wall ratio to the copy {wall:.3f} (not checked: the load moves it most)")
    if args.save_baseline:
        import torch

        doc = {
            "measured": measured,
            "rounds": len(rounds),
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, load {os.getloadavg()[0]:.1f} at the end",
            "command": "python benchmarks/merge_throughput.py --save-baseline",
        }
        args.baseline.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"baseline saved to {args.baseline}: {json.dumps(measured)}")
        return 0
    base = json.loads(args.baseline.read_text())["measured"]
    slips = []
    for key, value in measured.items():
        limit = base[key] * (1 + TOLERANCE[key])
        verdict = "SLIP" if value > limit else "ok"
        print(f"{key}: {value:.4f} against the baseline's {base[key]:.4f} (limit {limit:.4f}): {verdict}")
        if value > limit:
            slips.append(key)
    if slips:
        print(f"dmo merge slipped on {', '.join(slips)} (see above)", file=sys.stderr)
        return 1
    return 0


def layer_costs(args: argparse.Namespace) -> None:
    """Each (shape, method) in a fresh subprocess; one table row each."""
    import torch

    rows = []
    for shape in [x.strip() for x in args.shapes.split(",") if x.strip()]:
        for method in [x.strip() for x in args.layer_methods.split(",") if x.strip()]:
            steps = args.layer_iterations if method in ("wudi", "wudi2") else 1
            spec = f"layer:{method}:{shape}:{args.experts}:{steps}:{args.device}"
            r = run_child(spec, Path("."), Path("."))
            r |= {"shape": shape, "method": method, "steps": steps}
            print(json.dumps(r), file=sys.stderr)
            rows.append(r)
    threads = torch.get_num_threads()
    print(
        f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs ({threads} torch threads), device {args.device}; "
        f"K={args.experts} random float32 task matrices; load average now "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    header = ["shape", "method", "steps run", "time s", "setup s", "per step ms", "time at 300 steps s",
              "inputs GB", "peak extra GB", "peak RSS GB"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['method']} | error: {r['error']} |")
            continue
        wudi = r["method"] in ("wudi", "wudi2")
        per_step = (r["work_s"] - r["setup_s"]) / r["steps"] if wudi and r["steps"] else None
        at_300 = r["setup_s"] + 300 * per_step if per_step is not None else None
        extra = r.get("cuda_peak_extra", r["peak_anon"] - r["anon_before"])
        cells = [
            r["shape"], r["method"], r["steps"] if wudi else "-", f"{r['work_s']:.2f}",
            f"{r['setup_s']:.2f}" if wudi else "-", f"{per_step * 1e3:.1f}" if per_step is not None else "-",
            f"{at_300:.2f}" if at_300 is not None else "-", f"{r['inputs'] / 1e9:.2f}", f"{extra / 1e9:.2f}",
            f"{r['peak_rss'] / 2**30:.2f}",
        ]  # fmt: skip
        print("| " + " | ".join(str(x) for x in cells) + " |")


def print_table(rows: list[dict]) -> None:
    """One line per (size, contender, cache): the run with the least work time, the median, and ratios to copy."""
    import statistics

    import torch

    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["size"], r["name"], r["cache"]), []).append(r)
    best = {
        k: min((r for r in v if "error" not in r), key=lambda r: r["work_s"], default=None) for k, v in groups.items()
    }
    print(
        f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs; 4 experts + base, bf16; "
        f"load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    header = ["size", "contender", "cache", "runs", "load", "read GB", "written GB", "wall s", "work s (best)",
              "work s (median)", "CPU s", "peak RSS GB", "peak anon GB", "work/copy", "wall/copy"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for (size, name, cache), runs in groups.items():
        r = best[(size, name, cache)]
        if r is None:
            print(f"| {size} | {name} | {cache} | {len(runs)} | error: {runs[0]['error']} |")
            continue
        c = best.get((size, "copy", cache))
        median = statistics.median(x["work_s"] for x in runs if "error" not in x)
        cells = [
            size, name, cache, len(runs), f"{r['load']:.1f}", f"{r['read'] / 1e9:.2f}", f"{r['written'] / 1e9:.2f}",
            f"{r['wall_s']:.2f}", f"{r['work_s']:.2f}", f"{median:.2f}", f"{r['cpu_s']:.2f}",
            f"{r['peak_rss'] / 2**30:.2f}", f"{r['peak_anon'] / 2**30:.2f}",
            f"{r['work_s'] / c['work_s']:.2f}" if c else "-", f"{r['wall_s'] / c['wall_s']:.2f}" if c else "-",
        ]  # fmt: skip
        print("| " + " | ".join(str(x) for x in cells) + " |")


if __name__ == "__main__":
    main()
