"""The streaming dense merge (dmo.merge.stream) against naive references written here, PEFT, and bad input.

Small random non-zero checkpoints with Qwen2 tensor names (several shapes, 1-D and 2-D, bf16 and fp32, single file
and sharded) are merged by dmo and by the obvious formula over fully loaded state dicts. LoRA experts are saved by
PEFT itself. Every bad input must give one DmoError line naming the file and the tensor, and leave nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from checkpoints import (
    assert_nothing_left,
    assert_same_model,
    linear_reference,
    load_model,
    make_set,
    one_line,
    write_model,
)
from safetensors.torch import load_file, save_file

from dmo.errors import DmoError
from dmo.merge import checkpoint as ckpt_mod
from dmo.merge import registry
from dmo.merge.experts import PAPER_EXCLUDE, ParamFilter
from dmo.merge.stream import MergeOptions, merge_checkpoints


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shards", [1, 3])
def test_linear_matches_the_naive_reference(tmp_path: Path, dtype: torch.dtype, shards: int) -> None:
    base, experts = make_set(tmp_path, dtype, shards=shards)
    weights = {"e0": 0.5, "e1": 0.3, "e2": 0.2}
    stats = merge_checkpoints(base, experts, weights, tmp_path / "out", MergeOptions(exclude=[], max_shard_size=3000))
    assert_same_model(load_model(tmp_path / "out"), linear_reference(base, experts, weights))
    assert stats.merged == stats.tensors and stats.copied == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_model(base))
    assert {f for f in index["weight_map"].values()} == {p.name for p in (tmp_path / "out").glob("*.safetensors")}
    assert "GB/s" in stats.summary()


def test_scaled_task_arithmetic_reads_the_base_and_unit_sums_do_not(tmp_path: Path) -> None:
    base, experts = make_set(tmp_path, torch.float32)
    weights = {"e0": 0.6, "e1": 0.4}
    expert_bytes = sum(p.stat().st_size for e in ("e0", "e1") for p in experts[e].glob("*.safetensors"))
    unit = merge_checkpoints(base, experts, weights, tmp_path / "unit", MergeOptions(exclude=[]))
    assert unit.bytes_read < expert_bytes  # headers are not counted; the base is not read at all
    assert unit.bytes_read > 0.85 * expert_bytes
    scaled = merge_checkpoints(
        base, experts, weights, tmp_path / "scaled", MergeOptions(exclude=[], params={"scale": 0.7})
    )
    assert scaled.bytes_read > 1.4 * unit.bytes_read  # base + 2 experts against 2 experts
    assert_same_model(load_model(tmp_path / "scaled"), linear_reference(base, experts, weights, scale=0.7))
    alias = merge_checkpoints(
        base,
        experts,
        weights,
        tmp_path / "alias",
        MergeOptions(exclude=[], method="task_arithmetic", params={"scale": 0.7}),
    )
    assert alias.merged == scaled.merged
    a, b = load_model(tmp_path / "alias"), load_model(tmp_path / "scaled")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_paper_defaults_keep_the_base_value_of_excluded_tensors(tmp_path: Path) -> None:
    base, experts = make_set(tmp_path, torch.bfloat16, visual=True)
    weights = {"e0": 0.25, "e1": 0.75}
    merge_checkpoints(base, experts, weights, tmp_path / "full", MergeOptions(kind="full"))
    keep = ParamFilter("full")
    out, b = load_model(tmp_path / "full"), load_model(base)
    assert_same_model(out, linear_reference(base, experts, weights, keep=keep))
    for name in ("visual.patch_embed.proj.weight", "visual.blocks.0.attn.qkv.weight"):
        assert torch.equal(out[name], b[name])
    assert not torch.equal(out["visual.merger.mlp.0.weight"], b["visual.merger.mlp.0.weight"])
    # the LoRA-trained defaults also keep embeddings, head, norms, biases and the whole vision side
    merge_checkpoints(base, experts, weights, tmp_path / "lora", MergeOptions(kind="lora"))
    out = load_model(tmp_path / "lora")
    lora_keep = ParamFilter("lora")
    for name in out:
        kept = any(p in name for p in ("visual", "embed_tokens", "lm_head", "norm", "bias"))
        assert lora_keep(name) is not kept, name
        assert torch.equal(out[name], b[name]) is kept, name
    assert PAPER_EXCLUDE["lora"][:2] == ("visual", "vision_tower")
    # include narrows, exclude=[] merges everything
    merge_checkpoints(base, experts, weights, tmp_path / "inc", MergeOptions(include=[r"mlp\.down_proj"], exclude=[]))
    out = load_model(tmp_path / "inc")
    assert [n for n in out if not torch.equal(out[n], b[n])] == [
        f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)
    ]


def test_output_dtype_side_files_and_record(tmp_path: Path) -> None:
    base, experts = make_set(tmp_path, torch.bfloat16, shards=1)
    weights = {"e0": 0.5, "e1": 0.5}
    stats = merge_checkpoints(base, experts, weights, tmp_path / "out", MergeOptions(dtype="float32", exclude=[]))
    out = load_model(tmp_path / "out")
    assert all(t.dtype == torch.float32 for t in out.values())
    ref = linear_reference(base, experts, weights)
    b, xs = load_model(base), [load_model(experts[e]) for e in ("e0", "e1")]
    for k in ref:  # float32 output: no rounding to bf16 at all
        expected = 0.5 * xs[0][k].float() + 0.5 * xs[1][k].float()
        torch.testing.assert_close(out[k], expected, rtol=1e-6, atol=1e-6)
    assert b.keys() == out.keys()
    assert {"config.json", "tokenizer_config.json", "preprocessor_config.json", "model.safetensors"} <= set(stats.files)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"
    record = json.loads((tmp_path / "out" / "dmo_merge.json").read_text())
    assert record["method"] == "linear" and record["weights"] == weights and record["exclude"] == []


def test_threads_and_chunking_do_not_change_a_byte(tmp_path: Path) -> None:
    base, experts = make_set(tmp_path, torch.bfloat16)
    weights = {"e0": 0.2, "e1": 0.3, "e2": 0.5}
    merge_checkpoints(
        base, experts, weights, tmp_path / "a", MergeOptions(threads=1, exclude=[], params={"scale": 0.9})
    )
    merge_checkpoints(
        base, experts, weights, tmp_path / "b", MergeOptions(threads=4, chunk=64, exclude=[], params={"scale": 0.9})
    )
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_output_loads_with_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    base, experts = make_set(tmp_path, torch.float32, shards=2)
    merge_checkpoints(
        base, experts, {"e0": 0.5, "e1": 0.5}, tmp_path / "out", MergeOptions(exclude=[], max_shard_size=5000)
    )
    model = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "out"))
    state = model.state_dict()
    for k, v in load_model(tmp_path / "out").items():
        assert torch.equal(state[k], v), k


# ---------------------------------------------------------------------------------------- other delta methods


def _stacked_deltas(base: Path, experts: Mapping[str, Path], names: list[str]) -> tuple[dict, dict]:
    b = load_model(base)
    xs = [load_model(experts[e]) for e in names]
    return b, {k: torch.stack([x[k].float() - v.float() for x in xs]) for k, v in b.items()}


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.5, "consensus": "count", "normalize": False, "scale": 0.8}),
        ("dare", {"drop_rate": 0.5, "seed": 3}),
        ("dare_ties", {"drop_rate": 0.3, "rescale": "l1"}),
    ],
)
def test_delta_methods_stream_like_the_registered_function(tmp_path: Path, method: str, params: dict) -> None:
    base, experts = make_set(tmp_path, torch.float32)
    weights = {"e0": 0.5, "e1": 0.3, "e2": 0.2}
    merge_checkpoints(base, experts, weights, tmp_path / "out", MergeOptions(method=method, params=params, exclude=[]))
    # statistics, trim thresholds and masks do not depend on how the tensors are cut into chunks
    merge_checkpoints(
        base,
        experts,
        weights,
        tmp_path / "small",
        MergeOptions(method=method, params=params, exclude=[], chunk=48, threads=3),
    )
    a, b = load_model(tmp_path / "out"), load_model(tmp_path / "small")
    assert all(torch.equal(a[k], b[k]) for k in a)
    b, deltas = _stacked_deltas(base, experts, list(weights))
    spec = registry.get_method(method)
    w = torch.tensor(list(weights.values()))
    extra = lambda k: {"name": k} if spec.takes_name else {}  # noqa: E731
    expected = {k: b[k] + spec.fn(deltas[k].clone(), w, **params, **extra(k)) for k in b}
    assert_same_model(load_model(tmp_path / "out"), expected)


def _lora_reference(
    world: dict, weights: Mapping[str, float], keep=lambda n: True, *, rounded: bool = True
) -> dict[str, torch.Tensor]:
    from dmo.merge.lora import load_lora

    b = load_model(world["base"])
    out = {k: v.float().clone() for k, v in b.items()}
    for name, w in weights.items():
        for param, m in load_lora(world["experts"][name]).modules.items():
            if keep(param):
                out[param] += w * m.scale * (m.b.float() @ m.a.float())
    return {k: v.to(b[k].dtype) for k, v in out.items()} if rounded else out


def test_lora_experts_merge_to_base_plus_weighted_deltas(lora_world: dict, tmp_path: Path) -> None:
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    stats = merge_checkpoints(
        lora_world["base"], lora_world["experts"], weights, tmp_path / "all", MergeOptions(exclude=[])
    )
    assert_same_model(load_model(tmp_path / "all"), _lora_reference(lora_world, weights))
    assert stats.excluded_adapted == ()
    # the paper's LoRA defaults keep lm_head (and norms, embeddings, biases) at the base value
    stats = merge_checkpoints(lora_world["base"], lora_world["experts"], weights, tmp_path / "paper")
    out, b = load_model(tmp_path / "paper"), load_model(lora_world["base"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    assert stats.excluded_adapted == ("lm_head.weight",)
    assert_same_model(out, _lora_reference(lora_world, weights, keep=ParamFilter("lora")))
    untouched = [k for k in b if "q_proj" not in k and "v_proj" not in k and "down_proj" not in k and "o_proj" not in k]
    assert all(torch.equal(out[k], b[k]) for k in untouched)  # not adapted: bit-identical copies


def test_adapter_form_loads_in_peft_and_equals_the_dense_merge(lora_world: dict, tmp_path: Path) -> None:
    from dmo.merge.proxy import write_lora_proxy

    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    stats = write_lora_proxy(
        lora_world["experts"], weights, tmp_path / "adapter", base=lora_world["base"], params={"scale": 0.9}
    )
    assert stats.rank == 10 and stats.excluded_adapted == ("lm_head.weight",)
    assert "max-lora-rank >= 10" in stats.summary()
    merge_checkpoints(
        lora_world["base"], lora_world["experts"], weights, tmp_path / "dense", MergeOptions(params={"scale": 0.9})
    )
    transformers, peft = lora_world["transformers"], lora_world["peft"]
    model = transformers.Qwen2ForCausalLM.from_pretrained(str(lora_world["base"]), dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    dense = load_model(tmp_path / "dense")
    for k, v in dense.items():  # PEFT merges in float32 here; the dense proxy was rounded to bf16 once
        torch.testing.assert_close(merged[k].to(torch.bfloat16).float(), v.float(), rtol=2**-7, atol=1e-6, msg=k)


def test_adapter_form_refuses_what_it_cannot_express(lora_world: dict, tmp_path: Path) -> None:
    from dmo.merge.proxy import write_lora_proxy

    with pytest.raises(DmoError, match="max_lora_rank must be >= .*use --as dense") as exc:
        write_lora_proxy(lora_world["experts"], {"a": 1.0}, tmp_path / "x", method="ties")
    one_line(exc)
    _, experts = make_set(tmp_path / "full", torch.float32, n=1)
    with pytest.raises(DmoError, match="full checkpoint"):
        write_lora_proxy(experts, {"e0": 1.0}, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_modules_to_save_are_merged_as_full_values(lora_world: dict, tmp_path: Path) -> None:
    transformers, peft = lora_world["transformers"], lora_world["peft"]
    folders = {}
    for i, name in enumerate(("s1", "s2")):
        pm = peft.get_peft_model(
            transformers.Qwen2ForCausalLM.from_pretrained(str(lora_world["base"])),
            peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        )
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if ".lora_" in n or "modules_to_save" in n:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(str(tmp_path / name))
        folders[name] = tmp_path / name
    weights = {"s1": 0.25, "s2": 0.75}
    merge_checkpoints(lora_world["base"], folders, weights, tmp_path / "out", MergeOptions(exclude=[]))
    out, b = load_model(tmp_path / "out"), load_model(lora_world["base"])
    heads = [
        load_file(str(folders[n] / "adapter_model.safetensors"))["base_model.model.lm_head.weight"] for n in folders
    ]
    expected = b["lm_head.weight"].float() + sum(
        w * (h.float() - b["lm_head.weight"].float()) for w, h in zip(weights.values(), heads)
    )
    torch.testing.assert_close(
        out["lm_head.weight"].float(), expected.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6
    )
    # PEFT saves the base layer of an adapted lm_head by default: that copy is the expert's value plus its LoRA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(
            transformers.Qwen2ForCausalLM.from_pretrained(str(lora_world["base"])), str(lora_world["experts"]["a"])
        )
        pm.save_pretrained(str(tmp_path / "with-base-layer"), save_embedding_layers=True)
    keys = load_file(str(tmp_path / "with-base-layer" / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.base_layer.weight" in keys
    both = {"a": lora_world["experts"]["a"], "x": tmp_path / "with-base-layer"}
    merge_checkpoints(lora_world["base"], both, {"a": 0.5, "x": 0.5}, tmp_path / "bl", MergeOptions(exclude=[]))
    merge_checkpoints(
        lora_world["base"], {"a": lora_world["experts"]["a"]}, {"a": 1.0}, tmp_path / "a1", MergeOptions(exclude=[])
    )
    bl, a1 = load_model(tmp_path / "bl"), load_model(tmp_path / "a1")
    for k in bl:
        torch.testing.assert_close(bl[k].float(), a1[k].float(), rtol=2**-7, atol=1e-6, msg=k)
    # the LoRA proxy functions refuse such experts instead of silently dropping the head
    from dmo.merge.lora import concat_adapter, load_lora

    with pytest.raises(DmoError, match="non-LoRA trainables"):
        concat_adapter({"s1": load_lora(folders["s1"], non_lora=True)}, {"s1": 1.0})


def test_full_and_lora_experts_mix(lora_world: dict, tmp_path: Path) -> None:
    b = load_model(lora_world["base"])
    g = torch.Generator().manual_seed(5)
    full = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in b.items()}
    write_model(tmp_path / "full", full)
    experts = {"a": lora_world["experts"]["a"], "f": tmp_path / "full"}
    weights = {"a": 0.4, "f": 0.6}
    merge_checkpoints(lora_world["base"], experts, weights, tmp_path / "out", MergeOptions(exclude=[]))
    expected = _lora_reference(lora_world, {"a": 0.4}, rounded=False)
    expected = {k: (expected[k] + 0.6 * (full[k].float() - b[k].float())).to(b[k].dtype) for k in b}
    assert_same_model(load_model(tmp_path / "out"), expected)


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.4}), ("dare_ties", {"drop_rate": 0.5})])
def test_delta_methods_on_lora_experts(lora_world: dict, tmp_path: Path, method: str, params: dict) -> None:
    from dmo.merge.lora import load_lora

    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    merge_checkpoints(
        lora_world["base"],
        lora_world["experts"],
        weights,
        tmp_path / "out",
        MergeOptions(method=method, params=params, exclude=[], chunk=40),
    )
    b = load_model(lora_world["base"])
    adapters = [load_lora(lora_world["experts"][e]) for e in weights]
    spec = registry.get_method(method)
    expected = {}
    for k, v in b.items():
        deltas = torch.stack(
            [a.modules[k].scale * (a.modules[k].b.float() @ a.modules[k].a.float()) if k in a.modules
             else torch.zeros(v.shape) for a in adapters]
        )  # fmt: skip
        if not deltas.any():
            expected[k] = v  # no expert adapts it: copied
            continue
        extra = {"name": k} if spec.takes_name else {}
        expected[k] = (v.float() + spec.fn(deltas, torch.tensor(list(weights.values())), **params, **extra)).to(v.dtype)
    assert_same_model(load_model(tmp_path / "out"), expected)


def test_robustmerge_dense_equals_its_adapter(lora_world: dict, tmp_path: Path) -> None:
    from dmo.merge.proxy import write_lora_proxy
    from dmo.merge.robustmerge import robustmerge

    experts = {k: lora_world["experts"][k] for k in ("a", "b")}
    weights = {"a": 0.5, "b": 0.5}
    merge_checkpoints(
        lora_world["base"], experts, weights, tmp_path / "dense", MergeOptions(method="robustmerge", exclude=[])
    )
    stats = write_lora_proxy(
        experts, weights, tmp_path / "ad", method="robustmerge", base=lora_world["base"], exclude=[]
    )
    assert stats.rank == 4
    from dmo.merge.lora import load_lora

    adapters = [load_lora(experts[k]) for k in experts]
    merged_adapter = load_lora(tmp_path / "ad")
    b, out = load_model(lora_world["base"]), load_model(tmp_path / "dense")
    for param, m in merged_adapter.modules.items():
        mods = [a.modules[param] for a in adapters]
        a_m, b_m = robustmerge(
            torch.stack([x.a for x in mods]), torch.stack([x.b for x in mods]), torch.tensor([0.5, 0.5])
        )
        torch.testing.assert_close(m.a, a_m)
        torch.testing.assert_close(m.b * m.scale, b_m * mods[0].scale)
        expected = (b[param].float() + mods[0].scale * b_m @ a_m).to(torch.bfloat16)
        torch.testing.assert_close(out[param].float(), expected.float(), rtol=2**-7, atol=1e-6)
    with pytest.raises(DmoError, match="same rank|different ranks"):
        merge_checkpoints(lora_world["base"], lora_world["experts"], {"a": 0.5, "c": 0.5}, tmp_path / "x",
                          MergeOptions(method="robustmerge", exclude=[]))  # fmt: skip
    assert_nothing_left(tmp_path, tmp_path / "x")


def test_lora_experts_for_another_base_are_refused(lora_world: dict, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    other = {k: torch.randn(v.shape[0] * 2 if v.dim() == 2 else v.shape[0], *v.shape[1:], generator=g)
             for k, v in load_model(lora_world["base"]).items()}  # fmt: skip
    write_model(tmp_path / "other", other)
    with pytest.raises(DmoError) as exc:
        merge_checkpoints(tmp_path / "other", {"a": lora_world["experts"]["a"]}, {"a": 1.0}, tmp_path / "out")
    message = one_line(exc)
    assert "adapter_model.safetensors" in message and "different base" in message and "adapts lm_head" in message
    assert_nothing_left(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- bad input


def _corrupt(kind: str, base: Path, experts: dict[str, Path]) -> tuple[str, ...]:
    """Damage the set in one way; returns strings the error must contain."""
    e1 = experts["e1"]
    shard = sorted(e1.glob("*.safetensors"))[-1]
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    if kind == "shape":
        tensors[name] = torch.zeros(3, 3, dtype=tensors[name].dtype)
        save_file(tensors, str(shard), metadata={"format": "pt"})
        return ("expert 'e1'", name, str(shard), "different base")
    if kind == "missing":
        del tensors[name]
        save_file(tensors, str(shard), metadata={"format": "pt"})
        index = json.loads((e1 / "model.safetensors.index.json").read_text())
        del index["weight_map"][name]
        (e1 / "model.safetensors.index.json").write_text(json.dumps(index))
        return ("expert 'e1'", name, "lacks")
    if kind == "extra":
        tensors["model.extra_head.weight"] = torch.zeros(2, 2, dtype=tensors[name].dtype)
        save_file(tensors, str(shard), metadata={"format": "pt"})
        index = json.loads((e1 / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.extra_head.weight"] = shard.name
        (e1 / "model.safetensors.index.json").write_text(json.dumps(index))
        return ("expert 'e1'", "model.extra_head.weight", str(shard), "does not exist in the base")
    if kind == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 7])
        return ("truncated", str(shard), "re-copy")
    if kind == "nan":
        t = tensors[name].clone()
        t.view(-1)[3] = float("nan")
        tensors[name] = t
        save_file(tensors, str(shard), metadata={"format": "pt"})
        return ("expert 'e1'", name, str(shard), "NaN or Inf")
    if kind == "inf-base":
        shard = sorted(base.glob("*.safetensors"))[0]
        tensors = load_file(str(shard))
        name = sorted(tensors)[-1]
        t = tensors[name].clone()
        t.view(-1)[0] = float("inf")
        tensors[name] = t
        save_file(tensors, str(shard), metadata={"format": "pt"})
        return ("the base", name, str(shard), "NaN or Inf")
    if kind == "index":
        (e1 / "model.safetensors.index.json").write_text("{not json")
        return ("corrupt", str(e1 / "model.safetensors.index.json"))
    if kind == "missing-shard":
        shard.unlink()
        return ("expert 'e1'", str(shard), "missing")
    if kind == "bin":
        shutil.rmtree(e1)
        e1.mkdir()
        torch.save({"x": torch.zeros(1)}, str(e1 / "pytorch_model.bin"))
        return ("expert 'e1'", ".bin", "--allow-bin")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["shape", "missing", "extra", "truncated", "nan", "inf-base", "index", "missing-shard", "bin"]
)
def test_bad_checkpoints_give_one_line_naming_file_and_tensor(tmp_path: Path, kind: str) -> None:
    base, experts = make_set(tmp_path, torch.bfloat16)
    needles = _corrupt(kind, base, experts)
    out = tmp_path / "out"
    with pytest.raises(DmoError) as exc:
        merge_checkpoints(
            base, experts, {"e0": 0.3, "e1": 0.5, "e2": 0.2}, out, MergeOptions(exclude=[], params={"scale": 0.9})
        )
    message = one_line(exc)
    for needle in needles:
        assert needle in message, (needle, message)
    assert_nothing_left(tmp_path, out)


def test_bin_checkpoints_only_behind_the_flag(tmp_path: Path) -> None:
    base, experts = make_set(tmp_path, torch.float32, n=1)
    state = load_model(experts["e0"])
    shutil.rmtree(experts["e0"])
    experts["e0"].mkdir()
    torch.save(state, str(experts["e0"] / "pytorch_model.bin"))
    merge_checkpoints(base, experts, {"e0": 0.5}, tmp_path / "out", MergeOptions(exclude=[], allow_bin=True))
    b = load_model(base)
    assert_same_model(load_model(tmp_path / "out"), {k: v + 0.5 * (state[k] - v) for k, v in b.items()})


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    base, experts = make_set(tmp_path, torch.float32, n=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DmoError, match="already exists: remove it or pass --overwrite") as exc:
        merge_checkpoints(base, experts, {"e0": 1.0}, out)
    one_line(exc)
    assert (out / "keep.txt").read_text() == "mine"
    merge_checkpoints(base, experts, {"e0": 1.0}, out, MergeOptions(overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_full_disk_mid_write_names_the_tensor_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    base, experts = make_set(tmp_path, torch.bfloat16)
    calls = {"n": 0}
    real = ckpt_mod.pwrite

    def full(fd: int, data: memoryview, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(ckpt_mod, "pwrite", full)
    out = tmp_path / "out"
    with pytest.raises(DmoError) as exc:
        merge_checkpoints(base, experts, {"e0": 0.5, "e1": 0.5}, out, MergeOptions(exclude=[], threads=2))
    message = one_line(exc)
    assert "no space left on device while writing tensor model." in message and ".safetensors" in message
    assert_nothing_left(tmp_path, out)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a tmpfs")
def test_really_full_disk_fails_before_merging(tmp_path: Path) -> None:
    base, experts = make_set(tmp_path, torch.float32)
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(DmoError, match="disk space|no space left") as exc:
            merge_checkpoints(base, experts, {"e0": 0.5, "e1": 0.5}, small / "out", MergeOptions(exclude=[]))
        one_line(exc)
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"weights": {"zz": 1.0}}, "unknown expert 'zz'"),
        ({"weights": {"e0": 0.0}}, "all mixture weights are 0"),
        ({"weights": {"e0": float("nan")}}, "finite"),
        ({"method": "nope"}, "unknown merge method 'nope'"),
        ({"method": "ties", "params": {"k": 2}}, "no parameter 'k'; its parameters: density=0.2"),
        ({"method": "robustmerge"}, "LoRA experts only.*full checkpoint"),
        ({"exclude": ["("]}, "invalid exclude pattern"),
        ({"dtype": "int8"}, "unknown output dtype"),
        ({"device": "cuda"} if not torch.cuda.is_available() else {"device": "cuda:99"}, "CUDA|cuda"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, pattern: str) -> None:
    base, experts = make_set(tmp_path, torch.float32, n=1)
    args = {"weights": {"e0": 1.0}} | kwargs
    with pytest.raises((DmoError, RuntimeError)) as exc:
        merge_checkpoints(base, experts, args.pop("weights"), tmp_path / "out", MergeOptions(**args))
    assert exc.type is DmoError or "cuda:99" in str(kwargs)
    assert __import__("re").search(pattern, one_line(exc))
    assert_nothing_left(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------- manifests, rounding


def test_manifest_paper_rounding_and_zero_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmo.merge.proxy import merge_manifest, mixture_weights

    base, experts = make_set(tmp_path, torch.float32, n=3)
    manifest = tmp_path / "experts.yaml"
    manifest.write_text(
        "name: tiny\nkind: full\nbudget: 7\nbase: ./base\nexperts: {general: ./e0, ocr: ./e1, chart: ./e2}\n"
    )
    from dmo.manifest import load_manifest

    loaded = load_manifest(manifest)
    # round(w * 7) / 7: 0.3 -> 2/7, 0.65 -> 5/7 (sum 1), 0.05 -> 0 (dropped); no renormalisation
    assert mixture_weights(loaded, "general=0.3,ocr=0.65,chart=0.05", paper_rounding=True) == {
        "general": 2 / 7, "ocr": 5 / 7,
    }  # fmt: skip
    assert mixture_weights(loaded, "general=0.5,ocr=0.5") == {"general": 0.5, "ocr": 0.5}
    stats = merge_manifest(manifest, "general=0.3,ocr=0.65,chart=0.05", tmp_path / "out", paper_rounding=True)
    record = json.loads((tmp_path / "out" / "dmo_merge.json").read_text())
    assert record["weights"] == {"general": 2 / 7, "ocr": 5 / 7} and record["paper_rounding"] is True
    assert stats.merged > 0
    expected = linear_reference(base, {"general": experts["e0"], "ocr": experts["e1"]}, record["weights"],
                                keep=ParamFilter("full"))  # fmt: skip
    assert_same_model(load_model(tmp_path / "out"), expected)
    manifest.write_text("name: tiny\nbase: Qwen/Qwen2-VL-2B\nexperts: {general: ./e0}\n")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a hub base is fetched: offline, from an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(
        DmoError, match="base of manifest 'tiny': hub repository Qwen/Qwen2-VL-2B is not in the hub cache"
    ):
        merge_manifest(manifest, "general=1", tmp_path / "hub")
    assert not (tmp_path / "hub").exists()
    manifest.write_text("name: tiny\nbase: ./base\nexperts: {general: ./e0}\n")
    with pytest.raises(DmoError, match="needs the training budget"):
        merge_manifest(manifest, "general=1", tmp_path / "nobudget", paper_rounding=True)
