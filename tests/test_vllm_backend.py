"""The vllm scoring backend's orchestration, on a stand-in engine that answers with a real transformers model.

No GPU and no vLLM engine here: :class:`FakeLLM` offers the public ``vllm.LLM`` surface dmo uses (``generate``
with per-prompt LoRA requests, ``collective_rpc`` into a worker that has dmo's real worker extension mixed in,
``reset_prefix_cache``, ``reset_mm_cache``) over a tiny Qwen2-VL. It also keeps a prefix cache the way vLLM does:
an answer computed under earlier weights is served again until the cache is reset, so a backend that forgets to
reset after a weight write gives wrong answers here. Every target's answers are compared with the same target
merged to disk by ``dmo merge`` and loaded fresh. The real vLLM classes are checked in test_vllm_real_api.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")
if importlib.util.find_spec("vllm") is None:
    # dmo builds vLLM's own LoRARequest and SamplingParams; CI installs vLLM (scripts/test.sh), so it fails there
    assert not os.environ.get("CI"), "CI is set but vllm is not importable: bash scripts/install_vllm.sh"
    pytest.skip("vllm missing: bash scripts/install_vllm.sh; .venv-vllm/bin/python -m pytest", allow_module_level=True)

from dmo.config import ExpertManifest, parse_space
from dmo.errors import DmoError
from dmo.merge.dense import applied_delta
from dmo.merge.live import ModuleWriter
from dmo.merge.lora import concat_adapter, load_lora, lora_delta
from dmo.merge.names import KeyMap
from dmo.merge.stream import merge_checkpoints
from dmo.mixture import Mixture
from dmo.results import ResultsTable
from dmo.scorer import Target, score_targets
from dmo.scoring.lmms_model import load_pretrained
from dmo.scoring.tasks import write_tiny_tasks
from dmo.scoring.vllm_backend import VLLMScorer, engine_kwargs
from dmo.scoring.vllm_lmms import answers
from dmo.scoring.vllm_worker import DmoWorkerExtension
from dmo.tinyworld.config import WorldConfig
from dmo.tinyworld.data import write_domain
from dmo.tinyworld.generate import _as_chw_uint8, generate_encoded
from dmo.tinyworld.model import init_model
from dmo.tinyworld.tokenizer import build_processor

DOMAINS = ("general", "ocr")
BENCHMARKS = ["dmo_tiny_general", "dmo_tiny_ocr"]
N_TEST = 6
ROOT: list[Path] = []  # the world's folder, for reference_answers


class EngineDeadError(RuntimeError):
    """Named like vLLM's ``vllm.v1.engine.exceptions.EngineDeadError``, which dmo matches by name."""


class FakeModel(torch.nn.Module):
    """What ``Worker.get_model()`` returns in vLLM: the model, with ``load_weights`` over checkpoint names."""

    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def load_weights(self, weights: Any) -> set[str]:
        items = list(weights)
        ModuleWriter(self.hf, [n for n, _ in items])(items)
        return {n for n, _ in items}


class FakeWorker(DmoWorkerExtension):
    def __init__(self, model: FakeModel) -> None:
        self.model = model

    def get_model(self) -> torch.nn.Module:
        return self.model


class FakeLLM:
    """The ``vllm.LLM`` methods dmo calls, answered by the transformers model of ``kwargs["model"]``."""

    instances: ClassVar[list[FakeLLM]] = []
    die = 0  # engine deaths left to simulate (class-wide, so that a restarted engine can die again)

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.hf, self.processor = load_pretrained(kwargs["model"])
        self.worker = FakeWorker(FakeModel(self.hf))
        self.log: list[tuple[str, Any]] = []
        self._cache: dict[tuple, tuple[str, list[int]]] = {}
        FakeLLM.instances.append(self)

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        self.log.append((method, args[0] if args else None))
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.log.append(("reset_prefix_cache", None))
        self._cache.clear()
        return True

    def reset_mm_cache(self) -> None:
        self.log.append(("reset_mm_cache", None))

    def generate(self, prompts: list, sampling_params: list, *, lora_request: list, use_tqdm: bool = True) -> list:
        assert len(prompts) == len(sampling_params) == len(lora_request)
        self.log.append(("generate", sorted({lr.lora_int_id if lr else 0 for lr in lora_request})))
        if FakeLLM.die:
            FakeLLM.die -= 1
            raise EngineDeadError("EngineCore encountered an issue")
        out = []
        for prompt, sp, lora in zip(prompts, sampling_params, lora_request):
            key = (prompt["prompt"], prompt["multi_modal_data"]["image"].tobytes(), lora.lora_int_id if lora else 0)
            if key not in self._cache:  # like vLLM's prefix cache: stale until reset
                self._cache[key] = self._answer(prompt, sp.max_tokens, lora)
            text, ids = self._cache[key]
            out.append(SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=ids)]))
        return out

    def _answer(self, prompt: dict, max_tokens: int, lora: Any) -> tuple[str, list[int]]:
        image = _as_chw_uint8(prompt["multi_modal_data"]["image"])
        batch = dict(self.processor(text=[prompt["prompt"]], images=[image], return_tensors="pt"))
        if lora is None:
            text = generate_encoded(self.hf, self.processor, [batch], max_new_tokens=max_tokens)[0]
        else:
            adapter = load_lora(lora.lora_path, names=KeyMap.for_model(self.hf))
            with applied_delta(self.hf, lora_delta({"x": adapter}, {"x": 1.0})):
                text = generate_encoded(self.hf, self.processor, [batch], max_new_tokens=max_tokens)[0]
        return text, self.processor.tokenizer(text)["input_ids"]


