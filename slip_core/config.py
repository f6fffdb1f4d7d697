"""Typed-config helpers: dataclass <-> plain dict/JSON, stable hashes, dotted overrides, the preset resolver.

Every stage config is a dataclass with named presets; flows pass configs as dicts inside manifests,
so the round trip must be exact and unknown keys must fail loudly (a typo is not a default).
`resolve(presets, name, overrides)` is the one way a stage config is built from a preset plus overrides
(dataset, train, eval stages, their flows and CLIs alike).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a (nested) dataclass; tuples become lists."""
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"not a dataclass config: {type(cfg).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def from_dict(cls: type[T], data: dict) -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints.get(f.name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value)
        elif (hint is tuple or typing.get_origin(hint) is tuple) and isinstance(value, list):
            value = tuple(value)
        if not _matches(value, hint):
            raise ConfigError(f"{cls.__name__}.{f.name}: expected {_hint_name(hint)}, got {value!r:.80}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as e:  # incl. range checks in a config's __post_init__
        raise ConfigError(str(e) if str(e).startswith(cls.__name__) else f"{cls.__name__}: {e}") from e


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` fits a field's type hint. Checked at load time so `--set lr=abc` fails with the
    field's name instead of a TypeError deep inside training; hints we do not model are accepted."""
    if hint is None or hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    base = origin or hint
    if base in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if not args:
            return True
        if base is tuple and not (len(args) == 2 and args[1] is Ellipsis):  # fixed length: tuple[float, float]
            return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value)
    if base is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(base):
        return isinstance(value, base)
    return True


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_args(hint) else getattr(hint, "__name__", str(hint))


def config_sha256(cfg: Any) -> str:
    """Stable content hash of a config (sorted-key JSON)."""
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def override(cfg: T, overrides: dict[str, Any]) -> T:
    """Return a copy of `cfg` with dotted-key overrides applied, e.g. {"optim.lr": 1e-3}."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a nested config")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"override {key!r}: unknown field {leaf!r}")
        node[leaf] = value
    return from_dict(type(cfg), data)


def resolve(presets: Mapping[str, T], preset: str, overrides: dict[str, Any] | None = None, *, what: str = "config",
            named: Mapping[str, Mapping[str, Any]] | None = None) -> T:
    """Preset `preset` of `presets` with `overrides` applied: top-level or dotted keys ({"lr": 1e-3,
    "optim.betas": [0.9, 0.95]}); a top-level key replaces that field's whole value. `named` lets a field
    be given as the name of a preset of its own (e.g. {"quality": QUALITY_PRESETS}: quality="strict")."""
    if preset not in presets:
        raise ConfigError(f"unknown {what} preset {preset!r}; choose from {sorted(presets)}")
    overrides = dict(overrides or {})
    for key, table in (named or {}).items():
        value = overrides.get(key)
        if isinstance(value, str):
            if value not in table:
                raise ConfigError(f"unknown {key} preset {value!r}; choose from {sorted(table)}")
            overrides[key] = to_dict(table[value])
    base = presets[preset]
    flat = {k: v for k, v in overrides.items() if "." not in k}
    dotted = {k: v for k, v in overrides.items() if "." in k}
    cfg = from_dict(type(base), {**to_dict(base), **flat}) if flat else base
    return override(cfg, dotted) if dotted else cfg


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """Command-line overrides ['lr=1e-3', 'betas=[0.9, 0.95]', 'name=x'] -> dict; values parsed as JSON
    when they parse, else kept as strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
