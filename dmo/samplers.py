"""Optuna samplers by name. ``grid`` is not a sampler of its own: the space's candidates are enqueued."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from dmo.errors import DmoError

SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {}


def register_sampler(name: str) -> Callable[[Callable[..., optuna.samplers.BaseSampler]], Any]:
    def deco(factory: Callable[..., optuna.samplers.BaseSampler]) -> Callable[..., optuna.samplers.BaseSampler]:
        SAMPLERS[name] = factory
        return factory

    return deco


@register_sampler("random")
def _random(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed, **params)


@register_sampler("grid")
def _grid(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    # Only enqueued trials run in a grid study; the sampler would just serve any extra trial a user forces.
    return optuna.samplers.RandomSampler(seed=seed, **params)


@register_sampler("tpe")
def _tpe(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    # multivariate: the weights are coupled through the simplex, independent 1-D models miss that.
    defaults: dict[str, Any] = {"multivariate": True, "n_startup_trials": 5}
    return optuna.samplers.TPESampler(seed=seed, **{**defaults, **params})


@register_sampler("gp")
def _gp(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    defaults: dict[str, Any] = {"n_startup_trials": 5}
    return optuna.samplers.GPSampler(seed=seed, **{**defaults, **params})


@register_sampler("cmaes")
def _cmaes(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.CmaEsSampler(seed=seed, **params)


@register_sampler("qmc")
def _qmc(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.QMCSampler(seed=seed, **params)


def make_sampler(name: str, seed: int = 0, params: dict[str, Any] | None = None) -> optuna.samplers.BaseSampler:
    if name not in SAMPLERS:
        raise DmoError(f"unknown sampler {name!r}: choose one of {sorted(SAMPLERS)}")
    try:
        return SAMPLERS[name](seed=seed, **(params or {}))
    except TypeError as exc:
        raise DmoError(f"sampler {name!r}: bad parameter ({exc})") from None
