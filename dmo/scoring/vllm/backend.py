"""The ``vllm`` scoring backend: one live vLLM engine per worker process, proxies switched without a restart.

The base model is loaded once. A target reaches the engine in one of two ways:

* **adapter**: the exact linear proxy of LoRA experts (their concatenated adapter, rank = sum of the experts'
  ranks), RobustMerge's merged adapter, one LoRA expert, or a LoRA-trained mixture, served through vLLM's
  multi-LoRA support: one ``LoRARequest`` per proxy, so switching costs an adapter load and several proxies can
  be in flight together (:meth:`VLLMScorer.evaluate_many`);
* **write**: every other proxy (full experts, TIES, DARE, a full trained model) is merged on the GPU by dmo's
  worker extension (:mod:`dmo.scoring.vllm.worker`) from expert tensors read once, and written into the live
  weights through the model's own ``load_weights``. After every write the engine's prefix cache and multimodal
  caches are reset, so no KV computed under the previous proxy answers for the new one.

Nothing here reaches into private engine attributes: the engine is driven through ``LLM.generate``,
``LLM.collective_rpc``, ``LLM.reset_prefix_cache`` and ``LLM.reset_mm_cache``. An engine that dies is rebuilt
once per target, and the target retried; a second death is reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from dmo.errors import DmoError
from dmo.manifest import ExpertManifest
from dmo.merge.experts import ParamFilter, expert_kind, merge_filter
from dmo.merge.families import check_family
from dmo.merge.inputs import inputs_id, method_inputs
from dmo.merge.lora import LoraAdapter, check_same_base, fingerprint, load_lora, write_adapter
from dmo.merge.proxy import VLLM_MAX_LORA_RANK, adapter_proxy
from dmo.merge.registry import get_method
from dmo.paths import cache_dir
from dmo.scoring.backends import VLLMOptions
from dmo.scoring.base import Evaluation, ItemEvaluation, Scorer, ScoringContext, Target
from dmo.scoring.loss import METRIC as LOSS_METRIC
from dmo.scoring.loss import ValidationLoss, score_of, split_benchmarks
from dmo.scoring.manifest_refs import folder_id, local_base, trained_path
from dmo.scoring.metrics import MetricSpec, own_metrics
from dmo.scoring.vllm.engine import (
    adapter_rank,
    engine_kwargs,
    on_cpu,
    one_line,
    require_vllm,
)

log = logging.getLogger(__name__)

Route = Literal["base", "adapter", "write"]


def _servable(adapter: LoraAdapter) -> bool:
    """vLLM serves LoRA on the language model only (the tower/connector option is GPU-only and partial): an
    adapter of the vision tower or projector would be served with those modules silently dropped."""
    return not any("visual" in p or "vision" in p or "projector" in p for p in adapter.modules)


def _shutdown(llm: Any) -> None:
    """Stop an engine's processes: ``LLM`` has no close of its own; its engine client has."""
    shutdown = getattr(llm, "shutdown", None)
    if not callable(shutdown):
        shutdown = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
    if callable(shutdown):
        shutdown()


def _is_engine_death(exc: BaseException) -> bool:
    # vllm.v1.engine.exceptions.EngineDeadError, matched by name so that this module need not import vLLM
    return any(type(e).__name__ == "EngineDeadError" for e in (exc, exc.__cause__, exc.__context__) if e is not None)


