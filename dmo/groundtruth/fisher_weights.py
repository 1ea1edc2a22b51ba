"""Diagonal Fisher weights of each expert on its own domain's data: the per-expert input of ``fisher``/``fisher_nn``.

``dmo fisher`` runs :func:`compute_fisher`. For expert ``i`` (its dense weights ``theta_i``: the base plus its
task vector, ``W = W0 + s * B @ A`` for a LoRA expert) and ``N`` samples ``x_n`` of its domain with answer tokens
``y_n``:

    F_i = sum_n (d/d theta_i sum_t log p(y_nt | x_n, y_n<t))^2 / sum_n T_n

the squared gradient of each sample's summed log-likelihood of its answer tokens, summed over the samples and divided
by the total number of answer tokens ``sum_n T_n``. This is the DMO paper's ``train/fisher.py`` (its LLaMA-Factory
fork; default ``fisher_method: empirical``, ``num_fisher_examples: 2000``) with a batch of one sample, so each
square is one sample's, as the diagonal empirical Fisher is defined. ``target="predictions"`` uses the model's own
greedy tokens instead of the labels (the paper's ``true_hard``). Gradients are taken with respect to the *dense*
parameters the experts change, in float32 by default; the answer tokens are the assistant turns of the chat
template, up to and including the turn's end token (as SFT labels them).

Which parameters: those that any expert of the manifest changes (LoRA: the adapted modules' weights and any
``modules_to_save``; full fine-tunes: every tensor that differs from the base, and every tensor the dense merge of
full experts merges by default), so that every mixture of the manifest's experts finds a Fisher tensor for each
parameter it merges (:func:`fisher_params`). Names are the base checkpoint's.

Where: ``<expert folder>/fisher.safetensors`` for a LoRA adapter (PEFT and vLLM read only ``adapter_model.*``
there), ``<expert folder>/fisher/fisher.safetensors`` for a full checkpoint (loaders that read every
``*.safetensors`` of a model folder, as vLLM does without an index file, must not take it for weights), or the
manifest's ``fisher:`` path of that expert when it has one. :func:`fisher_paths` resolves them the same way for the
merges; :func:`record_in_manifest` adds the ``fisher:`` entries to the manifest.

Data: the expert's domain under ``--data``, in any format :mod:`dmo.groundtruth.data_mix` reads (the tiny world's
``question``/``answer``/``image`` JSONL, sharegpt, alpaca), the first ``N`` rows of the same seeded permutation
:func:`dmo.groundtruth.data_mix.domain_order` the mixtures draw from; images are encoded with the base's own
processor and
chat template (:class:`ConversationEncoder`).
"""

from __future__ import annotations

import functools
import json
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dmo.errors import DmoError
from dmo.merge.inputs import fisher_file

Target = Literal["labels", "predictions"]
TARGETS: tuple[str, ...] = ("labels", "predictions")
#: The paper's ``num_fisher_examples``.
DEFAULT_SAMPLES = 2000
IGNORE = -100
#: ``progress(expert, done, total)`` after each sample.
Progress = Callable[[str, int, int], None]


def record_in_manifest(
    manifest_file: str | os.PathLike[str], paths: Mapping[str, str | os.PathLike[str]], *, write: bool = True
) -> tuple[bool, list[str]]:
    """Add ``fisher: <path relative to the manifest>`` to each expert of ``paths`` in the manifest file.

    With ``write``, the manifest is rewritten atomically (only those entries change, comments and layout stay) and
    ``(True, lines)`` returned; without, or when its layout cannot be edited safely, nothing is written and
    ``(False, lines)`` gives the entries to paste under ``experts:``.
    """
    from dmo.atomic import write_text
    from dmo.configfile import read_yaml
    from dmo.manifest import set_expert_field

    manifest_file = Path(manifest_file)
    root = manifest_file.parent.resolve()
    rel = {d: os.path.relpath(Path(p).resolve(), root) for d, p in paths.items()}
    raw = read_yaml(manifest_file).get("experts") or {}
    lines = []
    for d, f in rel.items():
        entry = raw.get(d)
        if isinstance(entry, dict):
            fields = ", ".join(f"{k}: {v}" for k, v in entry.items() if k != "fisher")
        else:
            fields = f"{'path' if str(entry).startswith(('./', '../', '/', '~')) else 'hub'}: {entry}"
        lines.append(f"  {d}: {{{fields}, fisher: {f}}}")
    if not write:
        return False, lines
    try:
        text = set_expert_field(manifest_file, "fisher", rel)
        write_text(manifest_file, text)
    except DmoError:
        return False, lines
    return True, lines


