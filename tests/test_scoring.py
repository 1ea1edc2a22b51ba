"""dmo's lmms-eval layer end to end on a tiny random Qwen2-VL: task files, the ``dmo`` model, ``evaluate``, CLI.

The reference answers of half of the test items are replaced by the base model's own greedy answers, so the
base model scores well above zero and a score that is off by one item is caught.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

# lmms-eval is an optional dependency (the "eval" extra): without it this module is skipped, not failed.
pytest.importorskip("lmms_eval")

from dmo.errors import DmoError
from dmo.scoring.evaluate import evaluate
from dmo.scoring.lmms_model import DmoLMM
from dmo.scoring.metrics import score_from_results
from dmo.scoring.tasks import write_tiny_tasks
from dmo.tinyworld.config import WorldConfig
from dmo.tinyworld.data import read_split, write_domain
from dmo.tinyworld.generate import generate
from dmo.tinyworld.model import init_model
from dmo.tinyworld.tokenizer import build_processor

DOMAINS = ("general", "counting", "ocr", "chart")
N_TEST = 8
BATCH = 64


@dataclass
class World:
    root: Path
    config: WorldConfig
    model: torch.nn.Module
    processor: object
    tasks: Path

    def rows(self, domain: str) -> list[dict]:
        return read_split(self.root, domain, "test")

    def images(self, domain: str) -> list[Image.Image]:
        return [Image.open(self.root / "data" / domain / r["image"]).convert("RGB") for r in self.rows(domain)]


def _same(pred: str, answer: str) -> bool:
    # Written out here rather than imported, so the test does not trust the code under test.
    return " ".join(pred.split()).lower() == " ".join(answer.split()).lower()


def direct_answers(world: World, domain: str, model: torch.nn.Module | None = None, n: int | None = None) -> list[str]:
    images, questions = world.images(domain)[:n], [r["question"] for r in world.rows(domain)][:n]
    model = world.model if model is None else model
    return generate(
        model, world.processor, images, questions, max_new_tokens=world.config.max_new_tokens, batch_size=BATCH
    )


def direct_score(world: World, domain: str, model: torch.nn.Module | None = None, n: int | None = None) -> float:
    answers = [r["answer"] for r in world.rows(domain)][:n]
    preds = direct_answers(world, domain, model, n)
    return sum(_same(p, a) for p, a in zip(preds, answers)) / len(answers)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    config = WorldConfig.small()
    for domain in DOMAINS:
        write_domain(root, domain, config.seed, {"train": 1, "test": N_TEST}, config.image_size)
    processor = build_processor(config)
    model = init_model(config, processor.tokenizer).eval()
    w = World(root, config, model, processor, root / "tasks")
    for domain in DOMAINS:
        rows, preds = w.rows(domain), direct_answers(w, domain)
        for i in range(0, len(rows), 2):
            rows[i]["answer"] = preds[i]
        (root / "data" / domain / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_tiny_tasks(root / "data", w.tasks, DOMAINS, max_new_tokens=config.max_new_tokens)
    return w


@pytest.fixture()
def lmm(world: World) -> DmoLMM:
    return DmoLMM.from_model(world.model, world.processor, batch_size=BATCH)


def noise_delta(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> dict[str, torch.Tensor]:
    """A delta that changes the answers: noise on the text tower's output head and last MLP."""
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, p in model.named_parameters() if n == "lm_head.weight" or ("mlp" in n and "visual" not in n)]
    params = dict(model.named_parameters())
    return {n: scale * torch.randn(params[n].shape, generator=gen) for n in names}


# -- task files ------------------------------------------------------------------------------------------------------


