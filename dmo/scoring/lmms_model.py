"""The lmms-eval model ``dmo``: a live vision-language model whose weights can be switched to a proxy.

Scoring a mixture means evaluating a *proxy* (base weights + a merged delta) on benchmarks. Reloading a model
per proxy would dominate the cost on CPU, so :class:`DmoLMM` keeps one live base model and applies the current
proxy's delta only while lmms-eval asks it for answers (``generate_until`` / ``loglikelihood``), restoring the
base weights afterwards.

Two ways to build it:

* from Python: ``DmoLMM.from_model(model, processor)``, then ``set_proxy(delta, fingerprint)`` per proxy;
* from lmms-eval's command line: ``--model dmo --model_args pretrained=/path/base,adapter=/path/peft_adapter``
  (the adapter is optional, loaded with PEFT and merged in memory; nothing is ever downloaded).

Answers come from one shared generation function (by default ``dmo.tinyworld.generate.generate``) so that
lmms-eval scores exactly what the rest of dmo would generate.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from dmo.errors import DmoError
from dmo.merge.families import check_family

#: ``generate(model, processor, images, questions, max_new_tokens=..., batch_size=...) -> answers``
GenerateFn = Callable[..., list[str]]
#: ``apply_delta(model, delta)``: a context manager that writes base + delta into ``model`` and restores it on exit.
ApplyDeltaFn = Callable[[torch.nn.Module, Mapping[str, Any]], AbstractContextManager]

DEFAULT_GENERATE = "dmo.tinyworld.generate:generate"
DEFAULT_APPLY_DELTA = "dmo.merge.dense:applied_delta"
DEFAULT_BATCH_SIZE = 64
#: Used when a task does not say how many tokens to generate; dmo's benchmarks all want short answers.
DEFAULT_MAX_NEW_TOKENS = 16
BASE_FINGERPRINT = "base"


@dataclass(frozen=True)
class Proxy:
    """What the model currently answers as: ``delta`` on top of the base weights (``None``: the base itself)."""

    fingerprint: str
    delta: Mapping[str, Any] | None = None


def _resolve_callable(spec: str | Callable, what: str) -> Callable:
    """``"package.module:function"`` -> the function; callables pass through."""
    if callable(spec):
        return spec
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise DmoError(f"{what} {spec!r} must be written as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DmoError(f"cannot import {module_name} for {what} {spec!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DmoError(f"{module_name} has no function {attr!r} (needed as {what})")
    return fn


def _parse_batch_size(value: int | str | None) -> int:
    """lmms-eval passes ``--batch_size`` as a string, possibly ``auto``/``auto:N``; auto means dmo's default."""
    if value is None or (isinstance(value, str) and value.strip().lower().startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise DmoError(f"batch_size {value!r} is not a whole number: pass e.g. --batch_size 64") from None
    if size < 1:
        raise DmoError(f"batch_size must be >= 1, got {size}")
    return size


def _files_fingerprint(folder: Path) -> str:
    """A content hash of an adapter folder, so that a retrained adapter at the same path is a different proxy."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_pretrained(
    pretrained: str | Path,
    adapter: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Load a local model + processor (and merge a local PEFT adapter into it) without touching the network.

    ``trust_remote_code`` runs Python shipped inside the model folder; it stays off unless the expert manifest
    sets it (custom-code checkpoints need it; Qwen2-VL and InternVL in transformers' layout do not).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = Path(pretrained)
    if not (base / "config.json").is_file():
        raise DmoError(f"pretrained={pretrained} is not a local model folder (no config.json): pass a saved base model")
    check_family(base, paper_filter=False)  # a custom InternVL checkpoint: refused with how to convert it
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
        raise DmoError(f"dtype={dtype!r} is not a torch dtype: use auto, float32, bfloat16 or float16")
    try:
        processor = AutoProcessor.from_pretrained(base, local_files_only=True, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            base, local_files_only=True, trust_remote_code=trust_remote_code, dtype=torch_dtype
        )
    except (OSError, ValueError) as exc:
        raise DmoError(f"cannot load model from {base}: {str(exc).splitlines()[0]}") from exc
    if adapter is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise DmoError(f"adapter={adapter} is not a PEFT adapter folder (no adapter_config.json)")
        try:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False).merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise DmoError(f"cannot apply adapter {adapter_dir} to {base}: {str(exc).splitlines()[0]}") from exc
    # transformers wraps PreTrainedModel.to in a decorator whose stub takes the model as its first argument
    return model.to(device).eval(), processor  # type: ignore[arg-type]


class DmoLMM(lmms):
    """lmms-eval model backed by a live (model, processor) and an optional current proxy."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        adapter: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        device: str | None = None,
        dtype: str = "auto",
        generate_fn: str | GenerateFn = DEFAULT_GENERATE,
        apply_delta: str | ApplyDeltaFn = DEFAULT_APPLY_DELTA,
        max_batch_size: int | None = None,  # passed by lmms-eval's CLI; dmo does not search batch sizes
        *,
        model: torch.nn.Module | None = None,
        processor: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        del max_batch_size
        if model is not None:
            if pretrained is not None or adapter is not None:
                raise DmoError("give either a live model or pretrained=/adapter=, not both")
            if not isinstance(model, torch.nn.Module) or processor is None or isinstance(processor, str):
                raise DmoError(
                    "model= must be a live torch model, given with its processor; on the command line use pretrained="
                )
            live_device = next(model.parameters()).device
            if device is not None and torch.device(device) != live_device:
                raise DmoError(f"the live model is on {live_device}, not {device}: move it before wrapping it")
            self._model, self._processor = model, processor
            self._device = live_device
            self._name = name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
            proxy = Proxy(BASE_FINGERPRINT)
        else:
            if pretrained is None:
                raise DmoError("the dmo model needs pretrained=/path/to/base (a local model folder)")
            try:
                self._device = torch.device(device or "cpu")
            except RuntimeError as exc:
                raise DmoError(f"device={device!r} is not a torch device: use cpu or cuda[:N]") from exc
            self._model, self._processor = load_pretrained(pretrained, adapter, str(self._device), dtype)
            self._name = name or str(pretrained)
            # An adapter loaded here is merged into the weights, so the proxy is the merged model itself.
            proxy = Proxy(f"adapter-{_files_fingerprint(Path(adapter))}" if adapter else BASE_FINGERPRINT)
        self._proxy = proxy
        self._batch_size = _parse_batch_size(batch_size)
        self._generate_spec = generate_fn
        self._apply_delta_spec = apply_delta

    # -- construction and proxy switching -------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        processor: Any,
        *,
        proxy: Proxy | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        generate_fn: str | GenerateFn = DEFAULT_GENERATE,
        apply_delta: str | ApplyDeltaFn = DEFAULT_APPLY_DELTA,
        name: str | None = None,
    ) -> DmoLMM:
        """Wrap a live model (not copied, not moved); ``proxy`` selects the weights it answers with."""
        lmm = cls(
            batch_size=batch_size,
            generate_fn=generate_fn,
            apply_delta=apply_delta,
            model=model,
            processor=processor,
            name=name,
        )
        if proxy is not None:
            lmm.set_proxy(proxy.delta, proxy.fingerprint)
        return lmm

    def set_proxy(self, delta: Mapping[str, Any] | None, fingerprint: str) -> None:
        """Answer as base + ``delta`` from now on; ``fingerprint`` identifies it (in ``repr``, caches, logs)."""
        if not isinstance(fingerprint, str) or not fingerprint:
            raise DmoError("a proxy needs a non-empty fingerprint string")
        self._proxy = Proxy(fingerprint, delta)

    def clear_proxy(self) -> None:
        """Answer with the base weights again."""
        self._proxy = Proxy(BASE_FINGERPRINT)

    @property
    def proxy(self) -> Proxy:
        return self._proxy

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def __repr__(self) -> str:
        # lmms-eval's response cache keys a model by str(model): it must change whenever the weights do.
        return f"DmoLMM(base={self._name!r}, proxy={self._proxy.fingerprint!r})"

    __str__ = __repr__

    @contextlib.contextmanager
    def _proxy_weights(self) -> Iterator[None]:
        delta = self._proxy.delta
        if delta is None:
            yield
            return
        apply_delta = _resolve_callable(self._apply_delta_spec, "apply_delta")
        with apply_delta(self._model, delta):
            yield

    def clean(self) -> None:
        # lmms-eval calls this after generating; its default deletes every nn.Module attribute (and runs a
        # full gc, ~0.3 s per call), but dmo reuses the live model for the next proxy. Nothing to free.
        return None

    # -- lmms-eval request types ----------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int) -> Mapping[str, Any]:
        return self.task_dict[task][split][doc_id]

    def _docs(self, task: str, split: str, doc_ids: Sequence[int]) -> list[Mapping[str, Any]]:
        """The documents ``doc_ids`` of a split, read in one call where it is a ``datasets.Dataset`` (one row read
        at a time costs as much as the rest of lmms-eval's work per document)."""
        data = self.task_dict[task][split]
        if not hasattr(data, "column_names") or not doc_ids:
            return [data[i] for i in doc_ids]
        columns = data[list(doc_ids)]
        return [dict(zip(columns, row)) for row in zip(*columns.values())]

    @staticmethod
    def _images(visuals: Any, task: str) -> list[Image.Image]:
        if visuals is None:
            return []
        items = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        if len(items) == 1 and isinstance(items[0], (list, tuple)):
            items = list(items[0])
        for item in items:
            if not isinstance(item, Image.Image):
                raise DmoError(
                    f"task {task!r} gives a {type(item).__name__} as visual: the dmo model reads PIL images only"
                )
        return list(items)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        generate = _resolve_callable(self._generate_spec, "generate_fn")
        # Batches hold one task's documents in document order, cut every batch_size: the same batches as
        # generate() over that benchmark alone, so a score through lmms-eval is bit-identical to one computed
        # directly (padding differs with batch composition, and with it the last float bits of the logits).
        groups: dict[tuple[str, str, int, tuple[str, ...]], list[int]] = {}
        for i, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            groups.setdefault((task, split, *generation_key(gen_kwargs)), []).append(i)
        answers: list[str | None] = [None] * len(requests)
        with self._proxy_weights(), torch.inference_mode():
            for (task, split, max_new_tokens, until), indices in groups.items():
                indices.sort(key=lambda i: requests[i].args[3])  # document order
                for start in range(0, len(indices), self._batch_size):
                    chunk = indices[start : start + self._batch_size]
                    images, questions = [], []
                    docs = self._docs(task, split, [requests[i].args[3] for i in chunk])
                    for i, doc in zip(chunk, docs):
                        context, _, doc_to_visual, doc_id, _, _ = requests[i].args
                        found = self._images(doc_to_visual(doc), task)
                        if len(found) != 1:
                            raise DmoError(
                                f"task {task!r} doc {doc_id} has {len(found)} images: the dmo model answers "
                                "questions about exactly one image"
                            )
                        images.append(found[0])
                        questions.append(context.replace("<image>", "").strip())
                    outputs = generate(
                        self._model,
                        self._processor,
                        images,
                        questions,
                        max_new_tokens=max_new_tokens,
                        batch_size=self._batch_size,
                    )
                    if len(outputs) != len(chunk):
                        raise DmoError(f"generate_fn returned {len(outputs)} answers for {len(chunk)} questions")
                    for i, text in zip(chunk, outputs):
                        answers[i] = cut_at_stop(text, until)
        return [a if a is not None else "" for a in answers]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the log-probabilities of each continuation's tokens after the (chat-formatted) context."""
        results = []
        with self._proxy_weights(), _eval_mode(self._model), torch.inference_mode():
            for request in requests:
                if len(request.args) == 2:  # unconditional request (acc_mutual_info): no context, no image
                    context, continuation, images = request.args[0], request.args[1], []
                else:
                    context, target, doc_to_visual, doc_id, task, split = request.args
                    doc = self._doc(task, split, doc_id)
                    continuation = target if isinstance(target, str) else str(target(doc))
                    images = self._images(doc_to_visual(doc), task)
                results.append(self._continuation_logprob(images, context.replace("<image>", "").strip(), continuation))
        return results

    def _continuation_logprob(
        self, images: Sequence[Image.Image], context: str, continuation: str
    ) -> tuple[float, bool]:
        processor = self._processor
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": context}]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        enc = processor(text=[prompt], images=list(images) or None, return_tensors="pt")
        cont = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        n = cont.shape[1]
        if n == 0:
            return 0.0, True
        inputs = dict(enc)
        # Extend every per-token tensor by the continuation: ids by its tokens, the mask by ones, type ids
        # (text = 0) by zeros.
        inputs["input_ids"] = torch.cat([enc["input_ids"], cont], dim=1)
        for key, fill in (("attention_mask", 1), ("mm_token_type_ids", 0), ("token_type_ids", 0)):
            if key in inputs:
                inputs[key] = torch.cat([inputs[key], torch.full_like(cont, fill, dtype=inputs[key].dtype)], dim=1)
        inputs = {k: v.to(self._device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        logits = self._model(**inputs).logits[0, -n - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = cont[0].to(self._device)
        total = logprobs.gather(1, target[:, None]).sum().item()
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        return float(total), greedy

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise DmoError("the dmo model answers single-turn questions only; multi-round tasks are not supported")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Score in eval mode (no dropout) without changing the mode of a live model that belongs to the caller."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generation_key(gen_kwargs: Mapping[str, Any] | None) -> tuple[int, tuple[str, ...]]:
    """(max_new_tokens, stop strings). Sampling settings are ignored: dmo always decodes greedily."""
    gen_kwargs = gen_kwargs or {}
    max_new_tokens = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    until = gen_kwargs.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    return max_new_tokens, tuple(s for s in until if s)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The answer up to the first stop string, as lmms-eval's own models do."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text
