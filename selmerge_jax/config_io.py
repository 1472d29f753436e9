"""Plain data (parsed YAML/JSON) <-> frozen dataclass configs, with errors that name the key path.

Any tree of (frozen) dataclasses is a schema: ``from_dict(PretrainConfig, data)`` walks the type hints, so
each section's own ``__post_init__`` does the range checks and this module only adds what YAML cannot express
(types, unknown keys) plus the key path of the offending value. Floor 0 (``docs/ARCHITECTURE.md``): every
floor reads configs back with it (a checkpoint's stored config in ``training.checkpoint``, a CRD section in
``evaluation.common``); reading YAML files and ``--set`` overrides is the application's (``main.config``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

from selmerge_jax.validation import UserError

__all__ = ["ConfigError", "from_dict", "to_dict"]

T = TypeVar("T")


class ConfigError(UserError):
    """A config value or key is wrong; the message starts with its dotted key path."""


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(tp, value, path: str):
    """Checks ``value`` against type hint ``tp`` and returns it in canonical form (lists -> tuples)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {_describe(value)} matches none of {tp}: " + "; ".join(errors))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (tuple, Sequence, list):
        return _convert_sequence(tp, value, path)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        return dict(value)
    return _convert_scalar(tp, value, path)


def _convert_sequence(tp, value, path: str):
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
    args = typing.get_args(tp)
    if not args:
        item_types = [Any] * len(value)
    elif typing.get_origin(tp) is not tuple or (len(args) == 2 and args[1] is Ellipsis):
        item_types = [args[0]] * len(value)
    else:  # fixed-length tuple[int, str]
        item_types = list(args)
    if len(item_types) != len(value):
        raise ConfigError(f"{path}: expected {len(item_types)} items, got {len(value)}")
    return tuple(_convert(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))


def _convert_scalar(tp, value, path: str):
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an int, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {_describe(value)}")
        return None
    raise ConfigError(f"{path}: the schema type {tp!r} is not supported by the config loader")


def from_dict(cls: type[T], data, path: str = "") -> T:
    """Builds dataclass ``cls`` from a mapping; unknown keys, wrong types and failed checks name the key
    path."""
    where = path or cls.__name__
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{key}: unknown key for {cls.__name__}; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {name: _convert(hints[name], value, f"{path}.{name}" if path else name)
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # the section's own __post_init__ checks
        raise ConfigError(f"{where}: {e}") from e


def to_dict(config) -> dict:
    """The inverse of :func:`from_dict` (tuples become lists so the result dumps as plain YAML/JSON)."""
    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, Mapping):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(config)
