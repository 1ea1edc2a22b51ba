"""Optuna samplers by name (Optuna is imported only when one is made, so listing the names is free).

``grid`` is not a sampler of its own: the space's candidates are enqueued. Each entry says whether it can search a
multi-objective study (``objective: {pareto: [...]}``) and whether it takes Optuna's ``constraints_func`` (a space
with ``constraints``); :func:`sampler_fits` refuses a sampler that cannot, and :func:`default_sampler` picks one for a
space that names none.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dmo.errors import DmoError

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEFAULT_MULTI_OBJECTIVE",
    "SAMPLERS",
    "default_sampler",
    "make_sampler",
    "register_sampler",
    "sampler_fits",
    "sampler_names",
]

SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {}


@dataclass(frozen=True)
class Traits:
    #: can search a multi-objective study
    multi_objective: bool = False
    #: takes Optuna's ``constraints_func`` (the factory accepts a ``constraints_func`` argument)
    constraints: bool = False
    #: proposes points without modelling any trial's value (random, quasi-random, a fixed grid): constraints cannot
    #: steer it, so it needs no ``constraints_func`` to search a constrained study
    blind: bool = False


TRAITS: dict[str, Traits] = {}

#: The default of a single-objective study: benchmarks/search_efficiency.py's rule on the default tiny world's 3d
#: lattice (docs/measurements/samplers.md; CMA-ES on format 5's world, TPE since format 6).
DEFAULT_SINGLE_OBJECTIVE = "tpe"
#: The default of a constrained single-objective study (TPE takes constraints; CMA-ES does not).
DEFAULT_CONSTRAINED = "tpe"
#: The default of a multi-objective study: the rule of benchmarks/pareto_samplers.py (hypervolume after its budget
#: on the tiny world's 3d and 4d lattices, 20 seeds), results in benchmarks/results/pareto_samplers.json.
DEFAULT_MULTI_OBJECTIVE = "tpe"


def register_sampler(
    name: str, multi_objective: bool = False, constraints: bool = False, blind: bool = False
) -> Callable[[Callable[..., optuna.samplers.BaseSampler]], Any]:
    def deco(factory: Callable[..., optuna.samplers.BaseSampler]) -> Callable[..., optuna.samplers.BaseSampler]:
        SAMPLERS[name] = factory
        TRAITS[name] = Traits(multi_objective, constraints, blind)
        return factory

    return deco


@register_sampler("random", multi_objective=True, blind=True)
def _random(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed, **params)


@register_sampler("grid", multi_objective=True, blind=True)
def _grid(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    # Only enqueued trials run in a grid study; the sampler would just serve any extra trial a user forces.
    return optuna.samplers.RandomSampler(seed=seed, **params)


@register_sampler("tpe", multi_objective=True, constraints=True)
def _tpe(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    # multivariate: the weights are coupled through the simplex, independent 1-D models miss that.
    defaults: dict[str, Any] = {"multivariate": True, "n_startup_trials": 5}
    return optuna.samplers.TPESampler(seed=seed, **{**defaults, **params})


@register_sampler("gp", multi_objective=True, constraints=True)
def _gp(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    defaults: dict[str, Any] = {"n_startup_trials": 5}
    return optuna.samplers.GPSampler(seed=seed, **{**defaults, **params})


@register_sampler("nsga2", multi_objective=True, constraints=True)
def _nsga2(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    # Optuna's default generation of 50 is a whole study here; 10 lets selection start within a 20-40 trial budget
    defaults: dict[str, Any] = {"population_size": 10}
    return optuna.samplers.NSGAIISampler(seed=seed, **{**defaults, **params})


@register_sampler("cmaes")
def _cmaes(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.CmaEsSampler(seed=seed, **params)


@register_sampler("qmc", multi_objective=True, blind=True)
def _qmc(seed: int, **params: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.QMCSampler(seed=seed, **params)


def sampler_names() -> list[str]:
    return sorted(SAMPLERS)


def default_sampler(multi_objective: bool, constrained: bool) -> str:
    """The sampler of a space that names none."""
    if multi_objective:
        return DEFAULT_MULTI_OBJECTIVE
    return DEFAULT_CONSTRAINED if constrained else DEFAULT_SINGLE_OBJECTIVE


def sampler_fits(name: str, multi_objective: bool, constrained: bool) -> str | None:
    """Why sampler ``name`` cannot run a study of this kind (one line), or None."""
    traits = TRAITS.get(name)
    if traits is None:
        return None  # unknown names are refused by the sampler's own check
    if multi_objective and not traits.multi_objective:
        fit = [n for n in sampler_names() if TRAITS[n].multi_objective and (TRAITS[n].constraints or not constrained)]
        return (
            f"sampler {name!r} optimises a single objective, and this study has several (objective.pareto): "
            f"choose one of {', '.join(fit)}"
        )
    if constrained and not (traits.constraints or traits.blind):
        fit = [n for n in sampler_names() if TRAITS[n].constraints or TRAITS[n].blind]
        return (
            f"sampler {name!r} cannot take constraints (Optuna gives it no constraints_func): choose one of "
            f"{', '.join(fit)}, or drop 'constraints'"
        )
    return None


def make_sampler(
    name: str,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    constraints_func: Callable[[optuna.trial.FrozenTrial], Sequence[float]] | None = None,
) -> optuna.samplers.BaseSampler:
    """Sampler ``name``; ``constraints_func`` (a constrained study) goes to the samplers that take one."""
    if name not in SAMPLERS:
        raise DmoError(f"unknown sampler {name!r}: choose one of {sorted(SAMPLERS)}")
    extra: dict[str, Any] = {}
    if constraints_func is not None and TRAITS[name].constraints:
        extra["constraints_func"] = constraints_func
    try:
        with warnings.catch_warnings():  # QMC and GP are "experimental" in Optuna: the user chose them by name
            warnings.simplefilter("ignore", category=UserWarning)
            return SAMPLERS[name](seed=seed, **{**(params or {}), **extra})
    except TypeError as exc:
        raise DmoError(f"sampler {name!r}: bad parameter ({exc})") from None