def lmm_root(lmm: Any) -> Path:
    return ROOT[0]


def reference_answers(model: torch.nn.Module, processor: Any, lmm: Any) -> dict:
    """Per request key, the answer of ``model`` to the same prompt, generated one prompt at a time."""
    out = {}
    for key in answers(lmm):
        task, split, doc_id, context, max_new, _ = key
        doc = lmm.task_dict[task][split][doc_id]
        domain = task.removeprefix("dmo_tiny_")
        with Image.open(lmm_root(lmm) / "data" / domain / doc["image"]) as im:
            image = _as_chw_uint8(im.convert("RGB"))
        text = lmm._chat(context, 1)
        batch = dict(processor(text=[text], images=[image], return_tensors="pt"))
        out[key] = generate_encoded(model, processor, [batch], max_new_tokens=max_new)[0]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("vllm")
    ROOT[:] = [root]
    config = WorldConfig.small()
    for domain in DOMAINS:
        write_domain(root, domain, config.seed, {"train": 1, "test": N_TEST}, config.image_size)
    write_tiny_tasks(root / "data", root / "tasks", DOMAINS, max_new_tokens=config.max_new_tokens)
    processor = build_processor(config)
    model = init_model(config, processor.tokenizer).eval()
    base = root / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    experts = {}
    for i, domain in enumerate(DOMAINS):
        torch.manual_seed(10 + i)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(model), lora)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.mul_(50.0)  # large enough that every proxy answers differently from the base
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(root / domain)
        experts[domain] = root / domain
    manifest = ExpertManifest.model_validate(
        {"name": "fake", "base": {"path": base}, "experts": {d: {"path": p} for d, p in experts.items()}}
    )
    return SimpleNamespace(root=root, base=base, experts=experts, manifest=manifest, tasks=root / "tasks")


def scorer(world: SimpleNamespace, tmp_path: Path, **kwargs: Any) -> VLLMScorer:
    kwargs.setdefault("llm_factory", FakeLLM)
    return VLLMScorer(world.manifest, include_path=world.tasks, adapter_dir=tmp_path / "adapters", **kwargs)


def proxy(weights: dict[str, float], method: str = "linear", **params: Any) -> Target:
    m = Mixture.from_mapping(weights, DOMAINS)
    return Target("proxy", mixture=m, method=method, params=tuple(sorted(params.items())))


def merged_model(world: SimpleNamespace, folder: Path, weights: dict, method: str = "linear", **params: Any) -> Any:
    merge_checkpoints(world.base, world.experts, weights, folder, method=method, params=params, exclude=[])
    return load_pretrained(folder)[0]


@pytest.fixture(autouse=True)
def _fresh_engines() -> None:
    FakeLLM.instances.clear()
    FakeLLM.die = 0


