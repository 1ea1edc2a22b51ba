"""InternVL (transformers' ``InternVLForConditionalGeneration``, the layout of the paper's ``-HF`` exports) end to end.

A tiny random InternVL with LoRA and full fine-tuned experts (:mod:`dmo.tinyworld.internvl`) is merged by ``dmo
merge`` and compared with a reference computed here on the models' own state dicts (PEFT merges each LoRA expert;
the paper's filters are its regular expressions, copied from its ``model_merging.py`` and matched as it does);
the hf backend scores a proxy on lmms-eval tasks whose answers are what that reference model answers; custom
(remote-code) InternVL checkpoints and multimodal families dmo does not know are refused in one line. The vllm
test starts vLLM's CPU engine (``InternVLForConditionalGeneration`` is served by its ``InternS1`` model) and runs
from ``.venv-vllm``: ``.venv-vllm/bin/python -m pytest -m vllm tests/test_internvl.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dmo.cli import app
from dmo.errors import DmoError
from dmo.manifest import ExpertManifest, load_manifest
from dmo.merge.experts import ParamFilter
from dmo.merge.families import FAMILIES, family_of
from dmo.merge.stream import MergeOptions, merge_checkpoints
from dmo.mixture import Mixture
from dmo.scoring.base import Target
from dmo.scoring.hf_backend import HFScorer
from dmo.scoring.lmms_model import load_pretrained
from dmo.scoring.tasks import write_tiny_tasks
from dmo.tinyworld.data import write_domain
from dmo.tinyworld.internvl import build_internvl_world

DOMAINS = ("general", "ocr")
BENCHMARKS = ["dmo_tiny_general", "dmo_tiny_ocr"]
WEIGHTS = {"general": 0.3, "ocr": 0.7}
MAX_NEW_TOKENS = 4
TEST_ITEMS = 6

#: The DMO paper's filters, verbatim from its model_merging.py (matched with re.match on live parameter names).
PAPER_LORA = [
    ".*visual.*", ".*embed_tokens.*", ".*lm_head.*", ".*norm.*", ".*bias.*", ".*vision_tower.*",
    ".*multi_modal_projector.*",
]  # fmt: skip
PAPER_FULL = [".*visual.blocks.*", ".*visual.patch_embed.*", ".*vision_tower.*"]


def paper_keeps(name: str, patterns: Sequence[str]) -> bool:
    """Whether the paper merges parameter ``name`` (its get_param_names_to_merge)."""
    return not any(re.match(p, name) for p in patterns)


# --------------------------------------------------------------------------------------------------- references


def load_live(folder: Path) -> torch.nn.Module:
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(str(folder), local_files_only=True).eval()


def expert_state(base: Path, expert: Path) -> dict[str, torch.Tensor]:
    """An expert's full weights by live name: PEFT merges a LoRA adapter into the base, a full one is loaded."""
    if (expert / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(load_live(base), str(expert)).merge_and_unload().state_dict()
    return load_live(expert).state_dict()


def reference_merge(
    base: Path, experts: Mapping[str, Path], weights: Mapping[str, float], paper: Sequence[str]
) -> dict[str, torch.Tensor]:
    """theta_base + sum_i w_i (theta_i - theta_base) on the parameters the paper merges, the base elsewhere."""
    theta = load_live(base).state_dict()
    thetas = {d: expert_state(base, p) for d, p in experts.items()}
    out = {}
    for name, value in theta.items():
        out[name] = value.clone()
        if paper_keeps(name, paper):
            for d, w in weights.items():
                out[name] += w * (thetas[d][name] - value)
    return out


def assert_state_close(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(actual[name], want, rtol=1e-5, atol=1e-6, msg=name)


def greedy_answers(model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], questions: Sequence[str]):
    """Greedy answers with transformers' own generate: one left-padded batch, stop at end of turn or padding."""
    tok = processor.tokenizer
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in questions
    ]
    pixels = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous() for im in images]
    batch = processor(text=prompts, images=pixels, padding=True, padding_side="left", return_tensors="pt")
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)  # fmt: skip
    return [a.strip() for a in tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)]


def rows(data: Path, domain: str) -> list[dict]:
    return [json.loads(line) for line in (data / domain / "test.jsonl").read_text().splitlines() if line.strip()]


def domain_images(data: Path, domain: str) -> list[Image.Image]:
    out = []
    for r in rows(data, domain):
        with Image.open(data / domain / r["image"]) as im:
            out.append(im.convert("RGB"))
    return out


def proxy(weights: Mapping[str, float]) -> Target:
    return Target("proxy", mixture=Mixture.from_mapping(dict(weights), DOMAINS))


