"""The one place where configuration is read: YAML, dicts or flat keywords into typed, frozen dataclasses.

Unknown keys are rejected with their dotted name, values are checked against the field's type,
and each dataclass may validate itself in `__post_init__` (raise `ConfigError`).

Flat keywords (`LLM(model, policy, base_budget=512, kv_capacity=2048)`) are put into the sections of a nested
config by `split_keywords`. A dataclass with a classmethod ``from_keywords(mapping, where)`` (`LLMConfig`) is
built from such a flat mapping wherever it is a field of another config (the Serve config's `engine.llm`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml

from entropyinfer.errors import ConfigError

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a bare name like `entropy_short` means `configs/entropy_short.yaml`."""
    p = Path(path)
    if not p.suffix and not p.exists():
        p = CONFIG_DIR / f"{p}.yaml"
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} not found (looked at {p})")
    with p.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, recursively; reject unknown keys and wrong types."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(_join(where, k) for k in unknown)
        raise ConfigError(f"unknown config key(s): {names}; known keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


class KeywordSection(NamedTuple):
    """A section of a nested config and the flat keywords it takes (``prefix + field``)."""

    name: str
    fields: tuple[str, ...]
    prefix: str = ""


def split_keywords(
    keywords: Mapping[str, Any], sections: Sequence[KeywordSection], where: str = ""
) -> dict[str, dict[str, Any]]:
    """Sort flat keywords into sections: ``{section: {field: value}}`` (every section present, maybe empty).

    A keyword belongs to the first section that has it; an unknown one raises `ConfigError` naming it and
    listing every valid keyword."""
    out: dict[str, dict[str, Any]] = {s.name: {} for s in sections}
    owners: dict[str, tuple[str, str]] = {}
    for s in sections:
        for f in s.fields:
            owners.setdefault(s.prefix + f, (s.name, f))
    unknown = sorted(str(k) for k in keywords if k not in owners)
    if unknown:
        names = ", ".join(_join(where, k) for k in unknown)
        raise ConfigError(f"unknown config key(s): {names}; valid keys: {', '.join(sorted(owners))}")
    for key, value in keywords.items():
        section, name = owners[key]
        out[section][name] = value
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_int(name: str, value: Any, *, minimum: int) -> None:
    """For `__post_init__` checks: `value` is an int (not a bool) and at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        builder = getattr(tp, "from_keywords", None)
        if builder is not None and isinstance(value, dict):
            return builder(value, where)
        return from_dict(tp, value, where)  # type: ignore[arg-type]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
