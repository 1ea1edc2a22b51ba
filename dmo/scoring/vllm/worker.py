"""dmo's vLLM worker extension: merged proxies written into the live engine's weights.

vLLM mixes this class into each worker when the engine is built with
``worker_extension_cls="dmo.scoring.vllm.worker.DmoWorkerExtension"``; the engine's public
``LLM.collective_rpc("dmo_...")`` then runs these methods inside every worker. Each worker keeps an
:class:`~dmo.merge.live.ExpertBank` of the experts on its own device and, per proxy, merges there and feeds
``(checkpoint name, value)`` pairs to the worker's own in-place reload (``Worker.reload_weights(weights_iterator=...)``,
no disk). A plain ``model.load_weights`` is not enough: on a CPU, vLLM repacks each linear weight for oneDNN after
loading and leaves an empty parameter behind, so a second plain load has nowhere to write; the reload puts each
layer back in checkpoint form, loads it and runs the same post-processing again, on CPU and GPU alike.

The reload processes a vLLM layer once every tensor of it has arrived, and a layer only partly fed would be
processed with garbage in the missing part. vLLM packs several checkpoint modules into one layer (q/k/v into
``qkv_proj``, gate/up into ``gate_up_proj``: the model's ``packed_modules_mapping``), so a write also feeds the base
values of the *companions* of what the bank changes (``k_proj`` when only ``q_proj`` and ``v_proj`` are adapted,
every bias of those modules), read once from the base checkpoint.

The reload resets the worker's encoder and multimodal caches; the caller must also reset the engine's prefix cache,
its multimodal cache and its encoder-cache bookkeeping (``LLM.reset_prefix_cache``, ``LLM.reset_mm_cache``,
``LLM.llm_engine.reset_encoder_cache``): :class:`dmo.scoring.vllm.backend.VLLMScorer` does. Method names start with
``dmo_`` because vLLM refuses an extension whose names clash with the worker's. This module imports nothing from
vLLM, so it can be imported (and tested) without it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from dmo.errors import DmoError
from dmo.merge.checkpoint import Checkpoint
from dmo.merge.live import ExpertBank, Store


def packed_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """Which checkpoint modules vLLM packs into one layer: the model's own ``packed_modules_mapping``, else the union
    of its direct children's (as vLLM reads it: a multimodal model such as Qwen2-VL declares none itself, its
    language model does). Reading only the model's own attribute found nothing there, so a write of ``q_proj`` and
    ``v_proj`` fed the packed ``qkv_proj`` without ``k_proj``, and vLLM processed it with uninitialised memory in that
    part: wrong answers, at times NaN logits."""
    own = dict(getattr(model, "packed_modules_mapping", None) or {})
    if own:
        return own
    for child in model.children():
        for packed, members in dict(getattr(child, "packed_modules_mapping", None) or {}).items():
            if own.get(packed, members) != members:
                raise DmoError(f"{type(child).__name__} packs {packed} from {members}, another part from {own[packed]}")
            own[packed] = list(members)
    return own


def companions(changed: Iterable[str], available: Iterable[str], packed: Mapping[str, list[str]]) -> list[str]:
    """Checkpoint tensors outside ``changed`` that share a serving-engine layer with something in ``changed``.

    A tensor's module is its name less the last part (``weight``, ``bias``); modules named in one group of
    ``packed`` (``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``) under the same parent form one layer.
    """
    group_of = {member: tuple(members) for members in packed.values() for member in members}
    changed = set(changed)
    layers: set[str] = set()
    for name in changed:
        module = name.rpartition(".")[0]
        parent, _, leaf = module.rpartition(".")
        layers.update(f"{parent}.{m}" if parent else m for m in group_of.get(leaf, (leaf,)))
    return [n for n in available if n not in changed and n.rpartition(".")[0] in layers]


class DmoWorkerExtension:
    """Methods vLLM adds to its worker; ``self`` is the worker (``get_model()``, ``reload_weights()`` are public)."""

    _dmo_banks: dict[str, tuple[ExpertBank, dict[str, torch.Tensor]]]

    def _dmo_model(self) -> torch.nn.Module:
        return self.get_model()  # type: ignore[attr-defined]

    def _dmo_bank(self, key: str) -> tuple[ExpertBank, dict[str, torch.Tensor]]:
        entry = getattr(self, "_dmo_banks", {}).get(key)
        if entry is None:
            raise DmoError(f"no expert bank {key!r} is open in this worker: call dmo_open_bank first")
        return entry

    def dmo_open_bank(
        self,
        key: str,
        base: str,
        experts: dict[str, str],
        store: Store = "device",
        allow_bin: bool = False,
        inputs: dict[str, dict[str, str]] | None = None,
        exclude: list[str] | None = None,
    ) -> dict[str, Any]:
        """Read ``experts`` (against the base checkpoint ``base``) onto this worker's device, under ``key``.

        ``inputs``: per-expert inputs of the merge methods that need them, ``{"fisher": {expert: file}}``.
        ``exclude``: what a merge keeps at the base value, as ``dmo merge``'s (default: the paper's filter; ``[]``
        keeps every change, for a trained model).
        """
        if not hasattr(self, "_dmo_banks"):
            self._dmo_banks = {}
        model = self._dmo_model()
        device = next(model.parameters()).device
        bank = ExpertBank.open(
            base,
            experts,
            device=device,
            store=store,
            allow_bin=allow_bin,
            extra=inputs,
            exclude=exclude,
        )
        packed = packed_modules(model)
        with Checkpoint.open(base, what="base model", allow_bin=allow_bin) as ckpt:
            extra = {n: ckpt.view(n).to(device, copy=True) for n in companions(bank.names, ckpt.tensors, packed)}
        self._dmo_banks[key] = (bank, extra)
        return {"parameters": len(bank.names), "companions": len(extra), "bytes": bank.nbytes, "device": str(device)}

    def dmo_close_bank(self, key: str) -> None:
        getattr(self, "_dmo_banks", {}).pop(key, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _dmo_reload(self, named: Iterator[tuple[str, torch.Tensor]], extra: dict[str, torch.Tensor]) -> int:
        with torch.no_grad():  # around the whole generator's life: it switches grad mode off while it runs
            return self._dmo_reload_all(named, extra)

    def _dmo_reload_all(self, named: Iterator[tuple[str, torch.Tensor]], extra: dict[str, torch.Tensor]) -> int:
        # The first value is computed before the reload starts: a merge that refuses its inputs (most do so on
        # their first parameter) then fails with the model untouched.
        first = next(named, None)
        count = 0

        def feed() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in itertools.chain([first] if first is not None else [], named):
                count += 1
                yield item
            yield from extra.items()

        try:
            self.reload_weights(weights_iterator=feed())  # type: ignore[attr-defined]
        except BaseException:
            # Half a reload leaves layers unprocessed: reload the engine's own checkpoint (the base), so the
            # engine is whole again whatever the caller writes next.
            self.reload_weights()  # type: ignore[attr-defined]
            raise
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return count

    def dmo_write(self, key: str, weights: dict[str, float], method: str, params: dict[str, Any]) -> int:
        """Write base + merge(``weights``, ``method``, ``params``) into the live model; returns tensors written."""
        bank, extra = self._dmo_bank(key)
        return self._dmo_reload(bank.merged(weights, method, params), extra)

    def dmo_write_base(self, key: str) -> int:
        """Write the base values of everything bank ``key`` can change back into the live model."""
        bank, extra = self._dmo_bank(key)
        return self._dmo_reload(bank.base(), extra)
