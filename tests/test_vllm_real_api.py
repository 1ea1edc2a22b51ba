"""dmo's vLLM glue against the real ``vllm`` package's public classes (imported on the CPU; no engine is started).

What is checked: the engine keyword arguments are fields ``EngineArgs`` accepts; the worker extension can be mixed
into vLLM's GPU worker under vLLM's own clash rule; the ``LLM`` methods dmo calls take the arguments dmo passes;
the ranks dmo allows are vLLM's; the engine-death exception is recognised; vLLM's Qwen2-VL weight mapper accepts
the names of a checkpoint saved by transformers (what the weight-write path hands to ``load_weights``).
What is not checked here: a running engine (it needs a GPU and vLLM's CUDA kernels).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import typing
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    assert not os.environ.get("CI"), "CI is set but vllm is not importable: bash scripts/install_vllm.sh"
    pytest.skip("vllm missing: bash scripts/install_vllm.sh; .venv-vllm/bin/python -m pytest", allow_module_level=True)

from dmo.scoring.vllm_backend import VLLM_LORA_RANKS, _is_engine_death, engine_kwargs
from dmo.scoring.vllm_worker import DmoWorkerExtension


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dmo.tinyworld.config import WorldConfig
    from dmo.tinyworld.model import init_model
    from dmo.tinyworld.tokenizer import build_processor

    config = WorldConfig.small()
    processor = build_processor(config)
    folder = tmp_path_factory.mktemp("vllm-api") / "base"
    init_model(config, processor.tokenizer).save_pretrained(folder)
    return folder


def test_engine_kwargs_are_engine_args_fields(base: Path) -> None:
    from vllm import EngineArgs

    kwargs = engine_kwargs(base, lora_rank=24, tower_lora=True, max_model_len=2048, extra={"enforce_eager": True})
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(kwargs) <= fields, set(kwargs) - fields
    args = EngineArgs(**kwargs)
    assert args.enable_lora and args.max_lora_rank == 32 and args.max_loras == 4
    assert args.worker_extension_cls == "dmo.scoring.vllm_worker.DmoWorkerExtension"
    assert args.enable_tower_connector_lora and args.limit_mm_per_prompt == {"image": 1, "video": 0}


def test_allowed_ranks_are_vllms() -> None:
    from vllm.config.lora import MaxLoRARanks

    assert set(VLLM_LORA_RANKS) == set(typing.get_args(MaxLoRARanks))


def test_worker_extension_mixes_into_the_gpu_worker() -> None:
    """vLLM refuses an extension whose attributes clash with its worker's (worker_base.WorkerWrapperBase)."""
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.gpu_worker import Worker

    ext = resolve_obj_by_qualname(engine_kwargs(Path("/x"))["worker_extension_cls"])
    assert ext is DmoWorkerExtension
    own = [a for a in dir(ext) if not a.startswith("__")]
    assert [a for a in own if hasattr(Worker, a)] == []
    assert hasattr(Worker, "get_model")  # what the extension reads the live model from


def test_llm_methods_take_what_dmo_passes() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora = LoRARequest(lora_name="p", lora_int_id=7, lora_path="/tmp/adapter")
    params = SamplingParams(temperature=0.0, max_tokens=8, stop=["\n"])
    prompt = {"prompt": "hi", "multi_modal_data": {"image": object()}}
    inspect.signature(LLM.generate).bind(None, [prompt, prompt], [params, params], lora_request=[lora, None],
                                         use_tqdm=False)  # fmt: skip
    inspect.signature(LLM.collective_rpc).bind(None, "dmo_write", args=("experts", {"a": 1.0}, "ties", {}))
    inspect.signature(LLM.reset_prefix_cache).bind(None)
    inspect.signature(LLM.reset_mm_cache).bind(None)
    assert params.temperature == 0.0 and params.max_tokens == 8 and params.stop == ["\n"]


def test_engine_death_is_recognised() -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    assert _is_engine_death(EngineDeadError())
    try:
        raise RuntimeError("wrapped") from EngineDeadError()
    except RuntimeError as exc:
        assert _is_engine_death(exc)
    assert not _is_engine_death(RuntimeError("something else"))


def test_vllm_maps_every_saved_checkpoint_name(base: Path) -> None:
    from safetensors import safe_open
    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    mapper = Qwen2VLForConditionalGeneration.hf_to_vllm_mapper
    mapped = {n: mapper._map_name(n) for n in names}
    assert all(m is not None and m.startswith(("language_model.", "visual.")) for m in mapped.values()), mapped


def test_lmms_eval_finds_the_dmo_vllm_model() -> None:
    from lmms_eval.models import get_model

    from dmo.scoring.vllm_lmms import DmoVLLM

    assert get_model("dmo_vllm") is DmoVLLM
