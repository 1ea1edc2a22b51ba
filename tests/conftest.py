"""What every test shares."""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from checkpoints import qwen2_config

#: Test files that compare floating-point results against references. ``scripts/test.sh`` runs them a second time on
#: other kernels (``-m numerical`` under MKL's SSE4.2 / compatible path, ATen's non-vectorised one and one thread, in a
#: shuffled order), so that no tolerance holds for one CPU's kernel path only.
NUMERICAL = (
    "test_calibrated_objective.py", "test_calibration.py", "test_correlate.py", "test_fisher.py", "test_internvl.py",
    "test_live_merge.py", "test_loss_score.py", "test_merge_cli.py", "test_merge_lora.py", "test_merge_mergekit.py",
    "test_merge_methods.py", "test_merge_paper_methods.py", "test_merge_stream.py", "test_mixture.py",
    "test_scoring.py", "test_suggest.py", "test_tinyworld.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in NUMERICAL:
            item.add_marker(pytest.mark.numerical)


@pytest.fixture(autouse=True)
def _grad_mode_left_as_found() -> Iterator[None]:
    """A test (or the code it runs) that leaves autograd switched off breaks every later test that trains or uses a
    sampler built on autograd (Optuna's GP), far from the cause: fail the test that did it instead."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left torch's grad mode off (a no_grad/inference_mode entered and never left)")


@pytest.fixture
def replay_space() -> Callable[..., Path]:
    """Writes a 3-domain space scored by the ``replay`` backend from ``recorded`` (domains a, b, c; benchmarks b1,
    b2), with a manifest of empty expert folders (replay needs no weights); returns the space file."""

    def write(
        root: Path, recorded: Path, sampler: str = "random", n_trials: int = 12, file: str = "space.yaml"
    ) -> Path:
        for d in ("base", "ea", "eb", "ec"):
            (root / "models" / d).mkdir(parents=True, exist_ok=True)
        (root / "experts.yaml").write_text(
            "name: fake\nbase: ./models/base\nexperts: {a: ./models/ea, b: ./models/eb, c: ./models/ec}\n"
        )
        path = root / file
        path.write_text(
            textwrap.dedent(f"""\
            name: rp
            domains: [a, b, c]
            experts: experts.yaml
            mixtures: {{lattice: {{resolution: 4}}}}
            benchmarks: [b1, b2]
            sampler: {{name: {sampler}, n_trials: {n_trials}, seed: 0}}
            scoring: {{backend: replay, replay: {{table: {recorded}, nearest: true}}}}
            """)
        )
        return path

    return write


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny real Qwen2 (saved by transformers) and three PEFT-saved LoRA experts with random non-zero A and B."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**{k: v for k, v in qwen2_config().items() if k not in ("architectures",)})
    model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(root / "base"))
    (root / "base" / "tokenizer_config.json").write_text("{}")
    recipes = {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
        "b": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
        "c": dict(r=2, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "o_proj"]),
    }
    experts = {}
    for i, (name, recipe) in enumerate(recipes.items()):
        pm = peft.get_peft_model(
            transformers.Qwen2ForCausalLM.from_pretrained(str(root / "base")), peft.LoraConfig(**recipe)
        )
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(str(root / name), save_embedding_layers=False)
        experts[name] = root / name
    return {"root": root, "base": root / "base", "experts": experts, "transformers": transformers, "peft": peft}