def merge_cli(manifest: Path, out: Path, *extra: str) -> Any:
    weights = ",".join(f"{d}={w}" for d, w in WEIGHTS.items())
    return CliRunner().invoke(app, ["merge", "--experts", str(manifest), "--weights", weights, "--out", str(out),
                                    *extra])  # fmt: skip


# ------------------------------------------------------------------------------------------------------- world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("internvl")
    w = build_internvl_world(root / "world", DOMAINS)
    return SimpleNamespace(root=root, w=w, base=w.base)


@pytest.fixture(scope="module")
def tasks(world: SimpleNamespace) -> SimpleNamespace:
    """Tiny-world test items whose answers are what the reference linear proxy of the LoRA experts answers, so that
    a backend scores 1.0 on that proxy exactly when it answers every item like the reference."""
    data = world.root / "scoring"
    for domain in DOMAINS:
        write_domain(data, domain, seed=0, sizes={"train": 1, "test": TEST_ITEMS}, image_size=56)
    model = load_live(world.base)
    model.load_state_dict(reference_merge(world.base, world.w.lora, WEIGHTS, PAPER_LORA))
    processor = load_pretrained(world.base)[1]
    expected = {}
    for domain in DOMAINS:
        items = rows(data / "data", domain)
        expected[domain] = greedy_answers(model, processor, domain_images(data / "data", domain),
                                          [r["question"] for r in items])  # fmt: skip
        text = "".join(json.dumps({**r, "answer": a}) + "\n" for r, a in zip(items, expected[domain]))
        (data / "data" / domain / "test.jsonl").write_text(text)
    # answers of a random model, but varied ones: a wrong backend would not match them by chance
    assert len({a for answers in expected.values() for a in answers}) >= TEST_ITEMS
    write_tiny_tasks(data / "data", world.root / "tasks", list(DOMAINS), max_new_tokens=MAX_NEW_TOKENS)
    return SimpleNamespace(data=data / "data", folder=world.root / "tasks", expected=expected, model=model)


# ------------------------------------------------------------------------------------------------------- tests


def test_the_world_is_a_real_internvl_in_the_hf_layout(world: SimpleNamespace) -> None:
    from transformers import AutoProcessor, InternVLForConditionalGeneration, InternVLProcessor

    model = load_live(world.base)
    assert type(model) is InternVLForConditionalGeneration
    processor = AutoProcessor.from_pretrained(str(world.base), local_files_only=True)
    assert isinstance(processor, InternVLProcessor)
    enc = processor(text=["<IMG_CONTEXT>\nhow many"], images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    n_context = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_context == model.config.image_seq_length == processor.image_seq_length == 4
    assert family_of(world.base).name == "InternVL"
    base = model.state_dict()
    for domain in DOMAINS:
        adapter = json.loads((world.w.lora[domain] / "adapter_config.json").read_text())
        assert "language_model" in adapter["target_modules"]
        lora = expert_state(world.base, world.w.lora[domain])
        changed = {n for n, t in lora.items() if not torch.equal(t, base[n])}
        assert changed and all(".language_model.layers." in n and n.endswith("proj.weight") for n in changed)
        full = expert_state(world.base, world.w.full[domain])
        assert all(not torch.equal(t, base[n]) for n, t in full.items())  # the vision tower too
    manifest = load_manifest(world.w.lora_manifest)
    assert manifest.kind == "lora" and list(manifest.experts) == list(DOMAINS) and not manifest.trust_remote_code


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_dmo_merge_equals_the_reference_with_the_papers_filters(world: SimpleNamespace, kind: str) -> None:
    manifest = world.w.lora_manifest if kind == "lora" else world.w.full_manifest
    out = world.root / f"proxy-{kind}"
    result = merge_cli(manifest, out)
    assert result.exit_code == 0, result.output
    experts = world.w.lora if kind == "lora" else world.w.full
    paper = PAPER_LORA if kind == "lora" else PAPER_FULL
    merged = load_live(out).state_dict()
    assert_state_close(merged, reference_merge(world.base, experts, WEIGHTS, paper))
    base = load_live(world.base).state_dict()
    kept = {n for n in base if torch.equal(merged[n], base[n])}
    if kind == "full":
        # the vision tower stays at the base, the projector and the language model (head, embeddings) move
        assert kept == {n for n in base if n.startswith("model.vision_tower.")} and kept
        assert not any(n.startswith(("model.multi_modal_projector.", "model.language_model.", "lm_head")) for n in kept)
        assert "vision_tower" in json.loads((out / "dmo_merge.json").read_text())["exclude"]


def test_the_lora_filter_keeps_a_projector_adapter_at_the_base(world: SimpleNamespace) -> None:
    """LoRA experts that also adapt the projector: the paper keeps its base value; --exclude none merges it."""
    import peft

    folders = {}
    for i, domain in enumerate(DOMAINS):
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["linear_1", "linear_2", "q_proj", "down_proj"])
        model = peft.get_peft_model(load_live(world.base), cfg)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        folders[domain] = world.root / "projector" / domain
        model.save_pretrained(str(folders[domain]))
    manifest = world.root / "projector.yaml"
    manifest.write_text(
        f"name: projector\nbase: {world.base}\nexperts: {json.dumps({d: str(p) for d, p in folders.items()})}\n"
    )
    result = merge_cli(manifest, world.root / "proxy-projector")
    assert result.exit_code == 0, result.output
    merged = load_live(world.root / "proxy-projector").state_dict()
    assert_state_close(merged, reference_merge(world.base, folders, WEIGHTS, PAPER_LORA))
    base = load_live(world.base).state_dict()
    projector = [n for n in base if n.startswith("model.multi_modal_projector.linear_")]
    assert projector and all(torch.equal(merged[n], base[n]) for n in projector)
    assert any(not torch.equal(merged[n], base[n]) for n in merged if "q_proj" in n)
    result = merge_cli(manifest, world.root / "proxy-projector-all", "--exclude", "none")
    assert result.exit_code == 0, result.output
    merged = load_live(world.root / "proxy-projector-all").state_dict()
    assert_state_close(merged, reference_merge(world.base, folders, WEIGHTS, []))
    assert all(not torch.equal(merged[n], base[n]) for n in projector if n.endswith("weight"))