def test_task_files_are_relative_and_load_through_task_manager(world: World) -> None:
    from lmms_eval.tasks import TaskManager, get_task_dict

    files = sorted(p.name for p in world.tasks.iterdir())
    assert files == sorted([*(f"dmo_tiny_{d}.yaml" for d in DOMAINS), "dmo_tiny.yaml", "utils.py"])
    for path in world.tasks.iterdir():
        assert str(world.root) not in path.read_text(), f"{path.name} holds an absolute path"

    manager = TaskManager("ERROR", include_path=str(world.tasks), include_defaults=False)
    assert set(manager.all_subtasks) == {f"dmo_tiny_{d}" for d in DOMAINS}
    assert manager.all_groups == ["dmo_tiny"]
    task = get_task_dict(["dmo_tiny_ocr"], manager)["dmo_tiny_ocr"]
    doc = task.test_docs()[0]
    assert doc["question"] == world.rows("ocr")[0]["question"]
    (image,) = task.doc_to_visual(doc)
    assert image.size == (world.config.image_size, world.config.image_size)
    assert task.config.generation_kwargs["max_new_tokens"] == world.config.max_new_tokens


def test_write_tiny_tasks_refuses_missing_data(tmp_path: Path) -> None:
    with pytest.raises(DmoError, match="missing test data"):
        write_tiny_tasks(tmp_path / "data", tmp_path / "tasks", ["ocr"])
    with pytest.raises(DmoError, match="invalid domain name"):
        write_tiny_tasks(tmp_path / "data", tmp_path / "tasks", ["../x"])


# -- scores ----------------------------------------------------------------------------------------------------------


