"""Hyperparameters, each declared once, on the field of the library config that uses it.

    depth: int = hp(8, "number of Mixer blocks", rule=at_least(1), original=6)

A declaration holds what there is to know about a key: its type (the annotation), the library's
default, the help, the accepted values, the stages that read it, whether it decides a run's
result (a resume continues only a run of the same values), and the original train.py's value where it had the
option. The application derives the rest: params.yaml's keys and their validation, the CLI's
options, the README's table, dvc.yaml's per-stage lists (pipeline/params.py). A config checks its
own fields when it is built (`check`), so the library refuses a bad value as the params file does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from mixer.errors import MixerError
from mixer.text import brief


@dataclass(frozen=True)
class Rule:
    """Which values a key accepts: `text` completes "must be …" in errors and the README."""

    text: str
    ok: Callable[[Any], bool]
    choices: tuple = ()              # all the values it accepts, when they are few


def at_least(low) -> Rule:
    return Rule("0 or more" if low == 0 else f"at least {low}", lambda v: v >= low)


def positive() -> Rule:
    return Rule("positive", lambda v: v > 0)


def fraction(high_closed: bool = False) -> Rule:
    """[0, 1), or [0, 1] when `high_closed`."""
    return Rule("in [0, 1]" if high_closed else "in [0, 1)",
                lambda v: 0 <= v <= 1 if high_closed else 0 <= v < 1)


def between(low, high) -> Rule:
    """low ≤ value ≤ high."""
    return Rule(f"in {low}..{high}", lambda v: low <= v <= high)


def one_of(*choices: str) -> Rule:
    return Rule(" or ".join(repr(c) for c in choices), lambda v: v in choices, choices)


def each(rule: Rule) -> Rule:
    """Every element of a tuple obeys `rule`."""
    return Rule(f"values each {rule.text}", lambda v: all(rule.ok(x) for x in v))


def ordered(low_ok: Callable, high_ok: Callable, text: str) -> Rule:
    """A (low, high) pair with low ≤ high, each end accepted by its test."""
    return Rule(text, lambda v: low_ok(v[0]) and v[0] <= v[1] and high_ok(v[1]))


@dataclass(frozen=True)
class Declaration:
    help: str
    stages: tuple[str, ...]
    rule: Rule | None = None
    key: str | None = None           # the params.yaml name, when it differs from the field's
    affects: bool = True             # False: where results go or how fast, never what a run computes
    fingerprint: bool = True         # False: a checkpointed run continues when only this key changed
    original: Any = None             # the original train.py's default, where it had the option


def hp(default, help: str, *, stages: str = "train", rule: Rule | None = None, key: str | None = None,
       affects: bool = True, fingerprint: bool = True, original=None):
    """A dataclass field that is a hyperparameter (see the module docstring)."""
    # Runs at import only, before any mutant can be switched on: mutating it tests nothing.
    declaration = Declaration(help, tuple(stages.split()), rule, key, affects, fingerprint, original)  # pragma: no mutate
    return dataclasses.field(default=default, metadata={"hp": declaration})  # pragma: no mutate


@dataclass(frozen=True)
class Key:
    """One declared hyperparameter, as the application sees it."""

    name: str                        # in params.yaml and on the command line
    attribute: str                   # on its config
    kind: Any                        # the annotation, resolved
    default: Any
    declaration: Declaration
    owner: type

    @property
    def nullable(self) -> bool:
        return _nullable(self.kind)[1]

    @property
    def base(self):
        """The type without None (`int` for `int | None`)."""
        return _nullable(self.kind)[0]


def keys(config: type) -> list[Key]:
    """The hyperparameters `config` declares, in field order."""
    hints = _hints(config)
    return [Key(f.metadata["hp"].key or f.name, f.name, hints[f.name], f.default, f.metadata["hp"], config)
            for f in dataclasses.fields(config) if "hp" in f.metadata]


def check(config) -> None:
    """Coerce and check each declared field of a config instance (in place: configs are frozen)."""
    for key in keys(type(config)):
        object.__setattr__(config, key.attribute, validate(key, getattr(config, key.attribute)))


def validate(key: Key, value):
    """`value` as `key`'s type, or a one-line error naming the key and what it accepts."""
    value = coerce(key.name, value, key.kind)
    rule = key.declaration.rule
    if value is not None and rule is not None and not rule.ok(value):
        shown = list(value) if isinstance(value, tuple) else value
        raise MixerError(f"{key.name} must be {rule.text}{' or null' if key.nullable else ''}, got {brief(shown)}")
    return value


def build(config: type, values: typing.Mapping[str, Any], **given):
    """An instance of `config` from params-named `values`; `given` (attribute names) win.

    A declared field takes its key's value; a field of another config's key (e.g. `seed`, declared
    once, read by several) takes it by name; a nested config is built the same way.
    """
    kwargs = {}
    hints = _hints(config)
    for f in dataclasses.fields(config):
        name = f.metadata["hp"].key or f.name if "hp" in f.metadata else f.name
        if f.name in given:
            kwargs[f.name] = given[f.name]
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values)
        elif name in values:
            kwargs[f.name] = values[name]
    return config(**kwargs)


def coerce(key: str, value, kind):
    """`value` as `kind` (a scalar, a tuple of scalars, optionally None), or an error naming `key`."""
    kind, nullable = _nullable(kind)
    if value is None:
        if nullable:
            return None
        raise MixerError(f"{key} cannot be null")
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise MixerError(f"{key} must be a list of {len(args)} numbers, got {brief(value)}")
        return tuple(_scalar(f"{key}[{i}]", v, t) for (i, (v, t)) in enumerate(zip(value, args)))
    return _scalar(key, value, kind)


def _scalar(key: str, value, kind):
    if kind is bool:
        if not isinstance(value, bool):
            raise MixerError(f"{key} must be true or false, got {brief(value)}")
        return value
    if kind in (int, float) and isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        raise MixerError(f"{key}: YAML reads {brief(value)} as a string; write it with a decimal point, "
                         f"e.g. {float(value):.1e}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MixerError(f"{key} must be an integer, got {brief(value)}")
        if not -2**63 <= value < 2**63:  # what torch and numpy hold; a longer one cannot even be printed whole
            digits = len(str(abs(value))) if value.bit_length() < 14_000 else "thousands of"
            raise MixerError(f"{key} must be an integer between -2**63 and 2**63 - 1 (about 9.2e18), got one of "
                             f"{digits} digits")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MixerError(f"{key} must be a number, got {brief(value)}")
        try:
            number = float(value)  # an integer of 310 digits or more has no float
        except OverflowError:
            raise MixerError(f"{key} must be a finite number, got an integer of {value.bit_length()} bits") from None
        if not math.isfinite(number):
            raise MixerError(f"{key} must be a number, got {brief(value)}")
        return number
    if not isinstance(value, str) or not value:
        raise MixerError(f"{key} must be a non-empty string, got {brief(value)}")
    if "\0" in value:  # no path can hold one, and the OS calls on it raise ValueError
        raise MixerError(f"{key} holds a NUL byte, which no file name or name can hold, got {brief(value)}")
    return value


def _nullable(kind) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(kind))
    return kind, False


@functools.cache
def _hints(config: type) -> dict:
    return typing.get_type_hints(config)