# ------------------------------------------------------------------------------------------------------- encoding


def chat_messages(row: Mapping[str, Any], multimodal: bool) -> list[dict[str, Any]]:
    """A :mod:`dmo.groundtruth.data_mix` row (sharegpt ``messages``, ``<image>`` placeholders) in chat format."""
    from dmo.groundtruth.pools import IMAGE_PLACEHOLDER

    out = []
    for m in row["messages"]:
        text = m["content"]
        if not multimodal or m["role"] == "assistant":
            out.append({"role": m["role"], "content": text})
            continue
        parts: list[dict[str, Any]] = []
        for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


class ConversationEncoder:
    """Token ids and labels of a conversation as SFT sees it, with the base's processor and chat template.

    The template renders the turns; the text before each assistant turn is encoded with the processor (which
    expands the image placeholders and encodes the images), each assistant turn (up to and including its end token,
    without the whitespace after it) with the tokenizer, and its tokens are the labels. For a Qwen2-VL template
    this is exactly :class:`dmo.tinyworld.train.Encoder`'s ``prompt + answer + <|im_end|>``.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.multimodal = hasattr(processor, "image_processor")
        self.image_token = getattr(processor, "image_token", None) if self.multimodal else None

    def segments(self, messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
        """``(text, is_answer)`` pieces whose concatenation is the rendered conversation (less trailing space)."""
        render = self.processor.apply_chat_template
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render(list(messages[:i]), add_generation_prompt=True, tokenize=False)
            full = render(list(messages[: i + 1]), tokenize=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DmoError(
                    "the base's chat template does not render a conversation as prompt + answer (each turn's text is "
                    "not a prefix of the next): dmo cannot find the answer tokens"
                )
            answer = full[len(prompt) :].rstrip()
            out += [(prompt[len(done) :], False), (answer, True)]
            done = prompt + answer
        if not out:
            raise DmoError("a conversation without an assistant turn has no answer tokens")
        return out

    def encode(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Model inputs (batch of one) with ``labels`` (-100 outside the answers) for one data row."""
        import torch
        from PIL import Image

        paths = list(row.get("images") or [])
        if paths and not self.multimodal:
            raise DmoError("the data has images but the base model's processor has no image processor")
        images = []
        for p in paths:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        ids: list[Any] = []
        labels: list[Any] = []
        aligned: list[dict[str, Any]] = []
        other: dict[str, list[Any]] = {}
        used = 0
        for text, answer in self.segments(chat_messages(row, self.multimodal)):
            n = text.count(self.image_token) if self.image_token else 0
            if n:
                out = self.processor(
                    text=[text], images=images[used : used + n], return_tensors="pt", add_special_tokens=False
                )
                used += n
                seg = out["input_ids"][0]
                per: dict[str, Any] = {}
                for key, value in out.items():
                    if key == "input_ids" or not isinstance(value, torch.Tensor):
                        continue
                    if value.dim() == 2 and tuple(value.shape) == (1, seg.numel()):
                        per[key] = value[0]
                    else:
                        other.setdefault(key, []).append(value)
                aligned.append(per)
            else:
                seg = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
                aligned.append({})
            ids.append(seg)
            labels.append(seg.clone() if answer else torch.full_like(seg, IGNORE))
        if used != len(images):
            raise DmoError(f"a row has {len(images)} image(s) but the chat template placed {used}")
        batch: dict[str, Any] = {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None]}
        keys = {k for per in aligned for k in per} | {"attention_mask"}
        for key in sorted(keys):
            parts = []
            for seg, per in zip(ids, aligned):
                fill = torch.ones_like(seg) if key == "attention_mask" else torch.zeros_like(seg)
                parts.append(per[key].to(seg.dtype) if key in per else fill)
            batch[key] = torch.cat(parts)[None]
        for key, values in other.items():
            batch[key] = torch.cat(values)
        return batch


# ---------------------------------------------------------------------------------------------------- computing


@dataclass(frozen=True)
class FisherStats:
    """One expert's Fisher computation (or the file kept because it existed)."""

    expert: str
    path: Path
    samples: int
    tokens: int
    tensors: int
    numel: int
    seconds: float
    skipped: bool = False

    def summary(self) -> str:
        if self.skipped:
            return f"{self.expert}: kept the existing {self.path} (--overwrite recomputes it)"
        return (
            f"{self.expert}: {self.samples} samples, {self.tokens} answer tokens, {self.tensors} tensors "
            f"({self.numel * 4 / 1e9:.2f} GB) in {self.seconds:.1f} s -> {self.path}"
        )


