"""LoRA proxies: the concatenated adapter, the dense delta, PEFT's own merge and a naive reference agree.

Tiny randomly initialised models (a Qwen2-VL with a vision tower, and a plain Qwen2 causal LM) get random
non-zero LoRA experts saved by PEFT itself, so the key naming under test is what PEFT really writes.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dmo.errors import DmoError  # noqa: E402
from dmo.merge import registry  # noqa: E402
from dmo.merge.lora import (  # noqa: E402
    KeyMap,
    LoraAdapter,
    LoraModule,
    applied_delta,
    concat_adapter,
    expert_delta,
    fingerprint,
    load_lora,
    lora_delta,
    merge_dense,
    write_adapter,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

WEIGHTS = {"e1": 0.4, "e2": 0.3, "e3": 0.2, "e4": 0.1}


# ------------------------------------------------------------------------------------------------- tiny worlds


def _qwen2vl_config() -> transformers.PretrainedConfig:
    return transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3, patch_size=2,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4,
    )  # fmt: skip


def _qwen2_config(tied: bool = False) -> transformers.PretrainedConfig:
    return transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _qwen2vl_inputs() -> dict[str, torch.Tensor]:
    # one 4x4-patch image (4 merged tokens) between vision start/end tokens, so the vision tower runs too
    ids = torch.tensor([[1, 10, 3, 5, 5, 5, 5, 4, 11, 12, 13]])
    g = torch.Generator().manual_seed(7)
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(16, 3 * 2 * 2 * 2, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "mm_token_type_ids": (ids == 5).long(),
    }


def _text_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 17, 33, 9, 100, 42, 7, 2]])}


# Expert recipes: different ranks, rsLoRA with rank/alpha patterns, partial module sets, vision modules.
_RECIPES = {
    "qwen2_vl": {
        "e1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "qkv", "fc1"]),
        "e2": dict(
            r=8, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3},
            target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        "e3": dict(r=2, lora_alpha=2, target_modules=["o_proj", "down_proj"], layers_to_transform=[1]),
        "e4": dict(r=4, lora_alpha=4, target_modules="all-linear"),
    },
    "qwen2": {
        "e1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "e2": dict(
            r=8, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3},
            target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        "e3": dict(r=2, lora_alpha=2, target_modules=["o_proj", "down_proj"], layers_to_transform=[1]),
        "e4": dict(r=4, lora_alpha=4, target_modules="all-linear"),
    },
}  # fmt: skip


@dataclass
class World:
    kind: str
    base: Path
    model_cls: type
    experts: dict[str, Path]
    inputs: Callable[[], dict[str, torch.Tensor]]

    def model(self) -> torch.nn.Module:
        return self.model_cls.from_pretrained(str(self.base)).eval()


def _randomise_lora(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:  # non-zero B too, so every module really contributes
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _make_expert(world: World, folder: Path, seed: int, **lora: object) -> Path:
    model = world.model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(**lora))
        _randomise_lora(pm, seed)
        pm.save_pretrained(str(folder))
    return folder


def _build_world(kind: str, root: Path) -> World:
    torch.manual_seed(0)
    if kind == "qwen2_vl":
        cls, cfg, inputs = transformers.Qwen2VLForConditionalGeneration, _qwen2vl_config(), _qwen2vl_inputs
    else:
        cls, cfg, inputs = transformers.Qwen2ForCausalLM, _qwen2_config(), _text_inputs
    cls(cfg).save_pretrained(str(root / "base"))
    world = World(kind, root / "base", cls, {}, inputs)
    for i, (name, recipe) in enumerate(_RECIPES[kind].items()):
        world.experts[name] = _make_expert(world, root / name, seed=100 + i, **recipe)
    return world


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2"])
def world(request, tmp_path_factory) -> World:
    return _build_world(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def vl_world(tmp_path_factory) -> World:
    return _build_world("qwen2_vl", tmp_path_factory.mktemp("vl"))


def _load_all(world: World, names: Callable[[str], str] | None = None) -> dict[str, LoraAdapter]:
    return {n: load_lora(p, names) for n, p in world.experts.items()}


def _peft_layers(pm: PeftModel, adapter: str) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """PEFT's own view of one adapter: base parameter name -> (scaling, A, B)."""
    out = {}
    for name, module in pm.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            param = name.removeprefix("base_model.model.") + ".weight"
            out[param] = (
                module.scaling[adapter],
                module.lora_A[adapter].weight.detach(),
                module.lora_B[adapter].weight.detach(),
            )
        elif isinstance(module, LoraLayer) and adapter in module.lora_embedding_A:
            raise AssertionError("embedding LoRA in a test expert")
    return out