def test_engine_arguments_and_routes(world: SimpleNamespace, tmp_path: Path) -> None:
    s = scorer(world, tmp_path)
    kwargs = s._engine_kwargs()
    assert kwargs["enable_lora"] and kwargs["max_lora_rank"] == 8  # two rank-4 experts: the proxy has rank 8
    assert kwargs["worker_extension_cls"] == "dmo.scoring.vllm_worker.DmoWorkerExtension"
    assert kwargs["model"] == str(world.base) and kwargs["limit_mm_per_prompt"]["image"] == 1
    assert "enable_tower_connector_lora" not in kwargs  # the experts leave the vision tower alone
    assert s.route(Target("base")) == "base"
    assert s.route(Target("expert", domain="ocr")) == "adapter"
    assert s.route(proxy({"general": 0.5, "ocr": 0.5})) == "adapter"
    assert s.route(proxy({"general": 0.5, "ocr": 0.5}, "robustmerge")) == "adapter"
    assert s.route(proxy({"general": 0.5, "ocr": 0.5}, "ties", density=0.5)) == "write"
    assert scorer(world, tmp_path, lora=False).route(proxy({"general": 0.5, "ocr": 0.5})) == "write"
    assert "enable_lora" not in scorer(world, tmp_path, lora=False)._engine_kwargs()


def test_every_route_answers_like_the_merged_checkpoint(world: SimpleNamespace, tmp_path: Path) -> None:
    """Adapter proxies, written proxies (TIES, DARE) and the base, in an order that switches routes both ways."""
    s = scorer(world, tmp_path)
    cases = [
        (proxy({"general": 0.3, "ocr": 0.7}), "linear", {}),
        (proxy({"general": 0.5, "ocr": 0.5}, "ties", density=0.5), "ties", {"density": 0.5}),
        (proxy({"general": 0.6, "ocr": 0.4}, "dare", drop_rate=0.3, seed=1), "dare", {"drop_rate": 0.3, "seed": 1}),
        (proxy({"general": 0.3, "ocr": 0.7}), "linear", {}),  # adapter again: the base must be back underneath
        (Target("base"), None, {}),
    ]
    base_model = load_pretrained(world.base)[0]
    seen = []
    for i, (target, method, params) in enumerate(cases):
        evaluation = s.evaluate(target, BENCHMARKS)
        assert set(evaluation.scores) == set(BENCHMARKS) and not evaluation.errors
        got = answers(s.lmm)
        if method is None:
            want_model = base_model
        else:
            assert target.mixture is not None
            weights = {d: w for d, w in target.mixture.as_dict().items() if w}
            want_model = merged_model(world, tmp_path / f"m{i}", weights, method, **params)
        want = reference_answers(want_model, s.lmm._processor, s.lmm)
        assert got == {k: v.strip() for k, v in want.items()}, f"case {i} ({target.label} {method})"
        seen.append(json.dumps(sorted(got.items())))
    # the proxies answer differently from each other and from the base, or the comparison above proves little
    assert len({seen[0], seen[1], seen[2], seen[4]}) == 4 and seen[3] == seen[0]
    engine = FakeLLM.instances[-1]
    live = engine.hf.state_dict()
    assert all(torch.equal(live[k], v) for k, v in base_model.state_dict().items())  # back to the base exactly


def test_every_weight_write_resets_the_caches_before_generating(world: SimpleNamespace, tmp_path: Path) -> None:
    s = scorer(world, tmp_path)
    s.evaluate(proxy({"general": 0.5, "ocr": 0.5}, "ties", density=0.4), BENCHMARKS[:1])
    s.evaluate(proxy({"general": 0.2, "ocr": 0.8}, "ties", density=0.4), BENCHMARKS[:1])
    s.evaluate(proxy({"general": 0.2, "ocr": 0.8}), BENCHMARKS[:1])
    log = [name for name, _ in FakeLLM.instances[-1].log]
    assert log.count("dmo_open_bank") == 1  # the experts are read once per engine
    writes = [i for i, name in enumerate(log) if name in ("dmo_write", "dmo_write_base")]
    assert [log[i] for i in writes] == ["dmo_write", "dmo_write", "dmo_write_base"]  # adapter last: base restored
    for i in writes:
        following = log[i + 1 : log.index("generate", i)]
        assert "reset_prefix_cache" in following and "reset_mm_cache" in following, log


def test_adapter_proxies_are_generated_together(world: SimpleNamespace, tmp_path: Path) -> None:
    targets = [proxy({"general": w, "ocr": 1 - w}) for w in (0.2, 0.5, 0.8)]
    together = scorer(world, tmp_path).evaluate_many(targets, BENCHMARKS)
    engine = FakeLLM.instances[-1]
    generates = [ids for name, ids in engine.log if name == "generate"]
    assert len(generates) == 1 and len(generates[0]) == 3  # one engine call, three adapters in it
    alone = [scorer(world, tmp_path).evaluate(t, BENCHMARKS) for t in targets]
    assert [e.scores for e in together] == [e.scores for e in alone]