def fisher_params(base: str | os.PathLike[str], experts: Mapping[str, str | os.PathLike[str]]) -> list[str]:
    """Base checkpoint names of the floating-point tensors that need Fisher weights, in the base's file order.

    Those any of ``experts`` changes; with a full fine-tune among them, also every tensor the dense merge of full
    experts merges by default (:data:`dmo.merge.stream.PAPER_EXCLUDE` ``["full"]``: all but the vision blocks and
    patch embedding, as the paper's ``params_set: full``), since that merge reads every such tensor of every expert.
    """
    from dmo.merge.checkpoint import Checkpoint
    from dmo.merge.experts import ParamFilter, close_experts, open_experts
    from dmo.merge.live import changed_tensors

    names: set[str] = set()
    with Checkpoint.open(base, what="base model") as ckpt:
        opened = open_experts(ckpt, experts, dict.fromkeys(experts, 1.0), False)
        try:
            for e in opened:
                names.update(e.modules, e.extra)
                if e.checkpoint is not None:
                    names.update(n for n, _ in changed_tensors(e.checkpoint, ckpt))
                    names.update(filter(ParamFilter("full"), ckpt.tensors))
        finally:
            close_experts(opened)
        return [n for n in ckpt.tensors if n in names and ckpt.tensors[n].dtype.is_floating_point]


def load_base(base: Path, device: Any, dtype: Any, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The base model (eval mode, no parameter requiring gradients) and its processor, from a local folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # dmo draws its own bar
    kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(base, **kwargs)
        try:
            model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, **kwargs)
        except ValueError:  # a text-only model
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise DmoError(f"cannot load the base model from {base}: {str(exc).splitlines()[0]}") from exc
    model = model.to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
    return model, processor


def sample_rows(data: str | os.PathLike[str], domain: str, samples: int, seed: int) -> tuple[list[dict], Path]:
    """The first ``samples`` rows of ``domain``'s data in :func:`~dmo.groundtruth.data_mix.domain_order` (or all)."""
    from dmo.groundtruth.data_mix import domain_order
    from dmo.groundtruth.pools import find_sources, read_pool

    source = find_sources(Path(data), [domain])[domain]
    pool = read_pool(source, domain)
    order = domain_order(seed, domain, len(pool))[:samples]
    return [pool.rows[int(i)] for i in order], source