def _peft_with_experts(world: World, names: list[str]) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(world.model(), str(world.experts[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            pm.load_adapter(str(world.experts[name]), adapter_name=name)
    return pm.eval()


# ------------------------------------------------------------------------------------------------ key mapping


def test_keys_are_the_live_model_parameter_names(world: World) -> None:
    params = set(world.model().state_dict())
    for name, adapter in _load_all(world).items():
        assert adapter.modules, name
        assert set(adapter.modules) <= params, sorted(set(adapter.modules) - params)[:3]
    if world.kind == "qwen2_vl":
        adapter = load_lora(world.experts["e1"])
        assert "model.language_model.layers.0.self_attn.q_proj.weight" in adapter.modules
        assert "model.visual.blocks.0.attn.qkv.weight" in adapter.modules


def test_key_map_turns_disk_names_into_live_names(vl_world: World) -> None:
    live = set(vl_world.model().state_dict())
    disk = set(load_file(str(vl_world.base / "model.safetensors")))
    assert "model.layers.0.self_attn.q_proj.weight" in disk and "visual.blocks.0.attn.qkv.weight" in disk
    assert disk != live  # transformers 5 renames Qwen2-VL weights on load and back on save
    names = KeyMap.for_config(vl_world.base)
    assert {names(k) for k in disk} == live
    assert all(names(k) == k for k in live)  # renaming is idempotent on live names
    assert KeyMap.for_model(vl_world.model())("visual.merger.ln_q.weight") == "model.visual.merger.ln_q.weight"


def test_key_map_is_the_identity_for_plain_modules_and_explains_bad_folders(tmp_path: Path) -> None:
    names = KeyMap.for_model(torch.nn.Linear(2, 2))
    assert names("model.layers.0.weight") == "model.layers.0.weight"
    with pytest.raises(DmoError, match="no config.json"):
        KeyMap.for_config(tmp_path)


def test_merge_dense_on_the_disk_checkpoint_needs_and_uses_the_key_map(vl_world: World) -> None:
    adapters = _load_all(vl_world)
    delta = lora_delta(adapters, WEIGHTS)
    disk = load_file(str(vl_world.base / "model.safetensors"))
    with pytest.raises(DmoError, match="KeyMap.for_config"):
        merge_dense(disk, delta)
    names = KeyMap.for_config(vl_world.base)
    merged_disk = merge_dense(disk, delta, names=names)
    merged_live = merge_dense(vl_world.model().state_dict(), delta)
    assert set(merged_disk) == set(disk)
    for k, v in merged_disk.items():
        assert torch.equal(v, merged_live[names(k)]), k


def _to_old_layout(src: Path, dst: Path) -> Path:
    """Rewrite a PEFT adapter as transformers < 4.52 saved Qwen2-VL adapters (``model.layers``, ``visual``)."""
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    old = {
        k.replace("base_model.model.model.language_model.", "base_model.model.model.").replace(
            "base_model.model.model.visual.", "base_model.model.visual."
        ): v
        for k, v in tensors.items()
    }
    save_file(old, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def test_old_layout_adapters_map_to_the_same_parameters(vl_world: World, tmp_path: Path) -> None:
    new = load_lora(vl_world.experts["e1"])
    old_folder = _to_old_layout(vl_world.experts["e1"], tmp_path / "old")
    raw = load_lora(old_folder)
    assert "model.layers.0.self_attn.q_proj.weight" in raw.modules
    assert "visual.blocks.0.attn.qkv.weight" in raw.modules
    mapped = load_lora(old_folder, KeyMap.for_config(vl_world.base))
    assert set(mapped.modules) == set(new.modules)
    for k, m in mapped.modules.items():
        assert (
            torch.equal(m.a, new.modules[k].a)
            and torch.equal(m.b, new.modules[k].b)
            and m.scale == new.modules[k].scale
        )
    # peft 0.21.2 + transformers 5.24 cannot place old-layout Qwen2-VL keys at all (it only warns "Found missing
    # adapter keys"); dmo's proxy, written in the live layout, loads exactly
    config, tensors = concat_adapter({"e1": mapped}, {"e1": 1.0})
    folder = write_adapter(tmp_path / "proxy", config, tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(vl_world.model(), str(folder))
    merged = pm.merge_and_unload().state_dict()
    ours = merge_dense(vl_world.model().state_dict(), lora_delta({"e1": new}, {"e1": 1.0}))
    for k, v in ours.items():
        torch.testing.assert_close(merged[k], v, msg=k)
    # a delta in the old layout still finds its parameters in the live model
    model = vl_world.model()
    with applied_delta(model, lora_delta({"e1": raw}, {"e1": 1.0})):
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, ours[k], msg=k)


# --------------------------------------------------------------------------------------- exactness of the proxy


def test_concat_adapter_in_peft_equals_the_dense_merge(world: World, tmp_path: Path) -> None:
    """(a) PEFT running the written concat adapter == the dense merged model, in weights and in outputs."""
    adapters = _load_all(world)
    config, tensors = concat_adapter(adapters, WEIGHTS)
    folder = write_adapter(tmp_path / "proxy", config, tensors)
    delta = lora_delta(adapters, WEIGHTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(world.model(), str(folder)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    layers = _peft_layers(pm, "default")
    assert set(layers) == set(delta)  # PEFT adapted exactly our modules: no key of ours was left unused
    assert all(scaling == 1.0 for scaling, _, _ in layers.values())
    model = world.model()
    with torch.no_grad(), applied_delta(model, delta):
        expected = model(**world.inputs()).logits
    with torch.no_grad():
        got = pm(**world.inputs()).logits
    torch.testing.assert_close(got, expected)
    merged = pm.merge_and_unload().state_dict()
    dense = merge_dense(world.model().state_dict(), delta)
    assert set(merged) == set(dense)
    for k, v in dense.items():
        torch.testing.assert_close(merged[k], v, msg=k)


def test_dense_merge_equals_a_naive_per_matrix_reference(world: World) -> None:
    """(b) base + sum_i w_i s_i B_i A_i, with s, A and B read from PEFT's live layers, one matrix at a time."""
    base = world.model().state_dict()
    reference = {k: v.to(torch.float64) for k, v in base.items()}
    for name, w in WEIGHTS.items():
        pm = _peft_with_experts(world, [name])
        for param, (scaling, a, b) in _peft_layers(pm, name).items():
            reference[param] += w * scaling * (b.to(torch.float64) @ a.to(torch.float64))
    adapters = _load_all(world)
    merged = merge_dense(base, lora_delta(adapters, WEIGHTS))
    changed = 0
    for k, v in merged.items():
        torch.testing.assert_close(v, reference[k].to(v.dtype), msg=k)
        changed += not torch.equal(v, base[k])
    assert changed == len(lora_delta(adapters, WEIGHTS))
    # the registry's "linear" over per-expert dense task vectors is the same sum
    by_registry = registry.merge_deltas("linear", [expert_delta(a) for a in adapters.values()], list(WEIGHTS.values()))
    delta = lora_delta(adapters, WEIGHTS)
    assert set(by_registry) == set(delta)
    for k, v in delta.items():
        torch.testing.assert_close(by_registry[k], v, msg=k)


def test_scales_match_peft_with_rslora_and_patterns(world: World) -> None:
    """(d) per-module scaling alpha/r or alpha/sqrt(r) after rank_pattern/alpha_pattern, as PEFT computes it."""
    adapters = _load_all(world)
    for name, adapter in adapters.items():
        layers = _peft_layers(_peft_with_experts(world, [name]), name)
        assert set(layers) == set(adapter.modules)
        for param, (scaling, a, b) in layers.items():
            m = adapter.modules[param]
            assert m.scale == pytest.approx(scaling, rel=1e-12), (name, param)
            assert torch.equal(m.a, a) and torch.equal(m.b, b)
    e2 = adapters["e2"]
    ranks = {p.rsplit(".", 2)[-2]: m.rank for p, m in e2.modules.items()}
    assert ranks["v_proj"] == 2 and ranks["q_proj"] == 8
    q = next(m for p, m in e2.modules.items() if p.endswith("q_proj.weight"))
    v = next(m for p, m in e2.modules.items() if p.endswith("v_proj.weight"))
    assert q.scale == pytest.approx(3 / math.sqrt(8)) and v.scale == pytest.approx(16 / math.sqrt(2))


def test_experts_with_different_module_sets_get_fewer_blocks(world: World) -> None:
    """(e) a module adapted by some experts only gets only their blocks; the rest stay exact."""
    adapters = _load_all(world)
    config, tensors = concat_adapter(adapters, WEIGHTS)
    prefix = "model.language_model" if world.kind == "qwen2_vl" else "model"
    ranks = {
        "layers.0.self_attn.o_proj": 4 + 4,  # e1 + e4 (e3 adapts layer 1 only)
        "layers.1.self_attn.o_proj": 4 + 2 + 4,
        "layers.0.self_attn.v_proj": 4 + 2 + 4,  # e2's rank_pattern gives v_proj rank 2
        "layers.0.self_attn.q_proj": 4 + 8 + 4,
        "layers.0.mlp.gate_proj": 8 + 4,
    }
    for module, rank in ranks.items():
        a = tensors[f"base_model.model.{prefix}.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{prefix}.{module}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == rank, module
        r = config["rank_pattern"].get(f"{prefix}.{module}".replace(".", r"\."), config["r"])
        assert (
            r == rank
            and config["alpha_pattern"].get(f"{prefix}.{module}".replace(".", r"\."), config["lora_alpha"]) == r
        )
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"]
    assert set(config["target_modules"]) == {k.removesuffix(".weight") for k in lora_delta(adapters, WEIGHTS)}


def test_zero_weight_experts_are_dropped(world: World) -> None:
    adapters = _load_all(world)
    weights = {"e1": 0.5, "e2": 0.0, "e3": 0.5}
    config, tensors = concat_adapter(adapters, weights)
    without = {k: v for k, v in adapters.items() if k != "e2"}
    config2, tensors2 = concat_adapter(without, {"e1": 0.5, "e3": 0.5})
    assert config == config2 and tensors.keys() == tensors2.keys()
    assert all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    with pytest.raises(DmoError, match="all mixture weights are 0"):
        concat_adapter(adapters, {"e1": 0.0})
    with pytest.raises(DmoError, match="unknown expert 'nope'"):
        lora_delta(adapters, {"nope": 1.0})


def test_matches_peft_add_weighted_adapter_cat(world: World) -> None:
    """(c) PEFT's cat mode puts w_i * s_i on A (not B) and sets lora_alpha = r = sum of ranks: same product."""
    names = ["e1", "e2", "e3"]  # PEFT cannot cat e4: its target_modules is a string, the others lists
    weights = {n: WEIGHTS[n] for n in names}
    pm = _peft_with_experts(world, names)
    pm.add_weighted_adapter(names, [weights[n] for n in names], "cat", combination_type="cat")
    delta = lora_delta(_load_all(world), weights)
    layers = _peft_layers(pm, "cat")
    assert set(layers) == set(delta)
    for param, (scaling, a, b) in layers.items():
        assert scaling == 1.0  # the first expert (e1) is not rsLoRA, so alpha / r = 1
        torch.testing.assert_close(scaling * (b @ a), delta[param], msg=param)
    # PEFT's cat A rows are w_i * s_i * A_i, B columns plain B_i; ours are the other way round, same product
    _, ours = concat_adapter(_load_all(world), weights)
    param = next(iter(layers))
    module = param.removesuffix(".weight")
    _, peft_a, peft_b = layers[param]
    our_a, our_b = ours[f"base_model.model.{module}.lora_A.weight"], ours[f"base_model.model.{module}.lora_B.weight"]
    torch.testing.assert_close(our_b @ our_a, peft_b @ peft_a)


def test_peft_cat_with_an_rslora_first_expert_scales_by_sqrt_rank(world: World) -> None:
    """(c, d) PEFT copies use_rslora from the first expert, so its cat adapter is off by sqrt(r_total).

    With e2 (rsLoRA) first, PEFT sets r = lora_alpha = R = 8 + 4 but keeps use_rslora=True, so its scaling is
    R / sqrt(R) = sqrt(R) instead of 1 while the w_i * s_i are already folded into A. dmo's concat adapter writes
    use_rslora=false and so stays exact; PEFT's unscaled B @ A is the exact delta.
    """
    names = ["e2", "e1"]
    weights = {n: WEIGHTS[n] for n in names}
    pm = _peft_with_experts(world, names)
    pm.add_weighted_adapter(names, [weights[n] for n in names], "cat", combination_type="cat")
    total = 8 + 4  # max rank per expert (rank_pattern only lowers e2's v_proj), summed
    delta = lora_delta(_load_all(world), weights)
    for param, (scaling, a, b) in _peft_layers(pm, "cat").items():
        assert scaling == pytest.approx(math.sqrt(total))
        torch.testing.assert_close(b @ a, delta[param], msg=param)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_concat_is_exact_for_random_adapters(data) -> None:
    """Property: for any ranks, scales, weights and module subsets, B_cat @ A_cat == sum_i w_i s_i B_i A_i."""
    k = data.draw(st.integers(1, 4))
    shapes = {"m0.weight": (5, 7), "m1.weight": (3, 4), "m2.weight": (6, 2)}
    adapters, weights = {}, {}
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    for i in range(k):
        chosen = data.draw(st.lists(st.sampled_from(sorted(shapes)), min_size=1, unique=True))
        modules = {}
        for param in chosen:
            out_f, in_f = shapes[param]
            r = data.draw(st.integers(1, 5))
            scale = data.draw(st.floats(0.1, 8.0))
            modules[param] = LoraModule(
                param.removesuffix(".weight"),
                torch.randn(r, in_f, generator=g),
                torch.randn(out_f, r, generator=g),
                scale,
            )
        adapters[f"x{i}"] = _adapter(modules)
        weights[f"x{i}"] = data.draw(st.floats(-1.0, 1.0))
    reference: dict[str, torch.Tensor] = {}
    for name, adapter in adapters.items():
        for param, m in adapter.modules.items():
            if weights[name] != 0:
                term = weights[name] * m.scale * (m.b.double() @ m.a.double())
                reference[param] = reference.get(param, 0) + term
    delta = lora_delta(adapters, weights)
    assert set(delta) == set(reference)
    for param, value in reference.items():
        torch.testing.assert_close(delta[param], value.float())
    if reference:
        _, tensors = concat_adapter(adapters, weights)
        for param, value in delta.items():
            module = param.removesuffix(".weight")
            a, b = (
                tensors[f"base_model.model.{module}.lora_A.weight"],
                tensors[f"base_model.model.{module}.lora_B.weight"],
            )
            torch.testing.assert_close(b @ a, value)


def _adapter(modules: dict[str, LoraModule], content_hash: str = "0" * 64) -> LoraAdapter:
    return LoraAdapter(
        folder=Path("mem"), r=1, lora_alpha=1.0, use_rslora=False, target_modules=None, base_model_name_or_path=None,
        task_type=None, rank_pattern={}, alpha_pattern={}, modules=modules, content_hash=content_hash,
    )  # fmt: skip


def test_bf16_experts_are_scaled_in_float32() -> None:
    g = torch.Generator().manual_seed(492)
    a = torch.randn(3, 4, generator=g).to(torch.bfloat16)
    b = torch.randn(5, 3, generator=g).to(torch.bfloat16)
    adapters = {"x": _adapter({"m.weight": LoraModule("m", a, b, 0.37)})}
    _, tensors = concat_adapter(adapters, {"x": 0.3})
    assert tensors["base_model.model.m.lora_B.weight"].dtype == torch.float32
    assert torch.equal(tensors["base_model.model.m.lora_B.weight"], b.float() * (0.3 * 0.37))
    assert torch.equal(tensors["base_model.model.m.lora_A.weight"], a)  # copied, so kept exactly in bf16
    mixed = adapters | {
        "y": _adapter(
            {"m.weight": LoraModule("m", torch.randn(2, 4, generator=g), torch.randn(5, 2, generator=g), 1.0)}
        )
    }
    _, tensors = concat_adapter(mixed, {"x": 0.3, "y": 0.7})
    assert tensors["base_model.model.m.lora_A.weight"].dtype == torch.float32
    _, small = concat_adapter(mixed, {"x": 0.3, "y": 0.7}, dtype=torch.bfloat16)
    assert {t.dtype for t in small.values()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------- applying in place


def test_applied_delta_restores_the_exact_base_weights(world: World) -> None:
    """(f) including after an exception inside the block, and for a bf16 model where w + d - d != w."""
    adapters = _load_all(world)
    delta = lora_delta(adapters, WEIGHTS)
    for dtype in (torch.float32, torch.bfloat16):
        model = world.model().to(dtype)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with applied_delta(model, delta):
            after = model.state_dict()
            assert any(not torch.equal(after[k], before[k]) for k in delta)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        with pytest.raises(RuntimeError, match="boom"), applied_delta(model, delta):
            raise RuntimeError("boom")
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_applied_delta_matches_merge_dense_in_bf16(world: World) -> None:
    delta = lora_delta(_load_all(world), WEIGHTS)
    model = world.model().to(torch.bfloat16)
    expected = merge_dense(model.state_dict(), delta)
    with applied_delta(model, delta):
        for k, v in model.state_dict().items():
            assert v.dtype == torch.bfloat16 and torch.equal(v, expected[k]), k


def test_applied_delta_refuses_unknown_parameters_and_leaves_the_model_alone(world: World) -> None:
    model = world.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    delta = lora_delta(_load_all(world), WEIGHTS)
    delta["nowhere.q_proj.weight"] = torch.zeros(2, 2)
    with pytest.raises(DmoError, match="nowhere.q_proj.weight"), applied_delta(model, delta):
        pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    some = next(iter(lora_delta(_load_all(world), WEIGHTS)))
    with pytest.raises(DmoError, match="different base model"), applied_delta(model, {some: torch.zeros(1, 1)}):
        pass


def test_tied_weights_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(_qwen2_config(tied=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    delta = {"lm_head.weight": torch.ones_like(model.lm_head.weight)}
    with pytest.raises(DmoError, match="tied"), applied_delta(model, delta):
        pass
    with pytest.raises(DmoError, match="tied"):
        merge_dense(model.state_dict(), delta)


# ------------------------------------------------------------------------------------------ refusals and I/O


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_dora_is_refused(vl_world: World, tmp_path: Path) -> None:
    """(g) DoRA is not a low-rank delta."""
    folder = _make_expert(vl_world, tmp_path / "dora", seed=1, r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(DmoError) as exc:
        load_lora(folder)
    message = _one_line(exc)
    assert "DoRA" in message and str(folder) in message


def test_modules_to_save_are_refused(vl_world: World, tmp_path: Path) -> None:
    folder = _make_expert(
        vl_world, tmp_path / "mts", seed=1, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    with pytest.raises(DmoError, match="modules_to_save") as exc:
        load_lora(folder)
    assert str(folder) in _one_line(exc)


def test_embedding_lora_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(_qwen2_config()).save_pretrained(str(tmp_path / "base"))
    world = World("qwen2", tmp_path / "base", transformers.Qwen2ForCausalLM, {}, _text_inputs)
    folder = _make_expert(world, tmp_path / "emb", seed=1, r=4, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(DmoError, match="embedding|non-LoRA") as exc:
        load_lora(folder)
    assert str(folder / "adapter_model.safetensors") in _one_line(exc)


def test_other_peft_types_are_refused(vl_world: World, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            vl_world.model(), IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
        )
    pm.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(DmoError, match="IA3") as exc:
        load_lora(tmp_path / "ia3")
    assert str(tmp_path / "ia3") in _one_line(exc)


@pytest.mark.parametrize(
    "setting",
    [{"init_lora_weights": "pissa"}, {"bias": "all"}, {"fan_in_fan_out": True}, {"some_future_feature": {"x": 1}}],
)
def test_unsupported_settings_are_refused(vl_world: World, tmp_path: Path, setting: dict) -> None:
    folder = tmp_path / "x"
    shutil.copytree(vl_world.experts["e1"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | setting))
    with pytest.raises(DmoError) as exc:
        load_lora(folder)
    assert str(folder) in _one_line(exc)


def test_missing_and_corrupt_files_name_the_file(vl_world: World, tmp_path: Path) -> None:
    folder = tmp_path / "x"
    shutil.copytree(vl_world.experts["e1"], folder)
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(DmoError, match="corrupt") as exc:
        load_lora(folder)
    assert str(weights) in _one_line(exc)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(DmoError, match="corrupt") as exc:
        load_lora(folder)
    assert str(weights) in _one_line(exc)
    weights.unlink()
    with pytest.raises(DmoError, match="missing") as exc:
        load_lora(folder)
    assert str(weights) in _one_line(exc)
    weights.write_bytes(good)
    config.write_text("{not json")
    with pytest.raises(DmoError, match="corrupt") as exc:
        load_lora(folder)
    assert str(config) in _one_line(exc)
    config.unlink()
    with pytest.raises(DmoError, match="missing") as exc:
        load_lora(folder)
    assert str(config) in _one_line(exc)
    with pytest.raises(DmoError, match="does not exist"):
        load_lora(tmp_path / "absent")


def test_rank_mismatch_between_config_and_weights_is_refused(vl_world: World, tmp_path: Path) -> None:
    folder = tmp_path / "x"
    shutil.copytree(vl_world.experts["e1"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"r": 3}))
    with pytest.raises(DmoError, match="rank 4/4"):
        load_lora(folder)


def test_write_adapter_does_not_clobber(tmp_path: Path) -> None:
    adapters = {"x": _adapter({"m.weight": LoraModule("m", torch.ones(1, 2), torch.ones(2, 1), 1.0)})}
    config, tensors = concat_adapter(adapters, {"x": 1.0})
    write_adapter(tmp_path / "p", config, tensors, metadata={"dmo_fingerprint": "abc"})
    with pytest.raises(DmoError, match="already exists"):
        write_adapter(tmp_path / "p", config, tensors)
    write_adapter(tmp_path / "p", config, tensors, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary folders left behind
    assert load_lora(tmp_path / "p").modules["m.weight"].scale == 1.0


# ------------------------------------------------------------------------------------------------ fingerprints


def test_fingerprint_is_stable_and_ignores_names_order_and_zero_weights(vl_world: World) -> None:
    adapters = _load_all(vl_world)
    fp = fingerprint(adapters, WEIGHTS)
    assert len(fp) == 64
    reordered = {k: adapters[k] for k in reversed(list(adapters))}
    assert fingerprint(reordered, dict(reversed(list(WEIGHTS.items())))) == fp
    renamed = {f"d_{k}": v for k, v in adapters.items()}
    assert fingerprint(renamed, {f"d_{k}": w for k, w in WEIGHTS.items()}) == fp
    assert fingerprint(adapters, WEIGHTS | {"e4": 0.1 + 1e-9}) == fp  # rounded to 6 decimals
    assert fingerprint(adapters, WEIGHTS | {"e4": 0.11}) != fp
    assert fingerprint(adapters, WEIGHTS, method="ties") != fp
    assert fingerprint(adapters, WEIGHTS, params={"density": 0.5}) != fp
    two = {"e1": 0.5, "e2": 0.5}
    assert fingerprint(adapters, two) == fingerprint(adapters, two | {"e3": 0.0})
    code = (
        "import sys; from dmo.merge.lora import load_lora, fingerprint; "
        f"w = {WEIGHTS!r}; print(fingerprint({{n: load_lora(p) for n, p in zip(w, sys.argv[1:])}}, w))"
    )
    paths = [str(vl_world.experts[n]) for n in WEIGHTS]
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fp


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_linear_and_errors() -> None:
    assert "linear" in registry.method_names()
    method = registry.get_method("linear")
    assert method.lora_exact and method.description.startswith("Task arithmetic")
    deltas = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(704))
    w = torch.tensor([0.2, -0.5, 1.0])
    torch.testing.assert_close(method.fn(deltas, w), 0.2 * deltas[0] - 0.5 * deltas[1] + deltas[2])
    with pytest.raises(DmoError, match="unknown merge method 'nope'; available: .*linear"):
        registry.get_method("nope")
    with pytest.raises(DmoError, match="registered twice"):
        registry.merge_method("linear")(lambda deltas, weights: deltas[0])
    merged = registry.merge_deltas("linear", [{"p": torch.ones(2)}, {"q": torch.ones(3)}], [0.25, 0.5])
    assert torch.equal(merged["p"], torch.full((2,), 0.25)) and torch.equal(merged["q"], torch.full((3,), 0.5))
