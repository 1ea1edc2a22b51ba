"""The lmms-eval model ``dmo_vllm``: one live vLLM engine answering for the current proxy (or several at once).

:class:`DmoVLLM` wraps an engine (``vllm.LLM``) and the proxies it answers for. A proxy served as a LoRA adapter
is a ``LoRARequest`` (``None``: the engine's current weights). When several proxies are set
(:meth:`DmoVLLM.set_proxies`), the first ``generate_until`` sends every question once per proxy in a single
``LLM.generate`` call, each with its own adapter, so vLLM batches all proxies together; lmms-eval is then run
once per proxy with :attr:`DmoVLLM.active` pointing at it, and the answers already generated are returned.

From lmms-eval's command line: ``--model dmo_vllm --model_args pretrained=/path/base[,adapter=/path/adapter]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from dmo.errors import DmoError
from dmo.scoring.lmms_model import DmoLMM, cut_at_stop, generation_key

#: ``(task, split, doc_id, context, max_new_tokens, stop strings)``: what makes two requests the same question.
RequestKey = tuple[str, str, int, str, int, tuple[str, ...]]


class DmoVLLM(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        adapter: str | None = None,
        max_lora_rank: int | str = 64,
        gpu_memory_utilization: float | str | None = None,  # None: the platform's default (engine_kwargs)
        trust_remote_code: bool | str = False,
        batch_size: Any = None,  # lmms-eval passes it; vLLM schedules its own batches
        max_batch_size: Any = None,
        *,
        llm: Any = None,
        processor: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        del batch_size, max_batch_size
        if llm is None:
            if pretrained is None:
                raise DmoError("the dmo_vllm model needs pretrained=/path/to/base (a local model folder)")
            llm, processor, lora = _engine_from_args(
                pretrained,
                adapter,
                int(max_lora_rank),
                None if gpu_memory_utilization is None else float(gpu_memory_utilization),
                _flag(trust_remote_code),
            )
            self._proxies: list[tuple[str, Any]] = [(f"adapter:{adapter}" if adapter else "base", lora)]
        else:
            if processor is None:
                raise DmoError("a live engine must be given with its processor (for the chat template)")
            self._proxies = [("base", None)]
        self._llm = llm
        self._processor = processor
        self._name = name or str(pretrained or "vllm")
        self._answers: list[dict[RequestKey, str]] = [{}]
        self.active = 0
        self.generated_tokens = 0

    # -- proxies --------------------------------------------------------------------------------------------

    def set_proxies(self, proxies: Sequence[tuple[str, Any]]) -> None:
        """Answer for these ``(fingerprint, lora_request or None)`` proxies; forgets earlier answers."""
        if not proxies:
            raise DmoError("set_proxies needs at least one proxy")
        self._proxies = list(proxies)
        self._answers = [{} for _ in proxies]
        self.active = 0

    @property
    def llm(self) -> Any:
        return self._llm

    def __repr__(self) -> str:
        # lmms-eval's response cache keys a model by str(model): it must change whenever the proxy does.
        return f"DmoVLLM(base={self._name!r}, proxy={self._proxies[self.active][0]!r})"

    __str__ = __repr__

    def clean(self) -> None:
        # lmms-eval's default deletes every attribute and runs a full gc; the engine is reused for the next proxy
        return None

    # -- lmms-eval request types ----------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        keys = [self._key(r) for r in requests]
        todo = [i for i, k in enumerate(keys) if k not in self._answers[self.active]]
        if todo:
            self._generate([requests[i] for i in todo], [keys[i] for i in todo])
        return [self._answers[self.active][k] for k in keys]

    def _generate(self, requests: Sequence[Instance], keys: Sequence[RequestKey]) -> None:
        from vllm import SamplingParams

        prompts, params = [], []
        for request, key in zip(requests, keys):
            context, _, doc_to_visual, doc_id, task, split = request.args
            images = _images(doc_to_visual(self.task_dict[task][split][doc_id]), task)
            prompt: dict[str, Any] = {"prompt": self._chat(context, len(images))}
            if images:
                prompt["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
            prompts.append(prompt)
            # greedy, like dmo's hf backend: a proxy's score must not depend on sampling noise
            params.append(SamplingParams(temperature=0.0, max_tokens=key[4], stop=list(key[5]) or None))
        n = len(self._proxies)
        outputs = self._llm.generate(
            [p for _ in range(n) for p in prompts],
            [s for _ in range(n) for s in params],
            lora_request=[lora for _, lora in self._proxies for _ in prompts],
            use_tqdm=False,
        )
        if len(outputs) != n * len(prompts):
            raise DmoError(f"the engine returned {len(outputs)} answers for {n * len(prompts)} requests")
        for j, out in enumerate(outputs):
            completion = out.outputs[0]
            self.generated_tokens += len(completion.token_ids)
            key = keys[j % len(prompts)]
            self._answers[j // len(prompts)][key] = cut_at_stop(completion.text, key[5]).strip()

    def _key(self, request: Instance) -> RequestKey:
        context, gen_kwargs, _, doc_id, task, split = request.args
        return (task, split, int(doc_id), context, *generation_key(gen_kwargs))

    def _chat(self, context: str, n_images: int) -> str:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": context.replace("<image>", "").strip()}]
        return self._processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise DmoError(
            "the vllm backend answers generation tasks only; score log-likelihood (multiple-choice) tasks with "
            "--backend hf"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise DmoError("the dmo_vllm model answers single-turn questions only; multi-round tasks are not supported")


def _images(visuals: Any, task: str) -> list[Image.Image]:
    return [im.convert("RGB") for im in DmoLMM._images(visuals, task)]


def _flag(value: bool | str) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def _engine_from_args(
    pretrained: str,
    adapter: str | None,
    max_lora_rank: int,
    gpu_memory_utilization: float | None,
    trust_remote_code: bool,
) -> tuple[Any, Any, Any]:
    from pathlib import Path

    from transformers import AutoProcessor
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from dmo.scoring.vllm.engine import adapter_rank, engine_kwargs

    rank = adapter_rank(Path(adapter)) if adapter else 0
    kwargs = engine_kwargs(
        Path(pretrained), lora_rank=rank, max_lora_rank=max_lora_rank if adapter else None,
        gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    llm = LLM(**kwargs)
    processor = AutoProcessor.from_pretrained(pretrained, local_files_only=True, trust_remote_code=trust_remote_code)
    lora = LoRARequest("adapter", 1, str(adapter)) if adapter else None
    return llm, processor, lora


def answers(lmm: DmoVLLM) -> Mapping[RequestKey, str]:
    """The answers generated so far for the active proxy (for tests and debugging)."""
    return dict(lmm._answers[lmm.active])