def expert_fisher(
    model: Any,
    params: Mapping[str, Any],
    encoder: ConversationEncoder,
    rows: Sequence[Mapping[str, Any]],
    *,
    target: Target = "labels",
    on_sample: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], int]:
    """``(name -> Fisher tensor (float32, CPU), answer tokens)`` of the model as it is, over ``rows``.

    ``params`` maps output names to the model's parameters to differentiate (they get ``requires_grad``).
    """
    import torch

    if target not in TARGETS:
        raise DmoError(f"unknown Fisher target {target!r}: use {' or '.join(TARGETS)}")
    device = next(iter(params.values())).device
    model_dtype = getattr(model, "dtype", None) or next(iter(params.values())).dtype
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    tokens = 0
    for p in params.values():
        p.requires_grad_(True)
    try:
        for i, row in enumerate(rows):
            batch = encoder.encode(row)
            labels = batch.pop("labels").to(device)
            inputs = {k: v.to(device, model_dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
            for p in params.values():
                p.grad = None
            with torch.enable_grad():
                logits = model(**inputs, use_cache=False).logits[0, :-1]
                gold = labels[0, 1:]
                mask = gold != IGNORE
                n = int(mask.sum())
                if n:
                    logp = torch.log_softmax(logits[mask].float(), dim=-1)
                    y = gold[mask] if target == "labels" else logp.detach().argmax(-1)
                    logp.gather(1, y[:, None]).sum().backward()
            if n:
                for name, p in params.items():
                    if p.grad is not None:  # None: the parameter took no part in this sample (a tower, no image)
                        g = p.grad.float()
                        acc[name].addcmul_(g, g)
                tokens += n
            if on_sample is not None:
                on_sample(i + 1)
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    if tokens == 0:
        raise DmoError("no answer tokens in the samples: the Fisher weights would be 0/0")
    out = {}
    for name, t in acc.items():
        t.div_(tokens)
        if not bool(torch.isfinite(t).all()):
            raise DmoError(f"the Fisher weights of {name} are not finite: the model's gradients overflowed; "
                           "use --dtype float32")  # fmt: skip
        out[name] = t.cpu()
    return out, tokens


def model_params(model: Any, names: Iterable[str]) -> dict[str, Any]:
    """Base checkpoint name -> the live model's parameter (through transformers' renaming). Unlike
    :class:`dmo.merge.live.ModuleWriter`, tied weights are allowed: the checkpoint's one tensor is the shared
    parameter, and its gradient sums both uses."""
    from dmo.merge.dense import resolve_names

    params = dict(model.named_parameters(remove_duplicate=False))
    target = resolve_names(dict.fromkeys(names), params.keys(), None, what=type(model).__name__, model=model)
    return {n: params[t] for n, t in target.items()}


def write_values(params: Mapping[str, Any], named: Iterable[tuple[str, Any]]) -> None:
    """Copy ``(base name, value)`` pairs into the parameters of :func:`model_params`."""
    import torch

    with torch.no_grad():
        for name, value in named:
            params[name].copy_(value)


def write_fisher(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """Write float32 ``tensors`` as one safetensors file, atomically, one tensor in memory at a time."""
    import numpy as np

    from dmo.atomic import atomic_file

    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_file(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for t in tensors.values():
            # no copy: a numpy array is a buffer (numpy's stubs do not say so)
            data = np.ascontiguousarray(t.detach().float().cpu().numpy())
            fh.write(memoryview(data).cast("B"))  # type: ignore[arg-type]


def compute_fisher(
    manifest_file: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    samples: int = DEFAULT_SAMPLES,
    experts: Sequence[str] | None = None,
    device: str | None = None,
    dtype: str = "float32",
    target: Target = "labels",
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> list[FisherStats]:
    """Compute and save the Fisher weights of the manifest's ``experts`` (default all); see the module docstring.

    An expert whose Fisher file exists is kept unless ``overwrite``. Nothing is written to the manifest here:
    :func:`record_in_manifest` does that.
    """
    from dmo.manifest import load_manifest
    from dmo.merge.live import ExpertBank
    from dmo.merge.stream import parse_dtype, resolve_device

    if samples < 1:
        raise DmoError(f"--samples must be at least 1, got {samples}")
    if target not in TARGETS:
        raise DmoError(f"unknown Fisher target {target!r}: use {' or '.join(TARGETS)}")
    manifest = load_manifest(Path(manifest_file))
    if manifest.base.path is None:
        raise DmoError(f"the base model {manifest.base} is a hub id: download it and point the manifest at the folder")
    domains = list(experts) if experts else manifest.domains
    unknown = [d for d in domains if d not in manifest.experts]
    if unknown:
        raise DmoError(f"no expert {unknown[0]!r} in manifest {manifest_file}; its experts: {manifest.domains}")
    folders = {}
    for d, ref in manifest.experts.items():
        if ref.path is None:
            raise DmoError(f"expert {d!r} is the hub id {ref}: download it and point the manifest at the folder")
        folders[d] = Path(ref.path)
    out_paths = {d: fisher_file(manifest, d) for d in domains}
    todo = [d for d in domains if overwrite or not out_paths[d].exists()]
    results = {d: FisherStats(d, out_paths[d], 0, 0, 0, 0, 0.0, skipped=True) for d in domains if d not in todo}
    if not todo:
        return [results[d] for d in domains]
    data_rows = {d: sample_rows(data, d, samples, seed) for d in todo}  # bad data fails before any model loads
    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    base = Path(manifest.base.path)
    names = fisher_params(base, folders)
    if not names:
        raise DmoError(f"the experts of {manifest_file} change no floating-point parameter of the base: nothing to do")
    model, processor = load_base(base, dev, torch_dtype, manifest.trust_remote_code)
    params = model_params(model, names)
    encoder = ConversationEncoder(processor)
    for d in todo:
        start = time.perf_counter()
        rows, source = data_rows[d]
        bank = ExpertBank.open(base, {d: folders[d]}, device=dev)
        write_values(params, bank.merged({d: 1.0}))
        report = None
        if progress is not None:
            report = functools.partial(lambda name, total, done: progress(name, done, total), d, len(rows))
        try:
            fisher, tokens = expert_fisher(model, params, encoder, rows, target=target, on_sample=report)
        finally:
            write_values(params, bank.base())
            del bank
        record = {
            "expert": d, "expert_path": str(folders[d]), "base": str(base), "data": str(source),
            "samples": len(rows), "tokens": tokens, "target": target, "seed": seed, "dtype": str(torch_dtype),
            "definition": "sum over samples of (grad of the sample's summed answer log-likelihood)^2 / answer tokens",
        }  # fmt: skip
        write_fisher(out_paths[d], fisher, {"dmo_fisher": json.dumps(record)})
        numel = sum(t.numel() for t in fisher.values())
        results[d] = FisherStats(d, out_paths[d], len(rows), tokens, len(fisher), numel, time.perf_counter() - start)
        del fisher
    return [results[d] for d in domains]
