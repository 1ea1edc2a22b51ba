"""What a live engine saves per proxy, against restarting one per proxy (issue 6's proof; GPU where available).

For each model (the tiny world's shape, and a Qwen2-VL-2B-shaped model built locally with random weights), with
four random LoRA experts (rank 16 on every linear layer of the language model) saved in PEFT format:

* **restart**: load the base from disk onto the device (what a fresh engine per proxy pays, before warm-up);
* **bank**: read the experts once onto the device (:class:`dmo.merge.live.ExpertBank`);
* **write**: switch proxies by writing merged weights into the live model (the vllm backend's weight-write path,
  here on a plain transformers model): linear and TIES proxies;
* **delta**: the hf backend's switch (dense linear delta from the LoRA factors, applied in place and restored);
* **adapter**: the LoRA-serving path, here PEFT with the concatenated adapter loaded unmerged;
* **tokens/s**: greedy generation of the same batch by the dense (written) proxy and the LoRA-served proxy;
* **exact**: a proxy written into the live model is compared with the same proxy merged to disk by
  ``dmo merge`` and loaded fresh: tensors bit-identical, and identical greedy answers.

vLLM itself is not run here (see the README): the weight-write logic is the one the vllm worker extension uses.
Run: ``python benchmarks/engine_reuse.py [--device cuda] [--models tiny,2b] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from dmo.merge.dense import applied_delta
from dmo.merge.live import ExpertBank, ModuleWriter
from dmo.merge.lora import adapter_to, concat_adapter, load_lora, lora_delta, write_adapter
from dmo.merge.names import KeyMap
from dmo.merge.stream import MergeOptions, merge_checkpoints
from dmo.tinyworld.config import WorldConfig
from dmo.tinyworld.generate import encode, generate_encoded
from dmo.tinyworld.model import init_model
from dmo.tinyworld.tokenizer import build_processor

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # Qwen2-VL-2B's shape: 28 x 1536 text layers (12 query / 2 kv heads, MLP 8960), a 32-block 1280-wide ViT
    "2b": dict(text_hidden=1536, text_layers=28, text_heads=12, text_kv_heads=2, text_intermediate=8960,
               mrope_section=(16, 24, 24), vision_embed=1280, vision_depth=32, vision_heads=16),
}  # fmt: skip
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIXTURES = [
    {"e0": 0.4, "e1": 0.3, "e2": 0.2, "e3": 0.1},
    {"e0": 0.1, "e1": 0.2, "e2": 0.3, "e3": 0.4},
    {"e0": 0.25, "e1": 0.25, "e2": 0.25, "e3": 0.25},
    {"e0": 0.7, "e2": 0.3},
    {"e1": 0.5, "e3": 0.5},
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def build(root: Path, name: str, rank: int, device: torch.device) -> tuple[Path, dict[str, Path], Any, WorldConfig]:
    """Base model folder (bf16 safetensors), four PEFT LoRA experts, the processor."""
    config = WorldConfig(**MODELS[name])
    processor = build_processor(config)
    with torch.device(device):
        model = init_model(config, processor.tokenizer).to(torch.bfloat16)
    base = root / name / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LINEAR
               and "visual" not in n]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    experts = {}
    for i in range(4):
        tensors = {}
        for n in modules:
            lin = model.get_submodule(n)
            tensors[f"base_model.model.{n}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.02
            tensors[f"base_model.model.{n}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.02
        folder = root / name / f"e{i}"
        folder.mkdir(parents=True)
        save_file(
            {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors"
        )
        cfg = {
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LINEAR),
            "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none",
        }  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        experts[f"e{i}"] = folder
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return base, experts, processor, config


def load_file_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def load(base: Path, device: torch.device) -> torch.nn.Module:
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
    return model.to(device).eval()


def batch(processor: Any, config: WorldConfig, device: torch.device, n: int) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(n, config.image_size, config.image_size, 3), dtype=np.uint8)
    questions = ["what is written in the image ?"] * n
    batches = encode(processor, images, questions, batch_size=n)
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def tokens_per_s(model: torch.nn.Module, processor: Any, batches: list, new: int, device: torch.device) -> float:
    generate_encoded(model, processor, batches, max_new_tokens=2)  # warm-up
    seconds, _ = timed(lambda: generate_encoded(model, processor, batches, max_new_tokens=new), device)
    return sum(b["input_ids"].shape[0] for b in batches) * new / seconds


def run(
    name: str, device: torch.device, rank: int, n_prompts: int, new_tokens: int, root: Path, profile: bool = False
) -> dict[str, Any]:
    t_build, (base, experts, processor, config) = timed(lambda: build(root, name, rank, device), device)
    row: dict[str, Any] = {"model": name, "device": str(device), "build_s": t_build}
    restart = [timed(lambda: load(base, device), device)[0] for _ in range(2)]
    row["restart_s"] = min(restart)
    model = load(base, device)
    row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    row["bank_s"], bank = timed(lambda: ExpertBank.open(base, experts, device=device), device)
    row["bank_MB"] = bank.nbytes / 1e6
    writer = ModuleWriter(model, bank.names)
    for method, params in (("linear", {}), ("ties", {"density": 0.5})):
        times = [timed(lambda m=m, x=method, p=params: writer(bank.merged(m, x, p)), device)[0] for m in MIXTURES]
        row[f"write_{method}_s"] = statistics.median(times)
    if profile and name != "tiny":  # where a TIES write spends its time
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(lambda: (writer(bank.merged(MIXTURES[0], "ties", {"density": 0.5})), sync(device)))
        pstats.Stats(prof).sort_stats("tottime").print_stats(8)
    writer(bank.base())
    if device.type == "cuda":  # experts kept in pinned host memory, merged on the GPU one parameter at a time
        host = ExpertBank.open(base, experts, device=device, store="host")
        row["write_host_s"] = statistics.median(timed(lambda m=m: writer(host.merged(m)), device)[0] for m in MIXTURES)
        del host
        writer(bank.base())

    # the hf backend's path: dense delta from the factors (kept on the device), applied in place, then restored
    names = KeyMap.for_model(model)
    adapters = {k: adapter_to(load_lora(p, names=names), device) for k, p in experts.items()}

    def delta_switch() -> None:
        delta = lora_delta(adapters, MIXTURES[0])
        with applied_delta(model, delta):
            sync(device)

    row["delta_s"] = statistics.median(timed(delta_switch, device)[0] for _ in range(3))

    # exactness: written proxy == the same proxy merged to disk and loaded fresh
    mixture = MIXTURES[0]
    # the reference is merged by the streaming engine on the CPU: an independent path, on another device
    merge_checkpoints(base, experts, mixture, root / name / "merged", MergeOptions(exclude=[]))
    fresh = load(root / name / "merged", device)
    writer(bank.merged(mixture))
    if device.type == "cuda":  # `dmo merge` on the GPU: the streaming engine with --device cuda
        out = root / name / "merged_gpu"
        row["merge_gpu_s"], _ = timed(
            lambda: merge_checkpoints(base, experts, mixture, out, MergeOptions(exclude=[], device=str(device))), device
        )
        gpu, cpu = load_file_all(out), load_file_all(root / name / "merged")
        row["merge_gpu_identical"] = f"{sum(torch.equal(gpu[k], cpu[k]) for k in cpu)}/{len(cpu)}"
    live_state, fresh_state = model.state_dict(), fresh.state_dict()
    same = sum(torch.equal(live_state[k], fresh_state[k]) for k in fresh_state)
    row["tensors_identical"] = f"{same}/{len(fresh_state)}"
    batches = batch(processor, config, device, n_prompts)
    a_live = generate_encoded(model, processor, batches, max_new_tokens=new_tokens)
    a_fresh = generate_encoded(fresh, processor, batches, max_new_tokens=new_tokens)
    row["answers_identical"] = f"{sum(x == y for x, y in zip(a_live, a_fresh))}/{len(a_live)}"
    del fresh
    row["dense_tok_s"] = tokens_per_s(model, processor, batches, new_tokens, device)

    # LoRA-served: the concatenated adapter on the base, unmerged (PEFT); switching = loading an adapter
    writer(bank.base())
    from peft import PeftModel

    def adapter_switch(i: int) -> Any:
        config_, tensors = concat_adapter({k: load_lora(p) for k, p in experts.items()}, MIXTURES[i % len(MIXTURES)])
        folder = root / name / f"proxy{i}"
        write_adapter(folder, config_, tensors, overwrite=True)
        return folder

    t_adapter, folder = timed(lambda: adapter_switch(0), device)
    t_load, peft_model = timed(lambda: PeftModel.from_pretrained(model, folder, is_trainable=False).eval(), device)
    row["adapter_s"] = t_adapter + t_load
    row["lora_tok_s"] = tokens_per_s(peft_model, processor, batches, new_tokens, device)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="tiny,2b")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", action="store_true", help="print where one TIES write of the larger model goes")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(run(name, device, args.rank, args.prompts, args.new_tokens, Path(tmp), args.profile))
            print(json.dumps(rows[-1]), flush=True)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print()
    print(
        "| model | params (M) | restart (s) | bank once (s) | write linear (s) | write TIES (s) | hf delta (s) "
        "| adapter (s) | restart / write | tok/s dense | tok/s LoRA | tensors identical | answers identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params_M']:.0f} | {r['restart_s']:.2f} | {r['bank_s']:.2f} | "
              f"{r['write_linear_s']:.3f} | {r['write_ties_s']:.3f} | {r['delta_s']:.3f} | {r['adapter_s']:.3f} | "
              f"{r['restart_s'] / r['write_linear_s']:.0f}x | {r['dense_tok_s']:.0f} | {r['lora_tok_s']:.0f} | "
              f"{r['tensors_identical']} | {r['answers_identical']} |")  # fmt: skip
    for r in rows:
        if "merge_gpu_s" in r:
            print(f"{r['model']}: dmo merge on the GPU {r['merge_gpu_s']:.2f} s (tensors identical to the CPU merge: "
                  f"{r['merge_gpu_identical']}); pinned-host bank write {r['write_host_s']:.3f} s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
