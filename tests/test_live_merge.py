"""The weight-write path (dmo.merge.live) against the streaming merge to disk and a live transformers model.

``ExpertBank`` merges on a device from experts read once; the streaming merge (``merge_checkpoints``) reads the
files per proxy. Both must give the same parameters for every method, on LoRA and full experts, and a model
whose weights were written by the bank must answer like the merged checkpoint loaded fresh.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import assert_same_model, load_model, make_set, write_model

from dmo.errors import DmoError
from dmo.merge.live import ExpertBank, ModuleWriter
from dmo.merge.stream import MergeOptions, merge_checkpoints

METHODS = [
    ("linear", {}),
    ("linear", {"scale": 0.7}),
    ("ties", {"density": 0.4}),
    ("dare", {"drop_rate": 0.5, "seed": 3}),
    ("dare_ties", {"drop_rate": 0.3}),
]


def _proxy(bank: ExpertBank, base: Path, weights: dict, method: str = "linear", params: dict | None = None) -> dict:
    out = load_model(base)
    merged = dict(bank.merged(weights, method, params))
    assert set(merged) == set(bank.names)
    return out | {k: v.cpu() for k, v in merged.items()}


@pytest.mark.parametrize(("method", "params"), METHODS)
def test_full_experts_match_the_streaming_merge(tmp_path: Path, method: str, params: dict) -> None:
    base, experts = make_set(tmp_path, torch.bfloat16, shards=2)
    bank = ExpertBank.open(base, experts)
    assert set(bank.names) == set(load_model(base))  # full experts change every tensor here
    for weights in ({"e0": 0.5, "e1": 0.3, "e2": 0.2}, {"e1": 0.9, "e2": 0.1}):
        merge_checkpoints(
            base,
            experts,
            weights,
            tmp_path / "out",
            MergeOptions(method=method, params=params, exclude=[], overwrite=True),
        )
        assert_same_model(_proxy(bank, base, weights, method, params), load_model(tmp_path / "out"))


@pytest.mark.parametrize(("method", "params"), [*METHODS, ("robustmerge", {})])
def test_lora_experts_match_the_streaming_merge(lora_world: dict, tmp_path: Path, method: str, params: dict) -> None:
    names = ("a", "b") if method == "robustmerge" else ("a", "b", "c")  # robustmerge needs equal ranks
    experts = {k: lora_world["experts"][k] for k in names}
    bank = ExpertBank.open(lora_world["base"], experts, exclude=[])
    from dmo.merge.lora import load_lora

    assert set(bank.names) == {p for e in experts.values() for p in load_lora(e).modules}
    weights = dict(zip(names, (0.5, 0.3, 0.2)))
    merge_checkpoints(
        lora_world["base"], experts, weights, tmp_path / "out", MergeOptions(method=method, params=params, exclude=[])
    )
    assert_same_model(_proxy(bank, lora_world["base"], weights, method, params), load_model(tmp_path / "out"))


def test_mixed_full_and_lora_experts(lora_world: dict, tmp_path: Path) -> None:
    b = load_model(lora_world["base"])
    g = torch.Generator().manual_seed(5)
    full = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in b.items()}
    full["model.norm.weight"] = b["model.norm.weight"].clone()  # a frozen tensor is not kept nor written
    write_model(tmp_path / "full", full)
    experts = {"a": lora_world["experts"]["a"], "f": tmp_path / "full"}
    bank = ExpertBank.open(lora_world["base"], experts, exclude=[])
    assert "model.norm.weight" not in bank.names
    weights = {"a": 0.4, "f": 0.6}
    merge_checkpoints(lora_world["base"], experts, weights, tmp_path / "out", MergeOptions(exclude=[]))
    assert_same_model(_proxy(bank, lora_world["base"], weights), load_model(tmp_path / "out"))


def test_base_restores_exactly_and_values_do_not_accumulate(lora_world: dict) -> None:
    bank = ExpertBank.open(lora_world["base"], lora_world["experts"])
    b = load_model(lora_world["base"])
    assert all(torch.equal(v, b[k]) for k, v in bank.base())
    first = dict(bank.merged({"a": 1.0}))
    for w in (0.2, 0.7, 0.1):  # absolute values: the same proxy again is bit-identical
        dict(bank.merged({"a": w, "b": 1 - w}))
    again = dict(bank.merged({"a": 1.0}))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_bad_input(lora_world: dict, tmp_path: Path) -> None:
    bank = ExpertBank.open(lora_world["base"], lora_world["experts"])
    with pytest.raises(DmoError, match="unknown"):
        next(bank.merged({"zz": 1.0}))
    with pytest.raises(DmoError, match="all mixture weights are 0"):
        next(bank.merged({"a": 0.0}))
    with pytest.raises(DmoError, match="different ranks|not adapted by expert 'c'"):
        dict(bank.merged({"a": 0.5, "c": 0.5}, "robustmerge"))
    with pytest.raises(DmoError, match="no parameter 'density'"):
        next(bank.merged({"a": 1.0}, "linear", {"density": 0.5}))
    with pytest.raises(DmoError, match="no experts"):
        ExpertBank.open(lora_world["base"], {})
    with pytest.raises(DmoError, match="does not exist"):
        ExpertBank.open(tmp_path / "nowhere", lora_world["experts"])


def test_written_model_answers_like_the_merged_checkpoint(lora_world: dict, tmp_path: Path) -> None:
    """Weights written into a live transformers model = the merged checkpoint loaded fresh: same greedy tokens."""
    transformers = lora_world["transformers"]
    experts = lora_world["experts"]
    bank = ExpertBank.open(lora_world["base"], experts, exclude=[])
    live = transformers.Qwen2ForCausalLM.from_pretrained(str(lora_world["base"])).eval()
    writer = ModuleWriter(live, bank.names)
    prompt = torch.tensor([[3, 7, 11, 5, 9]])

    def answer(model: torch.nn.Module) -> list[int]:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        return out[0, prompt.shape[1] :].tolist()

    base_answer = answer(live)
    for i, weights in enumerate(({"a": 0.5, "b": 0.3, "c": 0.2}, {"c": 1.0})):
        assert writer(bank.merged(weights)) == len(bank.names)
        merge_checkpoints(lora_world["base"], experts, weights, tmp_path / f"m{i}", MergeOptions(exclude=[]))
        fresh = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / f"m{i}")).eval()
        live_state, fresh_state = live.state_dict(), fresh.state_dict()
        assert all(torch.equal(live_state[k], fresh_state[k]) for k in fresh_state)
        assert answer(live) == answer(fresh)
    assert writer(bank.base()) == len(bank.names)
    assert answer(live) == base_answer
    with pytest.raises(DmoError, match="not a parameter"):
        writer([("model.layers.0.mlp.up_proj.weight", torch.zeros(1))])


@pytest.mark.parametrize(
    ("method", "params"),
    [("linear", {"scale": 0.5}), ("ties", {"density": 0.4}), ("dare", {"drop_rate": 0.5}), ("robustmerge", {})],
)
def test_hf_backend_proxies_equal_the_streaming_merge(lora_world: dict, tmp_path: Path, method: str, params: dict):
    """The hf backend's in-memory delta for every merge method = ``dmo merge`` of the same proxy, with the same
    (the paper's) parameter filter: the experts' LoRA on lm_head stays out of both."""
    pytest.importorskip("lmms_eval")
    from dmo.manifest import ExpertManifest
    from dmo.mixture import Mixture
    from dmo.scoring.base import Target
    from dmo.scoring.hf_backend import HFScorer

    experts = {k: lora_world["experts"][k] for k in ("a", "b")}
    manifest = ExpertManifest.model_validate(
        {"name": "m", "base": {"path": lora_world["base"]}, "experts": {k: {"path": p} for k, p in experts.items()}}
    )
    weights = {"a": 0.3, "b": 0.7}
    target = Target("proxy", Mixture.from_mapping(weights, ("a", "b")), method=method, params=tuple(params.items()))
    scorer = HFScorer(manifest, device="cpu")
    delta = scorer._delta(target)
    base = load_model(lora_world["base"])
    mine = base | {k: (base[k].float() + v).to(base[k].dtype) for k, v in delta.items()}
    merge_checkpoints(
        lora_world["base"], experts, weights, tmp_path / "out", MergeOptions(method=method, params=params)
    )
    assert_same_model(mine, load_model(tmp_path / "out"))
    other = Target("proxy", target.mixture, method=method, params=(("density", 0.9),) if method == "ties" else ())
    assert (scorer.fingerprint(other) != scorer.fingerprint(target)) is (other.params != target.params)


def test_merged_targets_are_fingerprinted_with_their_parameter_filter(lora_world: dict) -> None:
    """A score cached under another filter (an older dmo's, which wrote everything a full expert changed) must not be
    read back for a proxy merged through this one: the filter is part of an expert's and a proxy's fingerprint."""
    pytest.importorskip("lmms_eval")
    from dmo.manifest import ExpertManifest
    from dmo.merge.experts import ParamFilter
    from dmo.mixture import Mixture
    from dmo.scoring.base import Target
    from dmo.scoring.hf_backend import HFScorer

    paper, everything = ParamFilter("lora"), ParamFilter("lora", exclude=[])
    assert paper.id() == ParamFilter("lora").id() and paper.id() != everything.id() != ParamFilter("full").id()
    experts = {k: lora_world["experts"][k] for k in ("a", "b")}
    manifest = ExpertManifest.model_validate(
        {"name": "m", "base": {"path": lora_world["base"]}, "experts": {k: {"path": p} for k, p in experts.items()}}
    )
    scorer = HFScorer(manifest, device="cpu")
    proxy = Target("proxy", Mixture.from_mapping({"a": 0.3, "b": 0.7}, ("a", "b")))
    for target in (proxy, Target("expert", domain="a")):
        assert scorer.fingerprint(target).endswith(f":f{paper.id()}")
    assert "f" + paper.id() not in scorer.fingerprint(Target("base"))
