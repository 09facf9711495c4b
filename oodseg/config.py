"""Frozen-dataclass job configs from a YAML file plus command-line overrides (shared by every job).

Precedence (lowest → highest): dataclass defaults → ``--config FILE.yaml`` → ``--set key=value`` → per-field
flags (``--field-name VALUE``). Nested dataclass fields are addressed with dots (``--set train.lr=1e-3``) and get
their own flags (``--train.lr``). Values are parsed by the field's type annotation; lists and tuples accept YAML
(``--set datasets='[a, b]'``) or comma-separated text (``--datasets a,b``). Help text comes from
``field(metadata={"help": ...})``. Unknown keys are errors, never silently ignored.

Usage::

    @dataclass(frozen=True)
    class Cfg:
        lr: float = field(default=1e-3, metadata={"help": "learning rate"})

    cfg = parse_config(Cfg, description="train something")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` → ``(X, True)``; anything else → ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Convert ``value`` (YAML-parsed or raw text) to the annotated type ``tp``; raise ConfigError naming ``key``."""
    inner, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: None is not allowed for type {tp}")
    tp = inner
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    try:
        if _is_dataclass_type(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
            return from_dict(tp, value, prefix=f"{key}.")
        if origin in (list, tuple, Sequence) or tp in (list, tuple):
            if isinstance(value, str):
                parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
                value = parsed
            if not isinstance(value, (list, tuple)):
                value = [value]
            args = typing.get_args(tp)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(args) != len(value):
                    raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
                return tuple(coerce(a, v, key) for a, v in zip(args, value))
            elem = args[0] if args else Any
            items = [coerce(elem, v, key) for v in value]
            return tuple(items) if origin is tuple or tp is tuple else items
        if origin in (dict, Mapping) or tp is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            return dict(value)
        if origin is typing.Literal:
            allowed = typing.get_args(tp)
            for a in allowed:
                if value == a or (isinstance(value, str) and str(a) == value):
                    return a
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: {value!r} is not a boolean")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{key}: {value!r} is not an integer")
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if tp is Path:
            return Path(value)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{key}: cannot convert {value!r} to {tp}: {e}") from None
    return value


def from_dict(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    """Build ``cls`` from a (possibly nested, possibly partial) mapping; unknown keys raise ConfigError."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; known: {sorted(names)}")
    kwargs = {k: coerce(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain (JSON/YAML-serialisable) dict of a config dataclass; tuples become lists, paths strings."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


def _set_nested(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {} if child is None else to_dict(child)
            node[p] = child
        node = child
    node[parts[-1]] = value


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """(dotted name, type, field) for every non-dataclass field, recursing into nested config dataclasses."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _is_dataclass_type(_strip_optional(tp)[0]):
            out += _leaf_fields(_strip_optional(tp)[0], prefix + f.name + ".")
        else:
            out.append((prefix + f.name, tp, f))
    return out


def _type_name(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    if typing.get_origin(inner) is not None:
        name = str(inner).replace("typing.", "")
    return f"{name} | None" if optional else name


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def config_parser(cls: type, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser whose ``--help`` documents every field of ``cls`` (type, default, help text)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: defaults < --config YAML < --set key=value < per-field flags.",
    )
    parser.add_argument("--config", type=str, default=None, metavar="FILE.yaml", help="YAML file with config values")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field (dotted for nested fields); value parsed as YAML; repeatable",
    )
    group = parser.add_argument_group("config fields")
    defaults = to_dict(cls())
    for dotted, tp, f in _leaf_fields(cls):
        node: Any = defaults
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        help_text = f.metadata.get("help", "")
        flag = "--" + dotted.replace("_", "-")
        group.add_argument(
            flag,
            dest="field:" + dotted,
            default=argparse.SUPPRESS,
            metavar=_type_name(tp).upper().replace(" ", ""),
            help=f"{help_text} (default: {node!r})".strip(),
        )
    return parser


def parse_config(
    cls: type[C], argv: Sequence[str] | None = None, description: str | None = None, prog: str | None = None
) -> C:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a frozen ``cls`` instance; see the module docstring."""
    parser = config_parser(cls, description=description, prog=prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return build_config(cls, config_file=args.config, overrides=args.overrides, fields={
            k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("field:")
        })
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def build_config(
    cls: type[C],
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    fields: Mapping[str, Any] | None = None,
) -> C:
    """Programmatic twin of :func:`parse_config`: YAML file, then ``key=value`` overrides, then field values."""
    data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config file: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        _set_nested(data, key.strip(), yaml.safe_load(text) if text.strip() else "")
    for key, text in (fields or {}).items():
        _set_nested(data, key, text)
    return from_dict(cls, data)
