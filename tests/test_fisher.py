"""``dmo fisher`` (diagonal Fisher weights of each expert on its domain's data) and ``dmo merge --method fisher``.

A tiny real Qwen2-VL base (``dmo.tinyworld``) with two PEFT LoRA experts that adapt different modules: the Fisher
files must hold every parameter either expert changes, and equal a naive per-sample autograd loop on the
PEFT-merged dense expert, fed by the tiny world's own training encoder (not dmo.groundtruth.fisher_weights's). The
merge of those files must equal the pure ``fisher`` function on the PEFT-merged deltas; the hf backend must merge the
same proxy.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dmo.cli import app
from dmo.groundtruth.data_mix import domain_order
from dmo.manifest import load_manifest
from dmo.merge.fisher_merge import fisher, fisher_norms
from dmo.merge.registry import method_names
from dmo.tinyworld.config import WorldConfig
from dmo.tinyworld.data import read_split, write_domain
from dmo.tinyworld.model import init_model
from dmo.tinyworld.tokenizer import build_processor, image_tokens
from dmo.tinyworld.train import collate, gather

DOMAINS = ("general", "ocr")
SAMPLES = 3
#: expert folder, the domain it stands for, its LoRA target modules
EXPERTS = {"general": ("a", ["q_proj", "v_proj"]), "ocr": ("b", ["q_proj", "down_proj"])}
MANIFEST = "# two tiny experts\nname: tiny\nbase: ./base\nexperts:\n  general: ./a   # expert a\n  ocr: ./b\n"


def live(name: str) -> str:
    """Checkpoint name -> transformers 5's module name for Qwen2-VL's text tower (written out, not dmo's KeyMap)."""
    return name.replace("model.layers.", "model.language_model.layers.", 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("fisher")
    config = WorldConfig.small()
    for d in DOMAINS:
        write_domain(root, d, config.seed, {"train": 8, "test": 2}, config.image_size)
    processor = build_processor(config)
    model = init_model(config, processor.tokenizer).eval()
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    for i, (folder, targets) in enumerate(EXPERTS.values()):
        torch.manual_seed(i + 1)
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        get_peft_model(copy.deepcopy(model), lora).save_pretrained(root / folder)
    (root / "experts.yaml").write_text(MANIFEST)
    base = load_file(root / "base" / "model.safetensors")
    adapted = sorted(k for k in base if "visual" not in k and k.endswith(("q_proj.weight", "v_proj.weight",
                                                                           "down_proj.weight")))  # fmt: skip
    result = CliRunner().invoke(app, ["fisher", "--experts", str(root / "experts.yaml"), "--data", str(root / "data"),
                                      "--samples", str(SAMPLES), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return SimpleNamespace(root=root, config=config, processor=processor, model=model, base=base, adapted=adapted,
                           output=result.output)  # fmt: skip


def dense_expert(world: SimpleNamespace, domain: str) -> torch.nn.Module:
    """The expert merged into a copy of the base by PEFT."""
    from peft import PeftModel

    folder = world.root / EXPERTS[domain][0]
    return PeftModel.from_pretrained(copy.deepcopy(world.model), folder).merge_and_unload().eval()


def naive_fisher(world: SimpleNamespace, domain: str) -> dict[str, torch.Tensor]:
    """sum_n (grad of sample n's summed answer log-likelihood)^2 / answer tokens, one sample at a time."""
    model = dense_expert(world, domain)
    params = dict(model.named_parameters())
    wanted = {name: params[live(name)] for name in world.adapted}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in wanted.values():
        p.requires_grad_(True)
    pool = read_split(world.root, domain, "train")
    picks = domain_order(0, domain, len(pool))[:SAMPLES]
    examples = gather(world.root, world.processor, image_tokens(world.config), {domain: picks})
    acc = {name: torch.zeros_like(p) for name, p in wanted.items()}
    tokens = 0
    for i in range(len(examples)):
        batch = collate(world.processor, examples, np.array([i]))
        n = int((batch["labels"][0, 1:] != -100).sum())
        model.zero_grad(set_to_none=True)
        (model(**batch).loss * n).backward()  # transformers' mean token NLL, times the tokens: -sum log p
        for name, p in wanted.items():
            acc[name] += p.grad**2
        tokens += n
    return {name: a / tokens for name, a in acc.items()}


def fisher_file(world: SimpleNamespace, domain: str) -> Path:
    return world.root / EXPERTS[domain][0] / "fisher.safetensors"


def run_main(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``dmo ARGS`` in this process, as the console script runs it: (exit code, stderr)."""
    from dmo import cli

    monkeypatch.setattr(sys, "argv", ["dmo", *args])
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ dmo fisher


def test_fisher_files_hold_the_adapted_parameters_and_equal_a_naive_loop(world: SimpleNamespace) -> None:
    for domain in DOMAINS:
        path = fisher_file(world, domain)
        assert path.is_file(), world.output
        with safe_open(path, "pt") as f:
            names = sorted(f.keys())
            record = json.loads(f.metadata()["dmo_fisher"])
            got = {k: f.get_tensor(k) for k in names}
        # both experts' files hold the union of what either adapts (so any mixture finds every merged parameter)
        assert names == world.adapted
        assert record["samples"] == SAMPLES and record["target"] == "labels"
        for name, t in got.items():
            assert t.dtype == torch.float32 and t.shape == world.base[name].shape
            assert bool(torch.isfinite(t).all()) and bool((t >= 0).all())
        assert all(float(t.abs().max()) > 0 for t in got.values())
        want = naive_fisher(world, domain)
        for name in names:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6 * float(want[name].max()))


def test_fisher_records_itself_in_the_manifest_and_keeps_existing_files(world: SimpleNamespace) -> None:
    text = (world.root / "experts.yaml").read_text()
    assert text.startswith("# two tiny experts\n") and "# expert a" in text  # comments and layout kept
    manifest = load_manifest(world.root / "experts.yaml")
    assert {d: manifest.experts[d].fisher for d in DOMAINS} == {d: fisher_file(world, d) for d in DOMAINS}
    assert "recorded the 'fisher:' path of general, ocr" in world.output
    before = {d: fisher_file(world, d).stat().st_mtime_ns for d in DOMAINS}
    again = CliRunner().invoke(app, ["fisher", "--experts", str(world.root / "experts.yaml"), "--data",
                                     str(world.root / "data"), "--no-update-manifest"])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "kept the existing" in again.output and "--overwrite" in again.output
    assert {d: fisher_file(world, d).stat().st_mtime_ns for d in DOMAINS} == before
    assert (
        "add to the experts of" in again.output and "general: {path: ./a, fisher: a/fisher.safetensors}" in again.output
    )


# ------------------------------------------------------------------------------------------- dmo merge --method


def reference_fisher_merge(world: SimpleNamespace, weights: dict[str, float], method: str) -> dict[str, torch.Tensor]:
    """base + the pure fisher function on the PEFT-merged deltas, with the experts' Fisher files."""
    dense = {d: dense_expert(world, d).state_dict() for d in weights}
    fishers = [load_file(fisher_file(world, d)) for d in weights]
    norms = fisher_norms([{p: f[p] for p in world.adapted} for f in fishers])
    w = torch.tensor(list(weights.values()))
    out = dict(world.base)
    for p in world.adapted:
        deltas = torch.stack([dense[d][live(p)].float() - world.base[p].float() for d in weights])
        f = torch.stack([fi[p] for fi in fishers])
        merged = fisher(deltas, w, f, norms) if method == "fisher" else fisher(deltas, w, f, None, minimal=1e-6)
        out[p] = world.base[p] + merged
    return out


def test_dmo_merge_fisher_is_the_pure_function_on_the_deltas(world: SimpleNamespace, tmp_path: Path) -> None:
    weights = {"general": 0.3, "ocr": 0.7}
    runner = CliRunner()
    for method in ("fisher", "linear"):
        args = ["merge", "--experts", str(world.root / "experts.yaml"), "--weights", "general=0.3,ocr=0.7",
                "--out", str(tmp_path / method), "--method", method, "--device", "cpu"]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    got = load_file(tmp_path / "fisher" / "model.safetensors")
    want = reference_fisher_merge(world, weights, "fisher")
    assert set(got) == set(want)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    record = json.loads((tmp_path / "fisher" / "dmo_merge.json").read_text())
    assert record["inputs"]["fisher"] == {d: str(fisher_file(world, d)) for d in DOMAINS}
    linear = load_file(tmp_path / "linear" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"  # both experts adapt it: the Fisher weighting matters
    assert not torch.allclose(got[q], linear[q], atol=1e-6)


def test_hf_backend_scores_a_fisher_proxy(world: SimpleNamespace, tmp_path: Path) -> None:
    pytest.importorskip("lmms_eval")
    from dmo.mixture import Mixture
    from dmo.scoring.base import Target
    from dmo.scoring.hf_backend import HFScorer
    from dmo.scoring.tasks import write_tiny_tasks

    tasks = write_tiny_tasks(world.root / "data", tmp_path / "tasks", list(DOMAINS), world.config.max_new_tokens)
    scorer = HFScorer(load_manifest(world.root / "experts.yaml"), include_path=tasks, limit=2, device="cpu")
    weights = {"general": 0.3, "ocr": 0.7}
    target = Target("proxy", Mixture.from_mapping(weights, DOMAINS), method="fisher")
    delta = scorer._delta(target)
    want = reference_fisher_merge(world, weights, "fisher")
    assert set(delta) == {live(p) for p in world.adapted}
    for p in world.adapted:
        torch.testing.assert_close(delta[live(p)], want[p] - world.base[p], rtol=1e-5, atol=1e-6)
    linear = scorer._delta(Target("proxy", target.mixture, method="linear"))
    assert any(not torch.allclose(delta[k], linear[k], atol=1e-6) for k in delta)
    assert scorer.fingerprint(target) != scorer.fingerprint(Target("proxy", target.mixture, method="linear"))
    evaluation = scorer.evaluate(target, ["dmo_tiny_ocr"])
    assert set(evaluation.scores) == {"dmo_tiny_ocr"} and not evaluation.errors


class _Worker:
    """Stands in for a vLLM worker (``get_model``, ``reload_weights``) under dmo's worker extension."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.initial = {k: v.clone() for k, v in model.state_dict().items()}

    def get_model(self) -> torch.nn.Module:
        return self.model

    def reload_weights(self, weights_iterator=None) -> None:  # type: ignore[no-untyped-def]
        from dmo.merge.live import ModuleWriter

        if weights_iterator is None:  # the engine's own checkpoint
            self.model.load_state_dict(self.initial)
            return
        items = list(weights_iterator)
        ModuleWriter(self.model, [n for n, _ in items])(items)


class _Engine:
    """Stands in for ``vllm.LLM``: ``collective_rpc`` runs the extension's method on the one worker."""

    def __init__(self, worker: object) -> None:
        self.worker, self.calls = worker, []
        self.llm_engine = SimpleNamespace(reset_encoder_cache=lambda: None)

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.calls.append((method, args))
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self) -> None:
        pass

    def reset_mm_cache(self) -> None:
        pass


def test_vllm_backend_passes_the_fisher_files_to_the_worker_bank(world: SimpleNamespace, tmp_path: Path) -> None:
    """The vllm backend's weight-write route for a fisher proxy, through dmo's worker extension (no vLLM needed)."""
    pytest.importorskip("lmms_eval")
    from dmo.mixture import Mixture
    from dmo.scoring.base import Target
    from dmo.scoring.vllm.backend import VLLMScorer
    from dmo.scoring.vllm.worker import DmoWorkerExtension

    worker = type("Worker", (_Worker, DmoWorkerExtension), {})(copy.deepcopy(world.model))
    engine = _Engine(worker)
    manifest = load_manifest(world.root / "experts.yaml")
    scorer = VLLMScorer(manifest, adapter_dir=tmp_path, llm_factory=lambda **kwargs: engine)
    weights = {"general": 0.3, "ocr": 0.7}
    target = Target("proxy", Mixture.from_mapping(weights, DOMAINS), method="fisher")
    assert scorer.route(target) == "write"
    scorer._switch(target)
    (opened,) = [args for method, args in engine.calls if method == "dmo_open_bank"]
    assert opened[5] == {"fisher": {d: str(fisher_file(world, d)) for d in DOMAINS}}
    assert opened[6] is None  # the paper's parameter filter, as dmo merge's
    state = worker.model.state_dict()
    want = reference_fisher_merge(world, weights, "fisher")
    for p in world.adapted:
        torch.testing.assert_close(state[live(p)], want[p], rtol=1e-5, atol=1e-6)
    scorer._restore_base()
    assert all(torch.equal(worker.model.state_dict()[live(p)], world.base[p]) for p in world.adapted)


# ------------------------------------------------------------------------------------------------------ bad input


def _manifest(world: SimpleNamespace, tmp_path: Path, general: str, ocr: str = "") -> Path:
    path = tmp_path / "m.yaml"
    ocr = ocr or f"{{path: {world.root / 'b'}}}"
    path.write_text(f"name: m\nbase: {world.root / 'base'}\nexperts:\n  general: {general}\n  ocr: {ocr}\n")
    return path


def test_bad_fisher_input_is_one_line(
    world: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(world.root / "a", bare, ignore=shutil.ignore_patterns("fisher.safetensors"))
    merge = ["merge", "--weights", "general=0.5,ocr=0.5", "--method", "fisher", "--device", "cpu", "--out"]

    manifest = _manifest(world, tmp_path, f"{{path: {bare}}}")
    code, err = run_main([*merge, str(tmp_path / "o1"), "--experts", str(manifest)], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "expert 'general' has no Fisher weights" in lines[0] and f"run 'dmo fisher --experts {manifest}" in lines[0]
    assert not (tmp_path / "o1").exists()

    wrong = {k: v.t().contiguous() for k, v in load_file(fisher_file(world, "general")).items()}
    save_file(wrong, tmp_path / "wrong.safetensors")  # another model: its tensors transposed
    manifest = _manifest(world, tmp_path, f"{{path: {bare}, fisher: {tmp_path / 'wrong.safetensors'}}}")
    code, err = run_main([*merge, str(tmp_path / "o2"), "--experts", str(manifest)], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "the fisher weights of expert 'general'" in lines[0] and "computed for another model" in lines[0]

    code, err = run_main([*merge, str(tmp_path / "o3"), "--experts", str(world.root / "experts.yaml"), "--param",
                          "density=0.5"], capsys, monkeypatch)  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "merge method 'fisher' has no parameter 'density'; its parameters: weighted=True, minimal=1e-06" in lines[0]

    code, err = run_main(["fisher", "--experts", str(world.root / "experts.yaml"), "--data", str(tmp_path),
                          "--overwrite"], capsys, monkeypatch)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no data for domain 'general'" in err


def test_adapter_proxies_take_weight_average_and_refuse_fisher(
    world: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dmo.merge.lora import expert_delta, load_lora
    from dmo.merge.proxy import write_lora_proxy

    args = ["merge", "--experts", str(world.root / "experts.yaml"), "--weights", "general=0.25,ocr=0.75", "--as",
            "adapter", "--method"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "weight_average", "--param", "weighted=false", "--out",
                                      str(tmp_path / "mean")])  # fmt: skip
    assert result.exit_code == 0, result.output
    experts = {d: world.root / EXPERTS[d][0] for d in DOMAINS}
    write_lora_proxy(experts, {"general": 0.2, "ocr": 0.6}, tmp_path / "avg", method="weight_average",
                     base=world.root / "base")  # fmt: skip
    dense = {d: dense_expert(world, d).state_dict() for d in DOMAINS}
    for folder, coefs in (("mean", (0.5, 0.5)), ("avg", (0.25, 0.75))):  # the weights renormalised to sum 1
        got = expert_delta(load_lora(tmp_path / folder))
        assert set(got) == {live(p) for p in world.adapted}  # PEFT under transformers 5 saves the live names
        for p in world.adapted:
            want = sum(c * (dense[d][live(p)] - world.base[p]) for d, c in zip(DOMAINS, coefs))
            torch.testing.assert_close(got[live(p)], want, rtol=1e-5, atol=1e-6)

    code, err = run_main([*args, "fisher", "--out", str(tmp_path / "f")], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "method 'fisher' is not linear" in lines[0] and "weight_average" in lines[0] and "--as dense" in lines[0]


def test_merge_help_lists_the_registered_methods() -> None:
    result = CliRunner().invoke(app, ["merge", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    listed = text.split("Merge method:", 1)[1]
    for name in method_names():
        assert f" {name}," in listed or f" {name}." in listed, name


LAYOUTS = [
    "name: m\nbase: ./base\nexperts: {general: ./a, ocr: ./b}\n",
    '# my experts\nname: m\nbase: Org/Base\nexperts:\n  general: ./a   # the first\n  ocr: "./b"\n',
    "name: m\nbase: ./base\nexperts:\n  general:\n    path: ./a\n    revision: main\n  ocr: {path: ./b, fisher: old}\n",
    "name: m\nbase: ./base\nexperts:\n  general:\n    path: ./a\n    fisher: old.safetensors  # stale\n"
    "  ocr:\n    path: ./b",
]


@pytest.mark.parametrize("text", LAYOUTS)
def test_fisher_paths_go_into_any_manifest_layout(tmp_path: Path, text: str) -> None:
    from dmo.groundtruth.fisher_weights import record_in_manifest

    path = tmp_path / "m.yaml"
    path.write_text(text)
    before = load_manifest(path, check_paths=False)
    files = {"general": tmp_path / "a" / "fisher.safetensors", "ocr": tmp_path / "with space" / "b.safetensors"}
    written, lines = record_in_manifest(path, files)
    assert written and len(lines) == 2
    after = load_manifest(path, check_paths=False)
    assert {d: after.experts[d].fisher for d in DOMAINS} == files
    assert after.model_copy(update={"experts": before.experts}) == before
    assert {d: after.experts[d].path for d in DOMAINS} == {d: before.experts[d].path for d in DOMAINS}
    comments = [line[line.index("#") :] for line in text.splitlines() if "#" in line]
    assert [line[line.index("#") :] for line in path.read_text().splitlines() if "#" in line] == comments


def test_a_manifest_layout_that_cannot_be_edited_safely_is_left_alone(tmp_path: Path) -> None:
    from dmo.groundtruth.fisher_weights import record_in_manifest

    path = tmp_path / "m.yaml"
    text = "name: m\nbase: ./base\nexperts:\n  general: &shared {path: ./a}\n  ocr: *shared\n"
    path.write_text(text)
    written, lines = record_in_manifest(path, {"general": tmp_path / "g.safetensors"})
    assert not written and path.read_text() == text
    assert lines == ["  general: {path: ./a, fisher: g.safetensors}"]


def test_fisher_files_are_found_beside_the_experts_without_manifest_entries(world: SimpleNamespace) -> None:
    from dmo.merge.inputs import fisher_paths, method_inputs

    manifest = load_manifest(world.root / "experts.yaml").model_copy()
    bare = {d: r.model_copy(update={"fisher": None}) for d, r in manifest.experts.items()}
    manifest = manifest.model_copy(update={"experts": bare})
    assert fisher_paths(manifest, DOMAINS) == {d: fisher_file(world, d) for d in DOMAINS}
    assert method_inputs(manifest, DOMAINS, "fisher_nn") == {"fisher": {d: str(fisher_file(world, d)) for d in DOMAINS}}
    assert method_inputs(manifest, DOMAINS, "ties") == {}