def test_the_papers_filters_cover_every_family_dmo_knows() -> None:
    """dmo's default filters keep what the paper keeps on every known family's vision tower and projector names."""
    samples = {
        "Qwen2-VL": ["visual.blocks.0.attn.qkv.weight", "visual.patch_embed.proj.weight", "visual.merger.mlp.0.weight"],
        "InternVL": ["model.vision_tower.encoder.layer.0.attention.q_proj.weight",
                     "vision_tower.embeddings.cls_token", "model.multi_modal_projector.linear_1.weight",
                     "multi_modal_projector.layer_norm.weight"],
    }  # fmt: skip
    assert {f.name for f in FAMILIES} == set(samples)
    for family in FAMILIES:
        for name in samples[family.name]:
            for kind, paper in (("lora", PAPER_LORA), ("full", PAPER_FULL)):
                assert ParamFilter(kind)(name) == paper_keeps(name, paper), (family.name, kind, name)
            part = "vision" if any(re.search(p, name) for p in family.vision) else "projector"
            assert any(re.search(p, name) for p in getattr(family, part)), name


def test_the_hf_backend_scores_an_internvl_proxy_like_the_reference(world: SimpleNamespace, tasks: Any) -> None:
    manifest = load_manifest(world.w.lora_manifest)
    hf = HFScorer(manifest, include_path=tasks.folder, device="cpu")
    got = hf.evaluate(proxy(WEIGHTS), BENCHMARKS)
    assert not got.errors and got.scores == dict.fromkeys(BENCHMARKS, 1.0)
    # the answers depend on the weights: another mixture and the base answer some item differently
    other = hf.evaluate(proxy({"general": 0.9, "ocr": 0.1}), BENCHMARKS)
    base = hf.evaluate(Target("base"), BENCHMARKS)
    assert min(other.scores.values()) < 1.0 and min(base.scores.values()) < 1.0


