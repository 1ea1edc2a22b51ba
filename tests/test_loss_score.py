"""Validation loss as a score: ``loss:<domain>`` benchmarks (dmo/scoring/loss.py) on the hf and vllm backends.

The loss is checked against a reference written here from its definition: a plain transformers forward per row, the
prompt rendered by the processor's chat template, labels on the answer and its end-of-turn token only, the mean over
all answer tokens; the proxy's weights come from PEFT's own merge of each expert. The vllm test runs the real CPU
engine (``.venv-vllm/bin/python -m pytest -m vllm tests/test_loss_score.py``).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from dmo.errors import DmoError
from dmo.manifest import load_manifest
from dmo.mixture import Mixture
from dmo.results import ResultsTable
from dmo.scoring.base import ScoringContext, Target, make_scorer, score_targets
from dmo.scoring.loss import loss_of, score_of
from dmo.tinyworld.config import WorldConfig
from dmo.tinyworld.data import write_domain, write_val_split

DOMAINS = ("general", "ocr")
N_VAL = 6  # batch size 4 below: one full batch and one padded remainder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A random tiny base, two random LoRA experts, data with validation splits, and a manifest naming it all."""
    from peft import LoraConfig, get_peft_model

    from dmo.tinyworld.model import init_model
    from dmo.tinyworld.tokenizer import build_processor

    root = tmp_path_factory.mktemp("loss")
    config = WorldConfig.small()
    for d in DOMAINS:
        write_domain(root, d, config.seed, {"train": 2, "test": 2}, config.image_size)
        write_val_split(root, d, config.seed, N_VAL, config.image_size)
    processor = build_processor(config)
    model = init_model(config, processor.tokenizer).eval()
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    for i, d in enumerate(DOMAINS):
        torch.manual_seed(30 + i)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(copy.deepcopy(model), lora).save_pretrained(root / d)
    doc = {"name": "lossy", "base": "./base", "experts": {d: f"./{d}" for d in DOMAINS}, "data": "./data"}
    (root / "experts.yaml").write_text(yaml.safe_dump(doc))
    return SimpleNamespace(root=root, config=config, processor=processor, model=model)


def proxy_model(world: SimpleNamespace, weights: dict[str, float]) -> torch.nn.Module:
    """base + sum_i w_i (expert_i - base), each expert merged by PEFT (not by dmo)."""
    from peft import PeftModel

    base = {k: v.clone() for k, v in world.model.state_dict().items()}
    out = copy.deepcopy(world.model)
    state = out.state_dict()
    for d, w in weights.items():
        expert = PeftModel.from_pretrained(copy.deepcopy(world.model), world.root / d).merge_and_unload()
        for k, v in expert.state_dict().items():
            state[k] += w * (v - base[k])
    out.load_state_dict(state)
    return out.eval()


