"""Settings as frozen dataclasses: each field says its flag's help, allowed values and bounds.

One definition gives everything: the absl flags of the entry points (``define_flags``), the
checks run before any compute (``check``, one ``ValueError`` naming the flag), and the record
of a run (``dataclasses.asdict``). The run's own settings live in ``run_config.RunConfig``;
each method's hyperparameters live in its own config dataclass beside its code.

NaN fails every numeric check: bounds are written as ``not (low <= x)`` style comparisons
after an explicit finiteness test, so no NaN slips through a comparison that is False.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, Iterable, Sequence

# Field metadata keys.
_HELP, _CHOICES, _MIN, _MAX, _MIN_OPEN, _MAX_OPEN, _CHECK, _FLAG, _VARY = (
    "help", "choices", "min", "max", "min_open", "max_open", "check", "flag", "vary")


def setting(default: Any, help: str, *, choices: Sequence[Any] | None = None,
            min: float | None = None, max: float | None = None, min_open: bool = False,
            max_open: bool = False, check: Callable[[Any], str | None] | None = None,
            flag: bool = True, vary: bool = False) -> Any:
    """A dataclass field that is also a command-line flag.

    ``min``/``max`` bound numbers (``*_open`` excludes the bound itself); ``check(value)``
    returns what is wrong with a value (or None) for anything bounds cannot say;
    ``flag=False`` keeps a field out of the command line (set from Python only);
    ``vary=True``: runs that differ in this setting can share one compiled program (it is a
    traced value, or it only shapes the initial state or the data split).
    """
    return dataclasses.field(default=default, metadata={
        _HELP: help, _CHOICES: tuple(choices) if choices is not None else None, _MIN: min,
        _MAX: max, _MIN_OPEN: min_open, _MAX_OPEN: max_open, _CHECK: check, _FLAG: flag,
        _VARY: vary})


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp) -> tuple[type, bool]:
    """(the field's type without ``| None``, whether None is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _describe_bounds(meta) -> str:
    low, high = meta[_MIN], meta[_MAX]
    if low is not None and high is not None:
        return (f"in {'(' if meta[_MIN_OPEN] else '['}{low:g}, {high:g}"
                f"{')' if meta[_MAX_OPEN] else ']'}")
    if low is not None:
        return f"{'>' if meta[_MIN_OPEN] else '>='} {low:g}"
    return f"{'<' if meta[_MAX_OPEN] else '<='} {high:g}"


def problem(name: str, value: Any, tp, meta) -> str | None:
    """What is wrong with ``value`` for a field, as the end of an error message, or None."""
    tp, optional = _base_type(tp)
    if value is None:
        return None if optional else "must be set"
    if tp is bool:
        if not isinstance(value, bool):
            return f"must be true or false, got {value!r}"
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
    elif tp is str:
        if not isinstance(value, str):
            return f"must be a string, got {value!r}"
    elif typing.get_origin(tp) is tuple:
        if not isinstance(value, tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return f"must be a list of integers, got {value!r}"
    choices = meta.get(_CHOICES)
    if choices is not None and value not in choices:
        return f"={value!r} is unknown; allowed: {', '.join(map(str, choices))}"
    low, high = meta.get(_MIN), meta.get(_MAX)
    if low is not None or high is not None:
        items = value if isinstance(value, tuple) else (value,)
        for v in items:
            ok = True
            if low is not None:
                ok = ok and (v > low if meta[_MIN_OPEN] else v >= low)
            if high is not None:
                ok = ok and (v < high if meta[_MAX_OPEN] else v <= high)
            if not ok:
                return f"must be {_describe_bounds(meta)}, got {value!r}"
    check = meta.get(_CHECK)
    if check is not None:
        return check(value)
    return None


def check(instance) -> None:
    """Raises ``ValueError('--flag ...')`` for the first field of ``instance`` out of bounds."""
    hints = _hints(type(instance))
    for f in dataclasses.fields(instance):
        if _HELP not in f.metadata:
            continue
        why = problem(f.name, getattr(instance, f.name), hints[f.name], f.metadata)
        if why is not None:
            raise ValueError(f"--{f.name}{'' if why.startswith('=') else ' '}{why}")


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of a settings dataclass that are command-line flags."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get(_FLAG)]


def varying(cls) -> set[str]:
    """The settings of ``cls`` that may differ between runs sharing one program."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get(_VARY)}


def field_type(cls, name: str):
    return _base_type(_hints(cls)[name])[0]


def define_flags(owners: Iterable[tuple[str, type]], flag_values, *,
                 per_owner_defaults: bool = False) -> list[str]:
    """Defines one absl flag per setting of the ``(owner name, settings class)`` pairs;
    returns the names defined.

    With ``per_owner_defaults`` (method hyperparameters shared by several methods with
    different defaults), every flag's default is None -- meaning "the method's own" -- and
    its help gives the default of each method; a setting that two classes type differently
    is a programming error.
    """
    from absl import flags

    seen: dict[str, list[tuple[str, type, dataclasses.Field]]] = {}
    for owner, cls in owners:
        for f in flag_fields(cls):
            seen.setdefault(f.name, []).append((owner, cls, f))
    for name, users in seen.items():
        kinds = {(str(_hints(c)[name]), f.metadata[_CHOICES]) for _, c, f in users}
        if len(kinds) != 1:
            raise TypeError(f"setting {name!r} is typed differently by {[c.__name__ for _, c, _ in users]}")
        _, cls, f = users[0]
        tp, _ = _base_type(_hints(cls)[name])
        help_text = f.metadata[_HELP]
        default = f.default
        if per_owner_defaults:
            defaults: dict[str, list[str]] = {}
            for owner, _, g in users:
                defaults.setdefault(str(_flag_text(g.default)), []).append(owner)
            help_text += " Applies to: " + "; ".join(
                f"{', '.join(ms)} (default {v})" for v, ms in defaults.items()) + "."
            default = None
        choices = f.metadata[_CHOICES]
        if tp is bool:
            flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
        elif tp is int:
            flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
        elif tp is float:
            flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
        elif typing.get_origin(tp) is tuple:
            flags.DEFINE_list(name, None if default is None else [str(v) for v in default],
                              help_text, flag_values=flag_values)
        elif choices is not None:
            flags.DEFINE_enum(name, default, [str(c) for c in choices], help_text,
                              flag_values=flag_values)
        else:
            flags.DEFINE_string(name, default, help_text, flag_values=flag_values)
    return list(seen)


def _flag_text(value):
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return value


def from_flag(cls, name: str, value):
    """Converts an absl flag value back to the field's Python type."""
    tp = field_type(cls, name)
    if value is None:
        return None
    if typing.get_origin(tp) is tuple:
        try:
            return tuple(int(v) for v in value)
        except ValueError:
            raise ValueError(f"--{name} must be a list of integers, got {','.join(value)!r}") from None
    return value
