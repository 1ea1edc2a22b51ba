"""The ``hf`` scoring backend: one live transformers model per process, proxies switched in place.

The base model is loaded once. Each target (base, expert, trained mixture or merged proxy) is a dense delta
on top of it, written into the live weights for the duration of one lmms-eval run and restored afterwards
(:func:`dmo.merge.dense.applied_delta`), so no merged checkpoint is ever written to disk. LoRA experts are merged
from their factors; full fine-tuned experts (and full trained models) from an :class:`~dmo.merge.live.ExpertBank`
of what they change. Both leave out what a merge keeps at the base value, by ``dmo merge``'s parameter filter.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from dmo.errors import DmoError
from dmo.manifest import ExpertManifest
from dmo.merge.dense import applied_delta
from dmo.merge.experts import ParamFilter, expert_kind, merge_filter
from dmo.merge.inputs import fisher_paths, inputs_id, method_inputs
from dmo.merge.live import ExpertBank
from dmo.merge.lora import LoraAdapter, adapter_to, check_same_base, expert_delta, fingerprint, load_lora, lora_delta
from dmo.merge.names import KeyMap
from dmo.merge.plans import open_input_checkpoint
from dmo.merge.proxy import robust_adapter
from dmo.merge.registry import get_method, merge_deltas
from dmo.scoring.base import Evaluation, ItemEvaluation, Scorer, ScoringContext, Target
from dmo.scoring.evaluate import count_items, evaluate, evaluate_items, refuse_loss_items
from dmo.scoring.lmms_model import DmoLMM, load_pretrained
from dmo.scoring.loss import METRIC as LOSS_METRIC
from dmo.scoring.loss import ValidationLoss, score_of, split_benchmarks
from dmo.scoring.manifest_refs import folder_id, local_base, trained_path
from dmo.scoring.metrics import MetricSpec, own_metrics


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class HFScorer(Scorer):
    name = "hf"

    @classmethod
    def from_context(cls, context: ScoringContext, options: Any) -> HFScorer:
        return cls(
            context.manifest,
            include_path=context.include_path,
            limit=context.limit,
            batch_size=context.batch_size,
            device=context.device,
            metric_map=context.metric_map,
        )

    def __init__(
        self,
        manifest: ExpertManifest,
        include_path: Path | list[Path] | None = None,
        limit: int | None = None,
        batch_size: int = 64,
        device: str = "auto",
        metric_map: Mapping[str, MetricSpec] | None = None,  # a space's own entries over the shipped map
    ) -> None:
        self.base = local_base(manifest)  # a hub model is fetched here (once) or refused in one line
        self.manifest = manifest
        self.include_path = include_path
        self.limit = limit
        self.batch_size = batch_size
        self.device = _device(device)
        self.metric_map = metric_map
        self._trained: dict[Path, LoraAdapter] = {}
        self._inputs: dict[str, dict[str, torch.Tensor]] = {}  # Fisher weights per expert (fisher, fisher_nn)
        self._banks: dict[str, ExpertBank] = {}  # full experts (with or without Fisher inputs), full trained models
        self.loss = ValidationLoss(manifest, limit, batch_size)  # loss:<domain> benchmarks
        self._live: tuple[str, dict[str, torch.Tensor] | None] | None = None  # the last proxy's delta, between stages

    @cached_property
    def lmm(self) -> DmoLMM:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # dmo draws its own bars; a per-load bar would interleave with them
        model, processor = load_pretrained(
            self.base, device=self.device, trust_remote_code=self.manifest.trust_remote_code
        )
        return DmoLMM.from_model(model, processor, batch_size=self.batch_size, name=self.manifest.name)

    @cached_property
    def _names(self) -> KeyMap:
        return KeyMap.for_config(self.base)

    @cached_property
    def experts(self) -> dict[str, LoraAdapter]:
        """The LoRA experts without what a merge keeps at the base (empty for a manifest of full experts)."""
        if self.manifest.kind != "lora":
            return {}
        keep = merge_filter(self.base, "lora")
        out = {}
        for domain in self.manifest.experts:
            out[domain] = self._on_device(keep.adapter(load_lora(self._expert_path(domain), names=self._names)))
        check_same_base(list(out.items()), self.manifest.base.identity)
        return out

    def _expert_path(self, domain: str) -> Path:
        return self.manifest.experts[domain].local(f"expert {domain!r}")

    def _bank(self, key: str, experts: dict[str, Path], **options: Any) -> ExpertBank:
        if key not in self._banks:
            self._banks[key] = ExpertBank.open(self.base, experts, device=self.device, **options)
        return self._banks[key]

    def _full_delta(self, target: Target) -> dict[str, torch.Tensor] | None:
        """The delta of a target of full checkpoints (full experts, or a full trained model), else None."""
        if target.kind == "trained":
            path = trained_path(self.manifest, target)
            if expert_kind(path) != "full":
                return None
            bank = self._bank(f"trained:{path}", {"trained": path}, exclude=[])  # scored as trained, not merged
            return dict(bank.deltas({"trained": 1.0}))
        if self.manifest.kind != "full":
            return None
        experts = {d: self._expert_path(d) for d in self.manifest.experts}
        if target.kind == "expert":
            assert target.domain is not None
            return dict(self._bank("experts", experts).deltas({target.domain: 1.0}))
        assert target.mixture is not None
        method = target.method or "linear"
        weights = {d: w for d, w in target.mixture.as_dict().items() if w != 0}
        inputs = method_inputs(self.manifest, self.manifest.domains, method)
        bank = self._bank("experts:inputs", experts, extra=inputs) if inputs else self._bank("experts", experts)
        return dict(bank.deltas(weights, method, dict(target.params)))

    def _on_device(self, adapter: LoraAdapter) -> LoraAdapter:
        # each proxy's delta is then computed on the model's device: for a 2B model a GPU does it ~25x faster
        # than 2 CPU cores (benchmarks/engine_reuse.py)
        return adapter if self.device == "cpu" else adapter_to(adapter, self.device)

    def _adapter(self, path: Path) -> LoraAdapter:
        if path not in self._trained:
            self._trained[path] = self._on_device(load_lora(path, names=self._names))
        return self._trained[path]

    def _parts(self, target: Target) -> tuple[dict[str, LoraAdapter], dict[str, float]]:
        if target.kind == "expert":
            assert target.domain is not None
            return {target.domain: self.experts[target.domain]}, {target.domain: 1.0}
        if target.kind == "trained":
            return {"trained": self._adapter(trained_path(self.manifest, target))}, {"trained": 1.0}
        if target.kind == "proxy":
            assert target.mixture is not None
            weights = {d: w for d, w in target.mixture.as_dict().items() if w != 0}
            missing = [d for d in weights if d not in self.experts]
            if missing:
                raise DmoError(f"no expert for domain {missing[0]!r} in manifest {self.manifest.name!r}")
            return {d: self.experts[d] for d in weights}, weights
        return {}, {}

    def check(self, benchmarks: Sequence[str]) -> None:
        """Fail before a study opens, not at its first trial: unusable experts, unknown benchmarks."""
        from dmo.scoring.evaluate import check_benchmarks

        self.experts  # noqa: B018 - loads and validates every expert adapter
        check_benchmarks(benchmarks, self.metric_map, self.include_path, self.loss)

    def benchmark_settings(self, benchmark: str) -> dict[str, Any]:
        return self.loss.cache_settings(benchmark)

    def fingerprint(self, target: Target) -> str:
        if target.kind == "base":
            return f"base:{folder_id(self.base)}"
        method, params = target.method or "linear", dict(target.params)
        if self._is_full(target):
            path = trained_path(self.manifest, target) if target.kind == "trained" else None
            weights = self._full_weights(target)
            ids = (
                [folder_id(path)] if path else sorted((folder_id(self._expert_path(d)), w) for d, w in weights.items())
            )
            payload = repr((target.kind, method, sorted(params.items()), ids))
            fp = f"{folder_id(self.base)}:full:{hashlib.sha256(payload.encode()).hexdigest()}"
        else:
            adapters, weights = self._parts(target)
            fp = f"{folder_id(self.base)}:{fingerprint(adapters, weights, method, params)}"
        if target.kind == "proxy":  # a recomputed Fisher file is another proxy
            inputs = inputs_id(method_inputs(self.manifest, weights, method))
            fp += f":{inputs}" if inputs else ""
        if target.kind != "trained":  # experts and proxies are filtered (trained models are scored as they are)
            fp += f":f{ParamFilter(self.manifest.kind).id()}"
        return fp

    def _is_full(self, target: Target) -> bool:
        if target.kind == "trained":
            return expert_kind(trained_path(self.manifest, target)) == "full"
        return self.manifest.kind == "full"

    @staticmethod
    def _full_weights(target: Target) -> dict[str, float]:
        if target.kind == "expert":
            assert target.domain is not None
            return {target.domain: 1.0}
        if target.kind == "proxy":
            assert target.mixture is not None
            return {d: w for d, w in target.mixture.as_dict().items() if w != 0}
        return {}

    def _fisher(self, domain: str) -> dict[str, torch.Tensor]:
        """Expert ``domain``'s Fisher weights by live parameter name, memory-mapped (read when a merge touches them)."""
        if domain not in self._inputs:
            (path,) = fisher_paths(self.manifest, [domain]).values()
            ckpt = open_input_checkpoint(path, f"the fisher weights of expert {domain!r}")
            self._inputs[domain] = {self._names(n): ckpt.view(n) for n in ckpt.tensors}
        return self._inputs[domain]

    def settings(self) -> dict[str, Any]:
        import lmms_eval

        return {
            "backend": self.name,
            "limit": self.limit,
            "lmms_eval": getattr(lmms_eval, "__version__", "?"),
            "generation": "greedy",
            **own_metrics(self.metric_map),
        }

    def _delta(self, target: Target) -> dict[str, torch.Tensor] | None:
        if target.kind != "base" and self._is_full(target):
            return self._full_delta(target)
        adapters, weights = self._parts(target)
        if not adapters:
            return None
        spec = get_method(target.method or "linear")
        params = spec.check_params(dict(target.params))
        if spec.lora_exact or target.kind != "proxy":
            coef = spec.linear_coefficients(weights, params) if target.kind == "proxy" else weights
            assert coef is not None  # lora_exact methods have linear coefficients
            if len(adapters) == 1:
                ((name, adapter),) = adapters.items()
                return {k: v.mul_(coef[name]) for k, v in expert_delta(adapter).items()}
            return lora_delta(adapters, coef)
        if spec.inputs == "lora":
            return expert_delta(robust_adapter(adapters, weights, spec.fn, params))
        names = list(adapters)
        deltas = [expert_delta(adapters[n]) for n in names]
        extra = None
        if spec.extra:  # fisher, fisher_nn: each expert's Fisher file (a missing one is refused in one line)
            method_inputs(self.manifest, names, spec.name)
            extra = {"fisher": [self._fisher(n) for n in names]}
        return merge_deltas(spec.name, deltas, [weights[n] for n in names], extra=extra, **params)

    def evaluate(self, target: Target, benchmarks: Sequence[str]) -> Evaluation:
        tasks, losses = split_benchmarks(benchmarks)
        lmm = self.lmm
        lmm.set_proxy(self._delta(target), self.fingerprint(target))
        try:
            result = self._evaluate_tasks(lmm, tasks) if tasks else Evaluation({})
            if losses:
                result.metrics.update(dict.fromkeys(losses, LOSS_METRIC))
                try:
                    with self._weights(lmm):
                        found = self.loss.hf_losses(lmm.model, lmm.processor, losses)
                    result.scores.update({b: score_of(v) for b, v in found.items()})
                except DmoError:
                    raise
                except Exception as exc:  # recorded as failed rows, with the reason; the task scores still count
                    result.errors.update(
                        dict.fromkeys(losses, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    )
            return result
        finally:
            lmm.clear_proxy()

    def item_count(self, benchmark: str) -> int:
        refuse_loss_items(benchmark)
        return count_items(benchmark, self.include_path, self.limit)

    def evaluate_items(self, target: Target, items: Mapping[str, Sequence[int]]) -> ItemEvaluation:
        for b in items:
            refuse_loss_items(b)
        fp = self.fingerprint(target)
        if self._live is None or self._live[0] != fp:  # a proxy's next stage reuses its merged delta
            self._live = None
            self._live = (fp, self._delta(target))
        lmm = self.lmm
        lmm.set_proxy(self._live[1], fp)
        try:
            return ItemEvaluation(evaluate_items(lmm, items, self.include_path, self.limit, metric_map=self.metric_map))
        except DmoError:
            raise
        except Exception as exc:  # recorded as failed rows, with the reason
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return ItemEvaluation({}, errors=dict.fromkeys(items, why))
        finally:
            lmm.clear_proxy()

    @staticmethod
    def _weights(lmm: DmoLMM) -> contextlib.AbstractContextManager:
        """The live model holding the current proxy's weights (the base when it has no delta)."""
        delta = lmm.proxy.delta
        return contextlib.nullcontext() if delta is None else applied_delta(lmm.model, delta)

    def _evaluate_tasks(self, lmm: DmoLMM, benchmarks: Sequence[str]) -> Evaluation:
        try:
            return Evaluation(evaluate(lmm, benchmarks, self.include_path, self.limit, metric_map=self.metric_map))
        except DmoError:
            raise
        except Exception:  # one benchmark broke the joint run: score them one by one to keep the others
            if len(benchmarks) == 1:
                raise
        scores, errors = {}, {}
        for b in benchmarks:
            try:
                scores.update(evaluate(lmm, [b], self.include_path, self.limit, metric_map=self.metric_map))
            except Exception as exc:  # recorded as a failed row, with the reason
                errors[b] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return Evaluation(scores, errors=errors)
