"""Typed configs: dataclasses that build from plain dicts (YAML) and refuse unknown keys.

Every model family has one config dataclass; nested sections (e.g. ``moe``) are dataclasses too. A YAML
preset, a hub ``config.json`` and ``create_model(name, **overrides)`` all go through :func:`from_dict`, so a
typo anywhere fails the same way: with the unknown key, its close matches and the valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config could not be built: unknown key, wrong type or invalid value."""


def close_matches(name: str, choices: typing.Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` entries of ``choices`` that look like ``name`` (for 'did you mean' messages)."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    # Substring hits catch 'vmoe_s' -> 'vmoe_s32_...' that difflib's ratio misses.
    for c in choices:
        if len(found) >= n:
            break
        if name and name in c and c not in found:
            found.append(c)
    return found


def unknown_key_message(key: str, valid: typing.Iterable[str], where: str) -> str:
    valid = sorted(valid)
    hint = close_matches(key, valid)
    msg = f"unknown key {key!r} in {where}"
    if hint:
        msg += f"; did you mean {', '.join(repr(h) for h in hint)}?"
    return msg + f" Valid keys: {', '.join(valid)}."


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _convert(value: Any, tp: Any, where: str) -> Any:
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {list(allowed)}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be an int, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def check_field_types(obj: Any, where: str | None = None) -> None:
    """Check every field of dataclass instance ``obj`` against its annotation, as :func:`from_dict` checks YAML
    values (ints stay ints, floats accept ints, Literals their listed values, None only where the field is
    Optional), and store the normalised values (lists become tuples where the field is a tuple). For configs built
    directly in Python, which skip :func:`from_dict`.

    Raises:
        ConfigError: naming the field, the bad value and the expected type.
    """
    where = where or type(obj).__name__
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if value is None and not _is_optional(tp) and tp is not Any:
            raise ConfigError(f"{where}.{f.name} must not be None (it is not optional)")
        converted = _convert(value, tp, f"{where}.{f.name}")
        if converted is not value:
            object.__setattr__(obj, f.name, converted)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields take nested mappings.

    Raises:
        ConfigError: on an unknown key (naming close matches) or a value of the wrong type.
    """
    where = where or cls.__name__
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(unknown_key_message(key, fields, where))
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"invalid {where}: {err}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists, for YAML/JSON)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(config)


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``a.b=1`` style dotted keys address nested sections."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in overrides.items():
        if "." in key:
            head, rest = key.split(".", 1)
            value, key = {rest: value}, head
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (tuples become lists): the dotted keys :func:`merge` accepts."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