def reference_loss(world: SimpleNamespace, model: torch.nn.Module, domain: str) -> float:
    """Mean answer-token loss, one plain forward per row with transformers' own loss on masked labels."""
    processor, folder = world.processor, world.root / "data" / domain
    nll, tokens = 0.0, 0
    for line in (folder / "val.jsonl").read_text().splitlines():
        row = json.loads(line)
        with Image.open(folder / row["image"]) as im:
            image = im.convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        n_prompt = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
        enc = processor(text=[prompt + row["answer"] + "<|im_end|>"], images=[image], return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[:, :n_prompt] = -100
        with torch.no_grad():
            loss = model(**enc, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll, tokens = nll + float(loss) * n, tokens + n
    return nll / tokens


def test_a_proxys_loss_is_the_plain_forward_loss_of_the_merged_model(world: SimpleNamespace) -> None:
    manifest = load_manifest(world.root / "experts.yaml")
    scorer = make_scorer("hf", ScoringContext(manifest, device="cpu", batch_size=4))
    scorer.check(["loss:general", "loss:ocr"])
    weights = {"general": 0.3, "ocr": 0.7}
    target = Target("proxy", mixture=Mixture.from_mapping(weights, DOMAINS))
    result = scorer.evaluate(target, ["loss:ocr", "loss:general"])
    assert result.errors == {} and result.metrics == {"loss:ocr": "loss", "loss:general": "loss"}
    reference = proxy_model(world, weights)
    for d in DOMAINS:
        expected = reference_loss(world, reference, d)
        assert loss_of(result.scores[f"loss:{d}"]) == pytest.approx(expected, rel=1e-5)
        assert result.scores[f"loss:{d}"] == pytest.approx(math.exp(-expected), rel=1e-5)
    base = scorer.evaluate(Target("base"), ["loss:ocr"]).scores["loss:ocr"]
    assert loss_of(base) == pytest.approx(reference_loss(world, world.model, "ocr"), rel=1e-5)
    assert abs(loss_of(base) - loss_of(result.scores["loss:ocr"])) > 1e-3  # the proxy's weights were in place
    # the live model is the base again afterwards, and the score rule round-trips
    assert scorer.evaluate(Target("base"), ["loss:ocr"]).scores["loss:ocr"] == base
    assert loss_of(score_of(0.25)) == pytest.approx(0.25)


def test_loss_scores_are_cached_by_their_validation_data(world: SimpleNamespace, tmp_path: Path) -> None:
    manifest = load_manifest(world.root / "experts.yaml")
    scorer = make_scorer("hf", ScoringContext(manifest, device="cpu", batch_size=4, limit=2))
    table = ResultsTable(tmp_path / "scores.jsonl")
    target = Target("proxy", mixture=Mixture.from_mapping({"general": 0.5, "ocr": 0.5}, DOMAINS))
    ((scores, errors),) = score_targets(scorer, table, [target], ["loss:ocr"])
    assert errors == {} and 0 < scores["loss:ocr"] <= 1
    (row,) = table.records()
    assert row["metric"] == "loss" and row["benchmark"] == "loss:ocr" and row["kind"] == "proxy"
    score_targets(scorer, table, [target], ["loss:ocr"])
    assert len(table.records()) == 1  # known: read from the table
    assert scorer.benchmark_settings("dmo_tiny_ocr") == {}  # other benchmarks keep their cache keys
    before = scorer.benchmark_settings("loss:ocr")
    other = make_scorer("hf", ScoringContext(manifest.model_copy(update={"data": tmp_path / "data"}), device="cpu"))
    val = tmp_path / "data" / "ocr" / "val.jsonl"
    val.parent.mkdir(parents=True)
    val.write_text((world.root / "data" / "ocr" / "val.jsonl").read_text().splitlines()[0] + "\n")
    assert other.benchmark_settings("loss:ocr")["validation"] != before["validation"]


def test_a_missing_validation_split_is_one_line_before_the_study_opens(world: SimpleNamespace, tmp_path: Path) -> None:
    from dmo.session import Session

    manifest = load_manifest(world.root / "experts.yaml")
    no_data = make_scorer("hf", ScoringContext(manifest.model_copy(update={"data": None}), device="cpu"))
    with pytest.raises(DmoError, match="names no data folder: add 'data: <folder>'") as exc:
        no_data.check(["loss:ocr"])
    assert "\n" not in str(exc.value)
    # a data folder with general's split only: loss:ocr is refused, by Session.open, before anything is scored
    (tmp_path / "data" / "general").mkdir(parents=True)
    (tmp_path / "data" / "general" / "val.jsonl").write_text("")
    doc = yaml.safe_load((world.root / "experts.yaml").read_text())
    doc.update(base=str(world.root / "base"), experts={d: str(world.root / d) for d in DOMAINS}, data="./data")
    (tmp_path / "experts.yaml").write_text(yaml.safe_dump(doc))
    space = {
        "domains": list(DOMAINS),
        "experts": "./experts.yaml",
        "mixtures": [{"general": 0.5, "ocr": 0.5}],
        "benchmarks": ["loss:ocr"],
        "scoring": {"backend": "hf", "device": "cpu"},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    with pytest.raises(DmoError, match=r"needs a validation split of domain 'ocr', but .*data has none: add") as exc:
        Session.open(tmp_path / "space.yaml")
    assert "\n" not in str(exc.value) and "ocr/val.jsonl" in str(exc.value)
    assert not (tmp_path / "results").exists()


def test_a_study_on_loss_and_accuracy_of_the_small_tiny_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks: [loss:ocr, ...]`` runs a study like any other benchmark, and correlate reads its rows."""
    from dmo.analysis.correlate import correlate
    from dmo.session import Session

    monkeypatch.setenv("DMO_RESULTS", str(tmp_path / "results"))
    space = {
        "name": "loss-small",
        "domains": list(DOMAINS),
        "experts": "tinyworld-small",
        "mixtures": [{"general": 0.25, "ocr": 0.75}, {"general": 0.75, "ocr": 0.25}],
        "benchmarks": ["loss:ocr", "loss:general", "dmo_tiny_ocr"],
        "sampler": {"name": "grid"},
        "scoring": {"backend": "hf", "device": "cpu", "limit": 8},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    session = Session.open(tmp_path / "space.yaml")
    assert session.manifest.data is not None and (session.manifest.data / "ocr" / "val.jsonl").is_file()
    result = session.run_study(n_trials=2, progress=False)
    assert math.isfinite(result.best_value)
    rows = ResultsTable(tmp_path / "results" / "loss-small" / "scores.jsonl").records()
    losses = [r for r in rows if r["benchmark"].startswith("loss:")]
    assert len(losses) == 4 and all(r["metric"] == "loss" and 0 < r["score"] <= 1 for r in losses)
    # correlate puts loss rows next to the benchmark rows (here with made-up trained rows: the table's shape only)
    frame = session.table.frame()
    trained = frame[frame["kind"] == "proxy"].assign(kind="trained", seed=0, score=lambda f: f["score"] * 0.9)
    table = correlate(pd.concat([frame, trained]), n_boot=50, n_perm=50)
    assert {"loss:ocr", "loss:general", "dmo_tiny_ocr"} <= set(table["benchmark"])


@pytest.mark.vllm
def test_the_vllm_engine_gives_the_hf_loss(tmp_path: Path) -> None:
    """The same targets' losses from the real CPU engine's prompt log-probabilities and from transformers, on the
    small tiny world's trained experts (built into the cache on first use)."""
    pytest.importorskip("vllm", reason="run from .venv-vllm: .venv-vllm/bin/python -m pytest -m vllm")
    from dmo.scoring.vllm.backend import VLLMScorer
    from dmo.tinyworld.build import build_world

    manifest = load_manifest(build_world(WorldConfig.small(), ground_truth=(), progress=False).manifest_path)
    hf = make_scorer("hf", ScoringContext(manifest, device="cpu"))
    engine = VLLMScorer(manifest, adapter_dir=tmp_path / "adapters")
    benchmarks = ["loss:ocr", "loss:general"]
    try:
        engine.check(benchmarks)
        targets: list[Any] = [
            Target("proxy", mixture=Mixture.from_mapping({"general": 0.3, "ocr": 0.7}, DOMAINS)),
            Target("base"),
            Target("expert", domain="ocr"),
        ]
        for target in targets:
            got, want = engine.evaluate(target, benchmarks), hf.evaluate(target, benchmarks)
            assert got.errors == {} and got.metrics == want.metrics
            for b, score in want.scores.items():
                assert loss_of(got.scores[b]) == pytest.approx(loss_of(score), rel=1e-5), (target, b)
    finally:
        engine.close()


@pytest.mark.vllm
def test_random_lora_experts_on_part_of_a_packed_layer_written_into_the_engine_give_the_hf_loss(
    world: SimpleNamespace, tmp_path: Path
) -> None:
    """The NaN reproduction (issue 23): random LoRA experts on q_proj, v_proj and down_proj (not k_proj, which vLLM
    packs with them into qkv_proj) written into the real CPU engine. Before the fix, dmo read vLLM's packing from the
    multimodal model, which declares none, so k_proj was not fed with the write and vLLM processed qkv_proj with
    uninitialised memory there: losses off by up to 0.7 or NaN, differently from one write to the next. Every target
    is written twice, with the base in between, and must give hf's loss each time."""
    pytest.importorskip("vllm", reason="run from .venv-vllm: .venv-vllm/bin/python -m pytest -m vllm")
    manifest = load_manifest(world.root / "experts.yaml")
    from dmo.scoring.vllm.backend import VLLMScorer

    hf = make_scorer("hf", ScoringContext(manifest, device="cpu"))
    engine = VLLMScorer(manifest, adapter_dir=tmp_path / "adapters", lora=False)
    benchmarks = ["loss:ocr", "loss:general"]
    targets: list[Any] = [
        Target("expert", domain="general"),
        Target("base"),
        Target("proxy", mixture=Mixture.from_mapping({"general": 0.4, "ocr": 0.6}, DOMAINS)),
        Target("expert", domain="ocr"),
    ]
    try:
        for target in targets + targets:
            assert engine.route(target) in ("base", "write")
            got, want = engine.evaluate(target, benchmarks), hf.evaluate(target, benchmarks)
            assert got.errors == {}, (target, got.errors)
            for b, score in want.scores.items():
                assert loss_of(got.scores[b]) == pytest.approx(loss_of(score), rel=1e-5), (target, b)
    finally:
        engine.close()