def custom_internvl(folder: Path) -> Path:
    """What OpenGVLab's own (remote-code) InternVL checkpoints look like: InternVLChatModel, auto_map."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "llm_config": {"architectures": ["Qwen2ForCausalLM"]},
        "vision_config": {"architectures": ["InternVisionModel"]},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"mlp1.1.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    return folder


def test_custom_internvl_checkpoints_are_refused_with_how_to_convert_them(tmp_path: Path) -> None:
    from dmo.scoring.vllm.backend import VLLMScorer

    base = custom_internvl(tmp_path / "InternVL3_5-2B")
    expert = tmp_path / "e"
    expert.mkdir()
    (tmp_path / "m.yaml").write_text(f"name: c\nbase: {base}\nkind: full\nexperts: {{general: {expert}}}\n")
    for call in (
        lambda: family_of(base),
        lambda: load_pretrained(base),
        lambda: merge_checkpoints(base, {"general": expert}, {"general": 1.0}, tmp_path / "out"),
        lambda: merge_checkpoints(
            base, {"general": expert}, {"general": 1.0}, tmp_path / "out", MergeOptions(exclude=[])
        ),
        lambda: VLLMScorer(load_manifest(tmp_path / "m.yaml")),
    ):
        with pytest.raises(DmoError) as exc:
            call()
        message = str(exc.value)
        assert "\n" not in message and "custom InternVL" in message, message
        assert "convert_internvl_weights_to_hf.py" in message and "-HF" in message and str(base) in message
    result = CliRunner().invoke(app, ["merge", "--experts", str(tmp_path / "m.yaml"), "--weights", "general=1",
                                      "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code != 0 and "convert_internvl_weights_to_hf.py" in result.output + str(result.exception)
    assert not (tmp_path / "out").exists()


def test_a_multimodal_family_dmo_does_not_know_is_refused_in_one_line(world: SimpleNamespace, tmp_path: Path) -> None:
    import shutil

    from dmo.scoring.vllm.backend import VLLMScorer

    base = tmp_path / "llava"
    shutil.copytree(world.base, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "llava", "architectures": ["Llava"]}))
    experts = {"general": world.w.full["general"]}
    with pytest.raises(DmoError) as exc:
        merge_checkpoints(base, experts, {"general": 1.0}, tmp_path / "out")
    message = str(exc.value)
    assert "\n" not in message and "does not know the layout" in message and "--exclude" in message, message
    manifest = ExpertManifest.model_validate(
        {"name": "x", "base": {"path": base}, "experts": {"general": {"path": world.w.lora["general"]}}}
    )
    with pytest.raises(DmoError, match="does not know the layout"):
        VLLMScorer(manifest)
    # with the parameters to keep named explicitly, the merge does not depend on the family's names
    merge_checkpoints(base, experts, {"general": 1.0}, tmp_path / "out", MergeOptions(exclude=["vision_tower"]))
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # text-only models have no vision parts to name
    text = tmp_path / "text"
    text.mkdir()
    (text / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    assert family_of(text).name == "text-only"


# ------------------------------------------------------------------------------------------- the real vLLM engine


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_internvl_proxies_like_transformers(world: SimpleNamespace, tasks: Any) -> None:
    """vLLM's CPU engine on the tiny InternVL: a linear proxy as an adapter and written into the weights, a
    full-expert proxy written (its vision tower at the base, as dmo merge keeps it), the base; every answer equals
    transformers' on the same merged checkpoint, and the adapter-served proxy scores 1.0 on items whose answers are
    the reference's."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"this test starts a real vLLM engine: run it from .venv-vllm ({exc})")
    from dmo.scoring.vllm.backend import VLLMScorer
    from dmo.scoring.vllm.lmms import answers

    lora = load_manifest(world.w.lora_manifest)
    engine = VLLMScorer(lora, include_path=tasks.folder, adapter_dir=world.root / "adapters", lora=True,
                        max_model_len=256)  # fmt: skip
    full = VLLMScorer(load_manifest(world.w.full_manifest), include_path=tasks.folder,
                      llm_factory=lambda **_: engine.lmm.llm)  # the same engine  # fmt: skip
    processor = load_pretrained(world.base)[1]
    try:
        ties = Target(
            "proxy", mixture=Mixture.from_mapping(WEIGHTS, DOMAINS), method="ties", params=(("density", 0.5),)
        )
        cases = [
            (engine, lora, proxy(WEIGHTS), "adapter"),
            (engine, lora, ties, "write"),
            (full, load_manifest(world.w.full_manifest), proxy(WEIGHTS), "write"),
            (full, lora, Target("base"), "base"),  # the scorer that wrote last restores the base
        ]
        seen = []
        for i, (scorer, manifest, target, route) in enumerate(cases):
            assert scorer.route(target) == route, target
            got = scorer.evaluate(target, BENCHMARKS)
            assert not got.errors, got.errors
            if i == 0:
                assert got.scores == dict.fromkeys(BENCHMARKS, 1.0)
            folder = world.root / f"vllm-ref{i}"
            if target.kind == "base":
                model = load_live(world.base)
            else:
                experts = {d: Path(manifest.experts[d].path) for d in DOMAINS}
                # every route keeps what dmo merge's default (the paper's) filter keeps: the full experts' vision
                # tower stays at the base on the vllm write route too
                merge_checkpoints(
                    world.base,
                    experts,
                    WEIGHTS,
                    folder,
                    MergeOptions(method=target.method or "linear", params=dict(target.params)),
                )
                model = load_live(folder)
            mine = answers(scorer.lmm)
            want = {}
            for domain, task in zip(DOMAINS, BENCHMARKS):
                keys = sorted((k for k in mine if k[0] == task), key=lambda k: k[2])
                items = rows(tasks.data, domain)
                ref = greedy_answers(
                    model, processor, domain_images(tasks.data, domain), [r["question"] for r in items]
                )
                want |= {k: ref[k[2]] for k in keys}
            assert mine == want, f"case {i}: {target.kind} {target.method} via {route}"
            seen.append(json.dumps(sorted(mine.items())))
        assert len(set(seen)) == len(seen)  # every target answered differently: the comparisons prove something
    finally:
        engine.close()