def test_the_served_adapter_is_the_exact_concatenated_proxy(world: SimpleNamespace, tmp_path: Path) -> None:
    s = scorer(world, tmp_path)
    target = proxy({"general": 0.25, "ocr": 0.75})
    _, request = s._switch(target)
    _, again = scorer(world, tmp_path)._switch(target)
    assert (request.lora_int_id, request.lora_path) == (again.lora_int_id, again.lora_path)  # stable across workers
    _, other = s._switch(proxy({"general": 0.5, "ocr": 0.5}))
    assert other.lora_int_id != request.lora_int_id
    served = load_lora(request.lora_path)
    adapters = {d: load_lora(p) for d, p in world.experts.items()}
    _, tensors = concat_adapter(adapters, {"general": 0.25, "ocr": 0.75})
    want = lora_delta(adapters, {"general": 0.25, "ocr": 0.75})
    got = lora_delta({"p": served}, {"p": 1.0})
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    assert max(m.rank for m in served.modules.values()) == 8 and len(tensors) == 2 * len(served.modules)


def test_an_adapter_rank_over_max_lora_rank_is_refused(world: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(DmoError, match=r"reach rank 8 .* max_lora_rank=1: raise max_lora_rank to >= 8"):
        scorer(world, tmp_path, max_lora_rank=1).check(BENCHMARKS)
    with pytest.raises(DmoError, match="not one vLLM accepts"):
        engine_kwargs(world.base, lora_rank=8, max_lora_rank=24)
    with pytest.raises(DmoError, match="exceed vLLM's largest"):
        engine_kwargs(world.base, lora_rank=600)


def test_a_dead_engine_is_restarted_once(world: SimpleNamespace, tmp_path: Path) -> None:
    s = scorer(world, tmp_path)
    target = proxy({"general": 0.5, "ocr": 0.5}, "ties", density=0.5)
    FakeLLM.die = 1
    evaluation = s.evaluate(target, BENCHMARKS)
    assert s.restarts == 1 and len(FakeLLM.instances) == 2 and set(evaluation.scores) == set(BENCHMARKS)
    # the new engine got the experts and the proxy's weights again
    assert [n for n, _ in FakeLLM.instances[-1].log].count("dmo_write") == 1
    FakeLLM.die = 2
    with pytest.raises(DmoError, match="died twice"):
        scorer(world, tmp_path).evaluate(proxy({"general": 0.1, "ocr": 0.9}), BENCHMARKS)


def test_a_failing_benchmark_is_recorded_and_the_others_count(
    world: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = scorer(world, tmp_path)
    from dmo.scoring import vllm_lmms

    real = vllm_lmms.DmoVLLM._generate

    def broken(self: Any, requests: list, keys: list) -> None:
        if any(k[0] == "dmo_tiny_ocr" for k in keys):
            raise RuntimeError("ocr task exploded")
        real(self, requests, keys)

    monkeypatch.setattr(vllm_lmms.DmoVLLM, "_generate", broken)
    table = ResultsTable(tmp_path / "scores.jsonl")
    [(scores, errors)] = score_targets(s, table, [proxy({"general": 0.5, "ocr": 0.5})], BENCHMARKS)
    assert set(scores) == {"dmo_tiny_general"} and "ocr task exploded" in errors["dmo_tiny_ocr"]
    rows = table.records()
    assert {(r["benchmark"], r["status"]) for r in rows} == {("dmo_tiny_general", "ok"), ("dmo_tiny_ocr", "failed")}


def test_space_options_reach_the_backend() -> None:
    vllm = {"max_loras": 2, "store": "host", "engine": {"enforce_eager": True}}
    space = {
        "name": "v", "domains": ["general", "ocr"], "benchmarks": ["dmo_tiny_ocr"], "experts": "x.yaml",
        "mixtures": {"preset": "paper-2d"},
        "scoring": {"backend": "vllm", "vllm": vllm},
    }  # fmt: skip
    options = parse_space(space, "test").scoring.backend_options()
    assert options["max_loras"] == 2 and options["store"] == "host" and options["engine"] == {"enforce_eager": True}
    assert set(options) <= set(VLLMScorer.__init__.__code__.co_varnames)
    space["scoring"] = {"backend": "hf", "vllm": {"max_loras": 2}}
    with pytest.raises(DmoError, match="vllm backend only"):
        parse_space(space, "test")
