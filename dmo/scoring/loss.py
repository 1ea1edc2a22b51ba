"""Validation loss as a score: the benchmark ``loss:<domain>``.

The loss of a model on a domain is the mean negative log-likelihood of the answer tokens of the domain's validation
split, under teacher forcing with the base's chat template: labels on the assistant turns only, up to and including
their end-of-turn token, as SFT trains them and as the DMO paper's ``eval_loss.sh`` measures it. The mean is over
all answer tokens of the split pooled (not a mean of per-row means), so a long answer weighs by its length.

Lower is better. As a score, in [0, 1] and higher-is-better like every other benchmark, it is

    score = exp(-loss)

the geometric mean of the answer tokens' probabilities. It is a strictly decreasing map of the loss, so every rank
correlation of the score is exactly that of the loss (sign turned), and the raw loss is ``-log(score)``
(:func:`loss_of`). A row of the results table has ``metric: loss``.

The validation split comes from the expert manifest's ``data:`` folder, found as ``dmo data mix`` finds it
(``<domain>/val.jsonl``, ``<domain>/validation.jsonl``, ``<domain>.val.jsonl``, ...; the formats it reads), its first
:data:`dmo.groundtruth.data_mix.VAL_ROWS` rows (the DMO paper's ``_eval_small``), or the first ``limit``.

Both backends compute it on the same rows and the same token ids: ``hf`` with a forward pass of the live model (the
proxy's delta written in), ``vllm`` from the engine's prompt log-probabilities (``prompt_logprobs``, one generated
token), whose answer positions are checked against the token ids the processor gives.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dmo.errors import DmoError
from dmo.manifest import ExpertManifest
from dmo.mixture import check_domain_name

PREFIX = "loss:"
#: What a loss row's ``metric`` says.
METRIC = "loss"
#: The score rule, part of every loss score's cache key.
RULE = "exp(-mean answer-token nll)"
IGNORE = -100


def is_loss(benchmark: str) -> bool:
    return benchmark.startswith(PREFIX)


def loss_domain(benchmark: str) -> str:
    domain = benchmark.removeprefix(PREFIX)
    try:
        return check_domain_name(domain)
    except DmoError as exc:
        raise DmoError(f"benchmark {benchmark!r}: {exc}") from None


def split_benchmarks(benchmarks: Sequence[str]) -> tuple[list[str], list[str]]:
    """(lmms-eval benchmarks, ``loss:`` benchmarks), each in the given order."""
    return [b for b in benchmarks if not is_loss(b)], [b for b in benchmarks if is_loss(b)]


def score_of(loss: float) -> float:
    """The score of a mean answer-token loss: exp(-loss), in (0, 1]."""
    return math.exp(-loss)


def loss_of(score: float) -> float:
    """The mean answer-token loss behind a ``loss:`` score."""
    return -math.log(score)


def validation_file(manifest: ExpertManifest, domain: str) -> Path:
    """The validation split of ``domain`` named by the manifest; a one-line DmoError saying what to add if none."""
    from dmo.groundtruth.pools import find_val_sources

    bench = f"{PREFIX}{domain}"
    if manifest.data is None:
        raise DmoError(
            f"benchmark {bench!r} needs a validation split of domain {domain!r}, but manifest {manifest.name!r} names "
            f"no data folder: add 'data: <folder>' to it, a folder holding {domain}/val.jsonl"
        )
    found = find_val_sources(manifest.data, [domain]).get(domain)
    if found is None:
        raise DmoError(
            f"benchmark {bench!r} needs a validation split of domain {domain!r}, but {manifest.data} has none: add "
            f"{manifest.data / domain / 'val.jsonl'} (or {domain}/validation.jsonl, {domain}.val.jsonl), in a format "
            "'dmo data mix' reads, or drop the benchmark"
        )
    return found


class ValidationLoss:
    """``loss:<domain>`` scores of one manifest's models; validation splits read and encoded once per process."""

    def __init__(self, manifest: ExpertManifest, limit: int | None = None, batch_size: int = 64) -> None:
        self.manifest = manifest
        self.limit = limit
        self.batch_size = batch_size
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._encoded: dict[str, list[dict[str, Any]]] = {}
        self._digests: dict[str, str] = {}

    def check(self, benchmarks: Sequence[str]) -> None:
        """Every ``loss:`` benchmark has a readable validation split (before any study opens)."""
        for b in split_benchmarks(benchmarks)[1]:
            self.rows(loss_domain(b))

    def rows(self, domain: str) -> list[dict[str, Any]]:
        """The split's rows as sharegpt ``messages`` + absolute ``images`` (read and checked by data_mix)."""
        if domain not in self._rows:
            from dmo.groundtruth.pools import VAL_ROWS, read_pool

            rows = read_pool(validation_file(self.manifest, domain), domain).rows
            self._rows[domain] = rows[: min(VAL_ROWS, self.limit or VAL_ROWS)]
        return self._rows[domain]

    def cache_settings(self, benchmark: str) -> dict[str, Any]:
        """What a ``loss:`` score depends on besides the model and the scorer's settings: the rule and the data."""
        if not is_loss(benchmark):
            return {}
        domain = loss_domain(benchmark)
        if domain not in self._digests:
            self._digests[domain] = hashlib.sha256(validation_file(self.manifest, domain).read_bytes()).hexdigest()[:16]
        return {"loss_rule": RULE, "validation": self._digests[domain]}

    def encoded(self, domain: str, processor: Any) -> list[dict[str, Any]]:
        """Each row's model inputs with ``labels`` (IGNORE outside the answers), a batch of one each."""
        if domain not in self._encoded:
            from dmo.groundtruth.fisher_weights import ConversationEncoder

            encoder = ConversationEncoder(processor)
            self._encoded[domain] = [encoder.encode(row) for row in self.rows(domain)]
        return self._encoded[domain]

    # -------------------------------------------------------------------------------------------------- hf

    def hf_losses(self, model: torch.nn.Module, processor: Any, benchmarks: Sequence[str]) -> dict[str, float]:
        """Mean answer-token loss per ``loss:`` benchmark, from forward passes of ``model`` as it is now."""
        device = next(model.parameters()).device
        out = {}
        was_training = model.training
        model.eval()  # no dropout; the caller's mode is restored below
        try:
            with torch.inference_mode():
                for b in benchmarks:
                    rows = self.encoded(loss_domain(b), processor)
                    nll, tokens = 0.0, 0
                    for start in range(0, len(rows), self.batch_size):
                        s, n = answer_nll(model, collate(rows[start : start + self.batch_size], device))
                        nll, tokens = nll + s, tokens + n
                    out[b] = mean_loss(b, nll, tokens)
        finally:
            model.train(was_training)
        return out

    # ------------------------------------------------------------------------------------------------ vllm

    def vllm_losses(self, llm: Any, processor: Any, lora: Any, benchmarks: Sequence[str]) -> dict[str, float]:
        """Mean answer-token loss per ``loss:`` benchmark, from the engine's prompt log-probabilities.

        The prompt is the rendered conversation with its images; vLLM tokenises it itself (expanding the image
        placeholders), so the answer tokens are found from the end of the prompt, where the processor's encoding
        puts them, and their ids are checked against it.
        """
        from vllm import SamplingParams

        from dmo.groundtruth.fisher_weights import ConversationEncoder, chat_messages

        encoder = ConversationEncoder(processor)
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = {}
        for b in benchmarks:
            domain = loss_domain(b)
            rows, encoded = self.rows(domain), self.encoded(domain, processor)
            prompts = []
            for row in rows:
                text = "".join(t for t, _ in encoder.segments(chat_messages(row, encoder.multimodal)))
                prompt: dict[str, Any] = {"prompt": text}
                images = [_image(p) for p in row.get("images") or []]
                if images:
                    prompt["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
                prompts.append(prompt)
            results = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            nll, tokens = 0.0, 0
            for res, enc in zip(results, encoded):
                ids, labels = enc["input_ids"][0].tolist(), enc["labels"][0].tolist()
                got = list(res.prompt_token_ids)
                for j, label in enumerate(labels):
                    if label == IGNORE:
                        continue
                    k = len(got) - (len(ids) - j)  # the same position counted from the end
                    if k < 1 or got[k] != label:
                        raise DmoError(
                            f"{b}: the engine tokenised a validation prompt differently from the processor (answer "
                            "tokens do not line up): score this loss with the hf backend"
                        )
                    nll -= res.prompt_logprobs[k][label].logprob
                    tokens += 1
            out[b] = mean_loss(b, nll, tokens)
        return out


def _image(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def mean_loss(benchmark: str, nll: float, tokens: int) -> float:
    if tokens == 0:
        raise DmoError(f"{benchmark}: the validation split has no answer tokens")
    loss = nll / tokens
    if not math.isfinite(loss):
        raise DmoError(f"{benchmark}: the loss is {loss} (the model gives an answer token zero probability)")
    return loss


def collate(rows: Sequence[Mapping[str, Any]], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Encoded rows (a batch of one each) as one right-padded batch: per-token tensors padded (ids and type ids with
    0, the attention mask with 0, labels with IGNORE), image tensors concatenated in row order."""
    length = max(int(r["input_ids"].shape[1]) for r in rows)
    batch: dict[str, list[torch.Tensor]] = {}
    for r in rows:
        n = int(r["input_ids"].shape[1])
        for key, value in r.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() == 2 and value.shape[0] == 1 and value.shape[1] == n:  # one value per token
                fill = IGNORE if key == "labels" else 0
                value = torch.nn.functional.pad(value, (0, length - n), value=fill)
            batch.setdefault(key, []).append(value)
    return {k: torch.cat(v).to(device) for k, v in batch.items()}


def answer_nll(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[float, int]:
    """(sum of the answer tokens' negative log-likelihoods, their number) for one collated batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return float(nll), int((labels != IGNORE).sum())