def test_simple_evaluate_with_a_model_object_matches_direct_generation(world: World, lmm: DmoLMM) -> None:
    """(a) + (b): lmms-eval's own entry point, the model passed as an object, scored per domain."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("ERROR", include_path=str(world.tasks), include_defaults=False)
    results = simple_evaluate(
        model=lmm, tasks=["dmo_tiny"], task_manager=manager, use_cache=None, log_samples=False, bootstrap_iters=0
    )
    for domain in DOMAINS:
        got = results["results"][f"dmo_tiny_{domain}"]["exact_match,none"]
        assert got == pytest.approx(direct_score(world, domain)), domain
    assert results["results"]["dmo_tiny"]["exact_match,none"] == pytest.approx(
        sum(direct_score(world, d) for d in DOMAINS) / len(DOMAINS)
    )


def test_evaluate_returns_one_score_per_benchmark(world: World, lmm: DmoLMM) -> None:
    benchmarks = [f"dmo_tiny_{d}" for d in DOMAINS] + ["dmo_tiny"]
    scores = evaluate(lmm, benchmarks, world.tasks)
    assert list(scores) == benchmarks
    expected = {f"dmo_tiny_{d}": direct_score(world, d) for d in DOMAINS}
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value), name
    assert scores["dmo_tiny"] == pytest.approx(sum(expected.values()) / len(expected))
    assert min(expected.values()) >= 0.5  # half the answers are the base model's own
    # limit = the first `limit` documents of each task
    assert evaluate(lmm, ["dmo_tiny_chart"], world.tasks, limit=3)["dmo_tiny_chart"] == pytest.approx(
        direct_score(world, "chart", n=3)
    )


def test_evaluate_leaves_the_model_and_the_callers_random_state_alone(world: World, lmm: DmoLMM) -> None:
    before = {k: v.clone() for k, v in world.model.state_dict().items()}
    torch.manual_seed(123)
    expected_draw = torch.rand(1)  # global-rng: evaluate must leave the caller's global state alone
    torch.manual_seed(123)
    evaluate(lmm, ["dmo_tiny_ocr"], world.tasks, limit=2)
    assert torch.equal(torch.rand(1), expected_draw)  # global-rng: the same draw as before evaluate
    # lmms-eval's default clean() deletes the model after each run; dmo's must keep it for the next proxy
    assert lmm.model is world.model
    assert all(torch.equal(before[k], v) for k, v in world.model.state_dict().items())


def test_moved_task_and_data_folders_still_work(world: World, lmm: DmoLMM, tmp_path: Path) -> None:
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.copytree(world.root / "data", moved / "data", ignore=shutil.ignore_patterns("train.jsonl"))
    shutil.copytree(world.tasks, moved / "tasks")
    scores = evaluate(lmm, ["dmo_tiny_counting"], moved / "tasks", limit=4)
    assert scores["dmo_tiny_counting"] == pytest.approx(direct_score(world, "counting", n=4))


# -- proxies ---------------------------------------------------------------------------------------------------------


def _answers(lmm: DmoLMM, world: World, task: str) -> list[str]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("ERROR", include_path=str(world.tasks), include_defaults=False)
    out = simple_evaluate(model=lmm, tasks=[task], task_manager=manager, log_samples=True, bootstrap_iters=0)
    return [s["filtered_resps"][0] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_switching_the_proxy_changes_repr_and_answers(world: World, lmm: DmoLMM) -> None:
    """(c): the delta is applied while answering and removed afterwards."""
    base_repr, base_answers = repr(lmm), _answers(lmm, world, "dmo_tiny_general")
    assert base_answers == direct_answers(world, "general")

    delta = noise_delta(world.model)
    lmm.set_proxy(delta, "proxy-abc123")
    assert "proxy-abc123" in repr(lmm) and repr(lmm) != base_repr
    proxy_answers = _answers(lmm, world, "dmo_tiny_general")
    assert proxy_answers != base_answers

    merged = copy.deepcopy(world.model)
    with torch.no_grad():
        for name, param in merged.named_parameters():
            if name in delta:
                param.add_(delta[name])
    assert proxy_answers == direct_answers(world, "general", model=merged)

    lmm.clear_proxy()
    assert repr(lmm) == base_repr
    assert _answers(lmm, world, "dmo_tiny_general") == base_answers


def test_from_model_with_a_proxy(world: World) -> None:
    from dmo.scoring.lmms_model import Proxy

    delta = noise_delta(world.model, seed=2)
    lmm = DmoLMM.from_model(world.model, world.processor, proxy=Proxy("p2", delta), name="tiny")
    assert repr(lmm) == "DmoLMM(base='tiny', proxy='p2')"
    assert lmm.proxy.delta is delta


# -- loglikelihood ---------------------------------------------------------------------------------------------------


def test_loglikelihood_is_the_sum_of_continuation_token_logprobs(world: World, lmm: DmoLMM) -> None:
    from lmms_eval.api.instance import Instance

    rows, images = world.rows("general"), world.images("general")
    lmm.task_dict["t"] = {"test": rows}
    tokenizer = world.processor.tokenizer
    candidates = ["red", "blue circle", "4"]
    requests = [
        Instance(
            "loglikelihood",
            (rows[0]["question"], c, lambda doc: [images[0]], 0, "t", "test"),
            0,
            metadata={"task": "t", "doc_id": 0, "repeats": 1},
        )
        for c in candidates
    ]
    got = lmm.loglikelihood(requests)

    # Independently: one forward pass over prompt + continuation, read off the continuation's token log-probs.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rows[0]["question"]}]}]
    prompt = world.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for (logprob, greedy), text in zip(got, candidates):
        cont = tokenizer(text, add_special_tokens=False)["input_ids"]
        enc = world.processor(text=[prompt], images=[images[0]], return_tensors="pt")
        ids = torch.cat([enc["input_ids"], torch.tensor([cont])], dim=1)
        types = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, len(cont), dtype=torch.long)], dim=1)
        extra = {k: v for k, v in enc.items() if k in ("pixel_values", "image_grid_thw")}
        with torch.no_grad():
            logits = world.model(
                input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types, **extra
            ).logits[0]
        steps = torch.log_softmax(logits[-len(cont) - 1 : -1].float(), dim=-1)
        expected = sum(steps[i, t].item() for i, t in enumerate(cont))
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == all(steps[i].argmax().item() == t for i, t in enumerate(cont))


# -- errors ----------------------------------------------------------------------------------------------------------


def test_unknown_benchmark_is_a_one_line_error_naming_it(world: World, lmm: DmoLMM) -> None:
    """(e): checked before anything is evaluated."""
    with pytest.raises(DmoError) as err:
        evaluate(lmm, ["dmo_tiny_ocr", "dmo_tiny_nosuch"], world.tasks)
    assert "dmo_tiny_nosuch" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DmoError, match="no score metric known for benchmark 'mystery_bench'"):
        evaluate(lmm, ["mystery_bench"], world.tasks)


def test_missing_data_file_is_reported_before_lmms_eval_retries(world: World, lmm: DmoLMM, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(world.tasks, tmp_path / "tasks")  # its relative data path now points nowhere
    with pytest.raises(DmoError, match="needs data file"):
        evaluate(lmm, ["dmo_tiny"], tmp_path / "tasks")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({}, "pretrained="), ({"pretrained": "/nonexistent/base"}, "not a local model folder")],
)
def test_bad_model_args_are_dmo_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(DmoError, match=message):
        DmoLMM(**kwargs)


# -- lmms-eval's command line ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(world: World, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The base model saved as a folder, and a PEFT LoRA adapter for it with non-zero weights."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("saved")
    base, adapter = folder / "base", folder / "adapter"
    world.model.save_pretrained(base)
    world.processor.save_pretrained(base)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(world.model), config).save_pretrained(adapter)
    return base, adapter


def test_model_args_load_base_and_merge_adapter(world: World, saved: tuple[Path, Path]) -> None:
    base, adapter = saved
    plain = DmoLMM(pretrained=str(base), batch_size="auto")
    assert plain.batch_size == 64 and "proxy='base'" in repr(plain)
    assert evaluate(plain, ["dmo_tiny_ocr"], world.tasks)["dmo_tiny_ocr"] == pytest.approx(direct_score(world, "ocr"))

    adapted = DmoLMM(pretrained=str(base), adapter=str(adapter), batch_size=str(BATCH))
    assert "proxy='adapter-" in repr(adapted)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(world.model), adapter).merge_and_unload()
    assert _answers(adapted, world, "dmo_tiny_ocr") == direct_answers(world, "ocr", model=merged)


def test_merged_lora_proxy_answers_like_the_peft_merged_adapter(world: World, saved: tuple[Path, Path]) -> None:
    """The in-memory proxy path (dmo.merge deltas) and the command-line path (PEFT merge) give the same answers."""
    from dmo.merge.lora import expert_delta, fingerprint, load_lora

    base, adapter_dir = saved
    adapter = load_lora(adapter_dir)
    lmm = DmoLMM.from_model(world.model, world.processor, batch_size=BATCH)
    lmm.set_proxy(expert_delta(adapter), fingerprint({"ocr": adapter}, {"ocr": 1.0}))
    via_proxy = _answers(lmm, world, "dmo_tiny_ocr")
    via_peft = _answers(DmoLMM(pretrained=str(base), adapter=str(adapter_dir), batch_size=BATCH), world, "dmo_tiny_ocr")
    assert via_proxy == via_peft
    assert via_proxy != direct_answers(world, "ocr")


@pytest.mark.slow
def test_lmms_eval_cli_runs_the_dmo_model(world: World, saved: tuple[Path, Path], tmp_path: Path) -> None:
    """(d): `python -m lmms_eval --model dmo ...` finds the model through the entry point and writes results."""
    base, adapter = saved
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "dmo",
        "--model_args", f"pretrained={base},adapter={adapter}",
        "--tasks", "dmo_tiny_ocr", "--include_path", str(world.tasks),
        "--limit", "4", "--batch_size", str(BATCH), "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = out.rglob("*_results.json")
    cli_score = score_from_results("dmo_tiny_ocr", json.loads(results_file.read_text()))

    in_process = DmoLMM(pretrained=str(base), adapter=str(adapter), batch_size=BATCH)
    assert cli_score == pytest.approx(evaluate(in_process, ["dmo_tiny_ocr"], world.tasks, limit=4)["dmo_tiny_ocr"])
