"""Every method the simulator runs, by name: FedPM and the baselines it is compared against.

A table of ``MethodSpec``s, each defined beside its method's code: mask methods
(``fedpm.SPECS``) train scores over frozen random weights and send binary masks; dense
methods (``fedavg.SPECS``) train the weights and send a compressed model update. The order is
the comparison's default order. Adding a method is a spec in its module and a line here.
"""

from __future__ import annotations

from typing import Any

from fedmask_jax.algorithms import fedavg, fedpm
from fedmask_jax.algorithms.base import FederatedAlgorithm, MethodSpec
from fedmask_jax.algorithms.shows import Shows

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (*fedpm.SPECS, *fedavg.SPECS)}


def spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"--algorithm={name!r} is unknown; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def is_mask_method(name: str) -> bool:
    return spec(name).masked


def method_config(name: str, **settings: Any):
    """The config of method ``name`` with these settings (the rest at the method's defaults).

    A setting the method does not have is an error naming the methods that do have it.
    """
    cls = spec(name).config
    own = {f for f in cls.__dataclass_fields__}
    for key in settings:
        if key not in own:
            users = [m for m, s in METHODS.items() if key in s.config.__dataclass_fields__]
            where = f"it is a setting of {', '.join(users)}" if users else "no method has it"
            raise ValueError(f"--{key} does not apply to --algorithm={name} ({where}); remove it")
    return cls(**settings)


def build(name: str, architecture, config=None) -> FederatedAlgorithm:
    """The method ``name`` for an architecture (``models.Architecture``)."""
    s = spec(name)
    return s.build(architecture, config if config is not None else s.config())


def method_flag_names() -> set[str]:
    """Every method hyperparameter that is a command-line flag (and ``algorithm``)."""
    from fedmask_jax.config import flag_fields

    return {"algorithm"} | {f.name for s in METHODS.values() for f in flag_fields(s.config)}


def shows_of(name: str | None) -> Shows:
    """The fields method ``name`` declares; a name no longer registered (a run folder of an
    older version) shows only the fields every run has."""
    return METHODS[name].shows if name in METHODS else Shows()


def declarations() -> list[Shows]:
    """Each distinct ``MethodSpec.shows``, in the table's order (what tables over runs of any
    method have columns for)."""
    return list(dict.fromkeys(s.shows for s in METHODS.values()))