class VLLMScorer(Scorer):
    name = "vllm"

    @classmethod
    def from_context(cls, context: ScoringContext, options: VLLMOptions) -> VLLMScorer:
        # the context's batch size and device are the in-process backends': vLLM schedules its own batches on the
        # device it finds
        return cls(
            context.manifest,
            context.include_path,
            context.limit,
            metric_map=context.metric_map,
            **options.model_dump(),
        )

    def __init__(
        self,
        manifest: ExpertManifest,
        include_path: Path | list[Path] | None = None,
        limit: int | None = None,
        *,
        lora: bool | None = None,
        max_lora_rank: int | None = None,
        max_loras: int = 4,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        store: Literal["device", "host"] = "device",
        adapter_dir: Path | None = None,
        engine: dict[str, Any] | None = None,
        llm_factory: Callable[..., Any] | None = None,
        metric_map: Mapping[str, MetricSpec] | None = None,
    ) -> None:
        self.base = local_base(manifest)  # a hub model is fetched here (once) or refused in one line
        # which adapters vLLM can serve depends on where the family keeps its vision tower and projector
        check_family(self.base)
        self.manifest = manifest
        self.include_path = include_path
        self.limit = limit
        # None: by platform. vLLM's CPU LoRA kernels made generation ~6x slower than the same proxy written dense
        # (benchmarks/engine_reuse_vllm.py: 5.5 s against 0.9 s per tiny-world proxy), so a CPU engine writes every
        # proxy; a GPU engine serves exact linear proxies as adapters, several in one batch.
        self.lora = (not on_cpu()) if lora is None else lora
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.store = store
        self.adapter_dir = Path(adapter_dir) if adapter_dir else cache_dir() / "adapters"
        self.engine_extra = dict(engine or {})
        self.metric_map = metric_map
        self._factory = llm_factory
        self._written: str | None = None  # fingerprint of the proxy written into the live weights, if any
        self._written_bank: str | None = None  # and the bank it came from
        self._banks: set[str] = set()
        self.served_rank: int | None = None  # the engine's max_lora_rank, once it is built
        self.loss = ValidationLoss(manifest, limit)  # loss:<domain> benchmarks, from the engine's prompt logprobs
        self.processor: Any = None  # the base's processor, loaded with the engine
        self.restarts = 0

    # ------------------------------------------------------------------------------------------------ experts

    @cached_property
    def _lora_experts(self) -> dict[str, LoraAdapter]:
        """The LoRA experts, keyed by domain (empty for a manifest of full experts)."""
        if self.manifest.kind != "lora":
            return {}
        # what a merge keeps at the base is dropped here, as dmo merge does: both routes serve the same proxy
        keep = merge_filter(self.base, "lora")
        out = {d: keep.adapter(load_lora(self._path(ref, f"expert {d!r}"))) for d, ref in self.manifest.experts.items()}
        check_same_base(list(out.items()), self.manifest.base.identity)
        return out

    def _path(self, ref: Any, what: str) -> Path:
        return Path(ref.local(what))

    def _rank_needed(self) -> int:
        """The rank of the largest adapter this study can serve: all experts' ranks summed, per module."""
        per_param: dict[str, int] = {}
        if self._experts_servable:
            for adapter in self._lora_experts.values():
                for param, m in adapter.modules.items():
                    per_param[param] = per_param.get(param, 0) + m.rank
        # local trained models only: a study needs no trained model, so none is fetched from the hub for this; one
        # fetched later whose rank the engine cannot serve is written into the weights instead (route)
        local = self.manifest.model_copy(update={"trained": [t for t in self.manifest.trained if t.path is not None]})
        for _, _, ref in local.trained_mixtures():
            if ref.path is not None and expert_kind(ref.path) == "lora" and _servable(load_lora(Path(ref.path))):
                per_param["trained"] = max(per_param.get("trained", 0), adapter_rank(Path(ref.path)))
        return max(per_param.values(), default=0)

    @cached_property
    def _experts_servable(self) -> bool:
        """Whether the LoRA experts (and so their linear proxies) can be served as vLLM adapters exactly."""
        touching = [d for d, a in self._lora_experts.items() if not _servable(a)]
        if touching:
            log.info("expert %r adapts the vision tower or projector, which vLLM's LoRA serving leaves out: its "
                     "proxies are written as merged weights instead", touching[0])  # fmt: skip
        return bool(self._lora_experts) and not touching

    # ------------------------------------------------------------------------------------------------- engine

    def _engine_kwargs(self) -> dict[str, Any]:
        rank = self._rank_needed() if self.lora else 0
        if rank > VLLM_MAX_LORA_RANK and self.max_lora_rank is None:
            log.warning("proxy adapters reach rank %d > %d: every proxy is written as merged weights", rank,
                        VLLM_MAX_LORA_RANK)  # fmt: skip
            self.lora, rank = False, 0
        return engine_kwargs(
            self.base, lora_rank=rank, max_lora_rank=self.max_lora_rank if self.lora else None,
            max_loras=self.max_loras,
            gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len, dtype=self.dtype,
            trust_remote_code=self.manifest.trust_remote_code, extra=self.engine_extra,
        )  # fmt: skip

    @cached_property
    def lmm(self) -> Any:
        """The lmms-eval model wrapping the live engine (built on first use)."""
        from transformers import AutoProcessor

        from dmo.scoring.vllm.lmms import DmoVLLM

        kwargs = self._engine_kwargs()
        self.served_rank = kwargs.get("max_lora_rank")
        factory = self._factory
        if factory is None:
            from vllm import LLM

            factory = LLM
        llm = factory(**kwargs)
        processor = AutoProcessor.from_pretrained(
            self.base, local_files_only=True, trust_remote_code=self.manifest.trust_remote_code
        )
        self._written, self._written_bank, self._banks = None, None, set()
        self.processor = processor
        return DmoVLLM(llm=llm, processor=processor, name=self.manifest.name)

    @cached_property
    def _experts_bank(self) -> str:
        """The worker's key for this manifest's experts (an engine may serve more than one manifest's)."""
        refs = sorted((d, str(r.path)) for d, r in self.manifest.experts.items())
        return "experts:" + hashlib.sha256(repr((str(self.base), refs)).encode()).hexdigest()[:16]

    @property
    def max_batch(self) -> int:
        """Targets scored in one call: adapter-served proxies go to the engine together, up to ``max_loras``."""
        return self.max_loras

    @property
    def default_batch(self) -> int:
        """``dmo study`` without ``--batch``: as many trials at once as the engine serves adapters together; one
        when proxies are written (a write holds the engine's weights for one proxy at a time)."""
        return self.max_loras if self.lora else 1

    def close(self) -> None:
        """Shut the engine down (its processes and memory); the next target starts a new one."""
        old = self.__dict__.pop("lmm", None)
        if old is not None:
            _shutdown(old.llm)

    def _restart(self) -> None:
        self.restarts += 1
        old = self.__dict__.pop("lmm", None)
        if old is not None:
            with contextlib.suppress(Exception):  # the engine is already dead; release what is left of it
                _shutdown(old.llm)

    def check(self, benchmarks: Sequence[str]) -> None:
        """Fail before a study opens: unusable experts, unknown benchmarks, an adapter rank vLLM cannot serve."""
        from dmo.scoring.evaluate import check_benchmarks

        require_vllm()
        self._lora_experts  # noqa: B018 - loads and validates every LoRA expert
        self._engine_kwargs()  # refuses an adapter rank over max_lora_rank
        check_benchmarks(benchmarks, self.metric_map, self.include_path, self.loss)

    def benchmark_settings(self, benchmark: str) -> dict[str, Any]:
        return self.loss.cache_settings(benchmark)

    # ------------------------------------------------------------------------------------------------ targets

    def _weights(self, target: Target) -> dict[str, float]:
        """An expert's or a proxy's coefficient per domain."""
        if target.kind == "expert":
            assert target.domain is not None
            return {target.domain: 1.0}
        assert target.mixture is not None
        weights = {d: w for d, w in target.mixture.as_dict().items() if w != 0}
        missing = [d for d in weights if d not in self.manifest.experts]
        if missing:
            raise DmoError(f"no expert for domain {missing[0]!r} in manifest {self.manifest.name!r}")
        return weights

    def route(self, target: Target) -> Route:
        if target.kind == "base":
            return "base"
        if target.kind == "trained":
            path = trained_path(self.manifest, target)
            lora = self.lora and expert_kind(path) == "lora" and _servable(load_lora(path))
            too_wide = lora and self.served_rank is not None and adapter_rank(path) > self.served_rank
            return "adapter" if lora and not too_wide else "write"
        if not self.lora or self.manifest.kind != "lora" or not self._experts_servable:
            return "write"
        if target.kind == "expert":
            return "adapter"
        spec = get_method(target.method or "linear")
        return "adapter" if spec.lora_exact or spec.inputs == "lora" else "write"

    def fingerprint(self, target: Target) -> str:
        base = folder_id(self.base)
        if target.kind == "base":
            return f"base:{base}"
        if target.kind == "trained":
            return f"{base}:trained:{folder_id(trained_path(self.manifest, target))}"
        method = target.method or "linear"
        weights = self._weights(target)
        inputs = inputs_id(method_inputs(self.manifest, weights, method)) if target.kind == "proxy" else ""
        inputs = f":{inputs}" if inputs else ""  # a recomputed Fisher file is another proxy
        inputs += f":f{ParamFilter(self.manifest.kind).id()}"  # experts and proxies are merged through the filter
        if self._lora_experts:
            return f"{base}:{fingerprint(self._lora_experts, weights, method, dict(target.params))}{inputs}"
        ids = sorted((folder_id(self._path(self.manifest.experts[d], d)), w) for d, w in weights.items())
        payload = repr((method, sorted(dict(target.params).items()), ids))
        return f"{base}:full:{hashlib.sha256(payload.encode()).hexdigest()}{inputs}"

    def settings(self) -> dict[str, Any]:
        import lmms_eval

        try:
            from importlib.metadata import version

            engine = version("vllm")
        except Exception:  # vLLM not installed: a test engine
            engine = "none"
        return {
            "backend": self.name,
            "limit": self.limit,
            "lmms_eval": getattr(lmms_eval, "__version__", "?"),
            "vllm": engine,
            "generation": "greedy",
            **own_metrics(self.metric_map),
        }

    # ------------------------------------------------------------------------------------------- switching

    def _adapter_request(self, target: Target, fp: str) -> Any:
        """A ``LoRARequest`` for the target's adapter, written once under ``adapter_dir/<fingerprint>``."""
        from vllm.lora.request import LoRARequest

        if target.kind == "trained":
            folder = trained_path(self.manifest, target)
        else:
            folder = self.adapter_dir / hashlib.sha256(fp.encode()).hexdigest()[:24]
            if not (folder / "adapter_config.json").is_file():
                self._write_adapter(target, folder)
        key = hashlib.sha256(f"{fp}:{folder}".encode()).digest()
        int_id = 1 + int.from_bytes(key[:4], "big") % (2**31 - 2)  # stable and unique per adapter (vLLM caches by it)
        return LoRARequest(lora_name=fp[-32:], lora_int_id=int_id, lora_path=str(folder))

    def _write_adapter(self, target: Target, folder: Path) -> None:
        if target.kind == "expert":
            assert target.domain is not None
            adapters, weights = {target.domain: self._lora_experts[target.domain]}, {target.domain: 1.0}
        else:
            weights = self._weights(target)
            adapters = {d: self._lora_experts[d] for d in weights}
        spec = get_method(target.method or "linear")
        config, tensors = adapter_proxy(adapters, weights, spec, spec.check_params(dict(target.params)))
        rank = max(int(t.shape[0]) for k, t in tensors.items() if k.endswith("lora_A.weight"))
        limit = self.served_rank
        if limit is not None and rank > limit:
            raise DmoError(
                f"the proxy adapter for {target.label} has rank {rank} but the engine's max_lora_rank is {limit}: "
                f"raise max_lora_rank to >= {rank} or set lora: false"
            )
        write_adapter(folder, config, tensors, overwrite=True, metadata={"dmo_fingerprint": folder.name})

    def _bank(
        self,
        key: str,
        experts: dict[str, str],
        inputs: Mapping[str, Mapping[str, Path]] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        """Open a bank in the workers; ``exclude=None`` filters as ``dmo merge`` does, ``[]`` keeps every change."""
        if key not in self._banks:
            files = {k: {e: str(f) for e, f in v.items()} for k, v in (inputs or {}).items()}  # plain data for the RPC
            args = (key, str(self.base), experts, self.store, False, files or None, exclude)
            self.lmm.llm.collective_rpc("dmo_open_bank", args=args)
            self._banks.add(key)

    def _write(self, key: str, weights: dict[str, float], method: str, params: dict[str, Any], fp: str) -> None:
        llm = self.lmm.llm
        if self._written != fp:
            if self._written_bank != key:  # a bank writes absolute values of its own parameters only
                self._restore_base(keep=key)
            llm.collective_rpc("dmo_write", args=(key, weights, method, params))
            self._written, self._written_bank = fp, key
            self._reset_caches()

    def _restore_base(self, keep: str | None = None) -> None:
        """Put the base weights back where a written proxy changed them (and drop trained banks)."""
        if self._written is None:
            return
        llm = self.lmm.llm
        for key in sorted(self._banks):
            llm.collective_rpc("dmo_write_base", args=(key,))
            if not key.startswith(self._experts_bank) and key != keep:
                llm.collective_rpc("dmo_close_bank", args=(key,))
        self._banks = {k for k in self._banks if k.startswith(self._experts_bank) or k == keep}
        self._written = self._written_bank = None
        self._reset_caches()

    def _reset_caches(self) -> None:
        llm = self.lmm.llm
        llm.reset_prefix_cache()
        # the vision tower may have changed: cached image embeddings are stale too. The worker's reload already
        # emptied its own encoder cache; the engine's bookkeeping of it must follow, or the next image is
        # scheduled as cached and the engine dies on the miss.
        llm.reset_mm_cache()
        llm.llm_engine.reset_encoder_cache()

    def _switch(self, target: Target) -> tuple[str, Any]:
        """Make the engine answer as ``target``: returns (fingerprint, LoRARequest or None)."""
        self.lmm  # noqa: B018 - the engine first: its max_lora_rank bounds the adapters written below
        fp = self.fingerprint(target)
        route = self.route(target)
        if route == "base":
            self._restore_base()
            return fp, None
        if route == "adapter":
            self._restore_base()
            return fp, self._adapter_request(target, fp)
        if target.kind == "trained":
            path = str(trained_path(self.manifest, target))
            key = f"trained:{path}"
            self._bank(key, {"trained": path}, exclude=[])  # a trained model is scored as trained, not merged
            self._write(key, {"trained": 1.0}, "linear", {}, fp)
            return fp, None
        experts = {d: str(self._path(r, f"expert {d!r}")) for d, r in self.manifest.experts.items()}
        weights = self._weights(target)
        method = target.method or "linear"
        # fisher / fisher_nn: a bank that also holds every expert's Fisher weights, beside the plain one
        inputs = method_inputs(self.manifest, self.manifest.domains, method) if target.kind == "proxy" else {}
        key = f"{self._experts_bank}:inputs" if inputs else self._experts_bank
        self._bank(key, experts, inputs)
        self._write(key, weights, method, dict(target.params), fp)
        return fp, None

    # --------------------------------------------------------------------------------------------- scoring

    def evaluate(self, target: Target, benchmarks: Sequence[str]) -> Evaluation:
        return self.evaluate_many([target], benchmarks)[0]

    def evaluate_many(self, targets: Sequence[Target], benchmarks: Sequence[str]) -> list[Evaluation]:
        """Score several targets; those served as adapters are generated together, in one engine batch."""
        return self._in_groups(
            targets, lambda proxies: self._run(proxies, benchmarks),
            lambda error: Evaluation({}, errors=dict.fromkeys(benchmarks, error)),
        )  # fmt: skip

    def item_count(self, benchmark: str) -> int:
        from dmo.scoring.evaluate import count_items, refuse_loss_items

        refuse_loss_items(benchmark)
        return count_items(benchmark, self.include_path, self.limit)

    def evaluate_items(self, target: Target, items: Mapping[str, Sequence[int]]) -> ItemEvaluation:
        return self.evaluate_items_many([target], items)[0]

    def evaluate_items_many(
        self, targets: Sequence[Target], items: Mapping[str, Sequence[int]]
    ) -> list[ItemEvaluation]:
        """Score several targets on some items; a written proxy stays in the engine until another one is written, so
        its next stage costs no write."""
        from dmo.scoring.evaluate import refuse_loss_items

        for b in items:
            refuse_loss_items(b)
        return self._in_groups(
            targets, lambda proxies: self._run_items(proxies, items),
            lambda error: ItemEvaluation({}, errors=dict.fromkeys(items, error)),
        )  # fmt: skip

    def _in_groups(
        self, targets: Sequence[Target], run: Callable[[list[tuple[str, Any]]], list[Any]], failed: Callable[[str], Any]
    ) -> list[Any]:
        """``run`` over the targets in groups (adapter-served ones together), the engine restarted once if it dies."""
        results: dict[int, Any] = {}
        adapters = [i for i, t in enumerate(targets) if self.route(t) == "adapter"]
        groups = [adapters[k : k + self.max_loras] for k in range(0, len(adapters), self.max_loras)]
        groups += [[i] for i, t in enumerate(targets) if i not in adapters]
        for group in groups:
            for attempt in (1, 2):
                try:
                    proxies = [self._switch(targets[i]) for i in group]
                    evals = run(proxies)
                    break
                except DmoError:
                    raise
                except Exception as exc:
                    if not _is_engine_death(exc):
                        # A write or a generation failed inside a live engine: these targets become failed rows
                        # and the study goes on. What the weights hold now is unknown, so the next write starts
                        # from the base.
                        self._written, self._written_bank = "unknown", None
                        error = one_line(exc)
                        log.warning("scoring %s failed: %s", ", ".join(targets[i].label for i in group), error)
                        evals = [failed(error) for _ in group]
                        break
                    if attempt == 2:
                        raise DmoError(
                            f"the vLLM engine died twice while scoring {targets[group[0]].label} (restarted once); "
                            f"see the engine log above: {one_line(exc)}"
                        ) from exc
                    log.warning("the vLLM engine died (%s); restarting it once", one_line(exc))
                    self._restart()
            results |= dict(zip(group, evals))
        return [results[i] for i in range(len(targets))]

    def _run_items(self, proxies: list[tuple[str, Any]], items: Mapping[str, Sequence[int]]) -> list[ItemEvaluation]:
        from dmo.scoring.evaluate import evaluate_items

        lmm = self.lmm
        lmm.set_proxies(proxies)
        out = []
        for i in range(len(proxies)):
            lmm.active = i
            out.append(
                ItemEvaluation(evaluate_items(lmm, items, self.include_path, self.limit, metric_map=self.metric_map))
            )
        return out

    def _run(self, proxies: list[tuple[str, Any]], benchmarks: Sequence[str]) -> list[Evaluation]:
        tasks, losses = split_benchmarks(benchmarks)
        out = self._run_tasks(proxies, tasks) if tasks else [Evaluation({}) for _ in proxies]
        for (_, lora), result in zip(proxies, out):
            if not losses:
                continue
            result.metrics.update(dict.fromkeys(losses, LOSS_METRIC))
            try:
                found = self.loss.vllm_losses(self.lmm.llm, self.processor, lora, losses)
                result.scores.update({b: score_of(v) for b, v in found.items()})
            except DmoError:
                raise
            except Exception as exc:  # recorded as failed rows, with the reason; the task scores still count
                if _is_engine_death(exc):
                    raise
                result.errors.update(dict.fromkeys(losses, one_line(exc)))
        return out

    def _run_tasks(self, proxies: list[tuple[str, Any]], benchmarks: Sequence[str]) -> list[Evaluation]:
        from dmo.scoring.evaluate import evaluate

        lmm = self.lmm
        lmm.set_proxies(proxies)
        out = []
        for i in range(len(proxies)):
            lmm.active = i
            try:
                out.append(
                    Evaluation(evaluate(lmm, benchmarks, self.include_path, self.limit, metric_map=self.metric_map))
                )
                continue
            except DmoError:
                raise
            except Exception as exc:  # one benchmark broke the joint run: score them one by one to keep the others
                if _is_engine_death(exc) or len(benchmarks) == 1:
                    raise
            scores, errors = {}, {}
            for b in benchmarks:
                try:
                    scores.update(evaluate(lmm, [b], self.include_path, self.limit, metric_map=self.metric_map))
                except Exception as exc:  # recorded as a failed row, with the reason
                    if _is_engine_death(exc):
                        raise
                    errors[b] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            out.append(Evaluation(scores, errors=errors))
        return out
