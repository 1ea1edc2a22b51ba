"""dmo's vLLM worker extension: merged proxies written into the live engine's weights.

vLLM mixes this class into each GPU worker when the engine is built with
``worker_extension_cls="dmo.scoring.vllm_worker.DmoWorkerExtension"``; the engine's public
``LLM.collective_rpc("dmo_...")`` then runs these methods inside every worker. Each worker keeps an
:class:`~dmo.merge.live.ExpertBank` of the experts on its own GPU and, per proxy, merges there and hands
``(checkpoint name, value)`` pairs to the model's own ``load_weights``, which knows the model's packed layouts
(q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) and tensor-parallel sharding.

The caller must reset the engine's prefix cache (and its multimodal caches) after every write: KV blocks cached
under the previous weights would otherwise answer for the new proxy. :class:`dmo.scoring.vllm_backend.VLLMScorer`
does. Method names start with ``dmo_`` because vLLM refuses an extension whose names clash with the worker's.
This module imports nothing from vLLM, so it can be imported (and tested) without it.
"""

from __future__ import annotations

from typing import Any

import torch

from dmo.errors import DmoError
from dmo.merge.live import ExpertBank, load_into


class DmoWorkerExtension:
    """Methods vLLM adds to its worker; ``self`` is the worker (``get_model()`` is its public accessor)."""

    _dmo_banks: dict[str, ExpertBank]

    def _dmo_model(self) -> torch.nn.Module:
        return self.get_model()  # type: ignore[attr-defined]

    def _dmo_bank(self, key: str) -> ExpertBank:
        bank = getattr(self, "_dmo_banks", {}).get(key)
        if bank is None:
            raise DmoError(f"no expert bank {key!r} is open in this worker: call dmo_open_bank first")
        return bank

    def dmo_open_bank(
        self, key: str, base: str, experts: dict[str, str], store: str = "device", allow_bin: bool = False
    ) -> dict[str, Any]:
        """Read ``experts`` (against the base checkpoint ``base``) onto this worker's device, under ``key``."""
        if not hasattr(self, "_dmo_banks"):
            self._dmo_banks = {}
        device = next(self._dmo_model().parameters()).device
        bank = ExpertBank.open(base, experts, device=device, store=store, allow_bin=allow_bin)  # type: ignore[arg-type]
        self._dmo_banks[key] = bank
        return {"parameters": len(bank.names), "bytes": bank.nbytes, "device": str(device)}

    def dmo_close_bank(self, key: str) -> None:
        getattr(self, "_dmo_banks", {}).pop(key, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def dmo_write(self, key: str, weights: dict[str, float], method: str, params: dict[str, Any]) -> int:
        """Write base + merge(``weights``, ``method``, ``params``) into the live model; returns tensors written."""
        bank = self._dmo_bank(key)
        with torch.no_grad():
            count = load_into(self._dmo_model().load_weights, bank.merged(weights, method, params))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return count

    def dmo_write_base(self, key: str) -> int:
        """Write the base values of everything bank ``key`` can change back into the live model."""
        bank = self._dmo_bank(key)
        with torch.no_grad():
            count = load_into(self._dmo_model().load_weights, bank.base())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return count
