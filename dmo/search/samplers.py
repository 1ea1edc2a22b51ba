"""Optuna samplers by name (Optuna is imported only when one is made, so listing the names is free).

``grid`` is not a sampler of its own: the space's candidates are enqueued.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dmo.errors import DmoError

if TYPE_CHECKING:
    import optuna

__all__ = ["SAMPLERS", "make_sampler", "register_sampler", "sampler_names"]

SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {}


def register_sampler(name: str) -> Callable[[Callable[..., optuna.samplers.BaseSampler]], Any]:
    def deco(factory: Callable[..., optuna.samplers.BaseSampler]) -> Callable[..., optuna.samplers.BaseSampler]:
        SAMPLERS[name] = factory
        return factory

    return deco


@register_sampler("random")
def _random(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed, **params)


@register_sampler("grid")
def _grid(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    # Only enqueued trials run in a grid study; the sampler would just serve any extra trial a user forces.
    return optuna.samplers.RandomSampler(seed=seed, **params)


@register_sampler("tpe")
def _tpe(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    # multivariate: the weights are coupled through the simplex, independent 1-D models miss that.
    defaults: dict[str, Any] = {"multivariate": True, "n_startup_trials": 5}
    return optuna.samplers.TPESampler(seed=seed, **{**defaults, **params})


@register_sampler("gp")
def _gp(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    defaults: dict[str, Any] = {"n_startup_trials": 5}
    return optuna.samplers.GPSampler(seed=seed, **{**defaults, **params})


@register_sampler("cmaes")
def _cmaes(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.CmaEsSampler(seed=seed, **params)


@register_sampler("qmc")
def _qmc(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.QMCSampler(seed=seed, **params)


def sampler_names() -> list[str]:
    return sorted(SAMPLERS)


def make_sampler(name: str, seed: int = 0, params: dict[str, Any] | None = None) -> optuna.samplers.BaseSampler:
    if name not in SAMPLERS:
        raise DmoError(f"unknown sampler {name!r}: choose one of {sorted(SAMPLERS)}")
    try:
        with warnings.catch_warnings():  # QMC and GP are "experimental" in Optuna: the user chose them by name
            warnings.simplefilter("ignore", category=UserWarning)
            return SAMPLERS[name](seed=seed, **(params or {}))
    except TypeError as exc:
        raise DmoError(f"sampler {name!r}: bad parameter ({exc})") from None
