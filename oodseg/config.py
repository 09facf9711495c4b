"""Frozen-dataclass job configs from a YAML file plus command-line overrides (shared by every job).

Precedence (lowest → highest): dataclass defaults → ``--config FILE.yaml`` → ``--set key=value`` → per-field
flags (``--field-name VALUE``). Nested dataclass fields are addressed with dots (``--set train.lr=1e-3``) and get
their own flags (``--train.lr``); ``aliases`` add short flags for nested fields (``--loss`` = ``--train.loss``).
Values are parsed by the field's type annotation; lists and tuples accept YAML (``--set datasets='[a, b]'``) or
comma-separated text (``--datasets a,b``). A dataclass field also accepts a plain string when the dataclass has a
``from_str`` classmethod (``datasets: [road_anomaly_21, {name: folder, ...}]``). Help text comes from
``field(metadata={"help": ..., "choices": ...})``; ``choices`` (a sequence, or a callable returning one, such as a
registry's ``list``) are listed in ``--help`` and enforced. A field's ``on_parse`` hook runs on its value before the
other fields are checked (``plugins``: importing them registers names the other fields may use). Unknown keys are
errors, never silently ignored.

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
    try:
        if _is_dataclass_type(tp):
            if isinstance(value, str) and hasattr(tp, "from_str"):
                return tp.from_str(value)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
            return from_dict(tp, value, prefix=f"{key}.")
        origin = typing.get_origin(tp)
        if origin in (list, tuple, Sequence) or tp in (list, tuple):
            return _coerce_sequence(tp, value, key)
        if origin in (dict, Mapping) or tp is dict:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            return dict(value)
        return _coerce_scalar(tp, value, key)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{key}: cannot convert {value!r} to {tp}: {e}") from None


def _coerce_sequence(tp: Any, value: Any, key: str) -> list[Any] | tuple[Any, ...]:
    """A list / tuple field from YAML (``[a, b]``), comma text (``a,b``) or a single value."""
    if isinstance(value, str):
        value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)):
        value = [value]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(coerce(a, v, key) for a, v in zip(args, value))
    items = [coerce(args[0] if args else Any, v, key) for v in value]
    return tuple(items) if origin is tuple or tp is tuple else items


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    """Literal, bool (true/false/yes/no/on/off/1/0), int (no silent truncation), float, str, Path."""
    if typing.get_origin(tp) is typing.Literal:
        allowed = typing.get_args(tp)
        for a in allowed:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: {value!r} is not a boolean")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        return int(value)
    if tp in (float, str, Path):
        return tp(value)
    return value


def help_meta(text: str, **extra: Any) -> dict[str, Any]:
    """A field's ``metadata``: its ``--help`` text plus ``choices`` / ``on_parse``."""
    return {"help": text, **extra}


def choices_of(f: dataclasses.Field) -> list[Any] | None:
    """The allowed values a field declares (``metadata["choices"]``: a sequence or a callable returning one)."""
    choices = f.metadata.get("choices")
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def _check_choices(f: dataclasses.Field, value: Any, key: str) -> None:
    allowed = choices_of(f)
    if allowed is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    bad = [getattr(v, "name", v) for v in values if getattr(v, "name", v) not in allowed]
    if bad:
        raise ConfigError(f"{key}: {', '.join(map(repr, bad))} not among {allowed}")


def from_dict(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    """Build ``cls`` from a (possibly nested, possibly partial) mapping; unknown keys, values of the wrong type,
    values outside a field's ``choices`` and invalid combinations (``__post_init__``) raise ConfigError, whose
    message names the key with ``prefix`` in front (the dotted path of ``data`` in the whole config)."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; known: {sorted(fields)}")
    kwargs = {}
    # fields with an ``on_parse`` hook first: it may change what the other fields accept (plugins register names)
    for k, v in sorted(data.items(), key=lambda kv: "on_parse" not in fields[kv[0]].metadata):
        kwargs[k] = coerce(hints[k], v, prefix + k)
        _check_choices(fields[k], kwargs[k], prefix + k)
        if "on_parse" in fields[k].metadata:
            try:
                fields[k].metadata["on_parse"](kwargs[k])
            except ValueError as e:
                raise ConfigError(str(e)) from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix or ''}{e}") from None


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


def _metavar(tp: Any, choices: list[Any] | None) -> str:
    """A readable value hint for ``--help`` (no internal type names)."""
    inner, _ = _strip_optional(tp)
    origin = typing.get_origin(inner)
    if choices is not None and origin not in (list, tuple, Sequence):
        return "|".join(map(str, choices))
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(inner)))
    if origin in (list, tuple, Sequence) or inner in (list, tuple):
        args = typing.get_args(inner)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return ",".join(_metavar(a, None) for a in args)
        elem = args[0] if args else Any
        if _is_dataclass_type(elem) or typing.get_origin(elem) in (dict, Mapping):
            return "YAML-LIST"
        return f"{_metavar(elem, None)},..."
    if origin in (dict, Mapping) or inner is dict or _is_dataclass_type(inner):
        return "YAML-MAP"
    return {bool: "true|false", int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}.get(inner, "VALUE")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: … (see --help)``, exit code 2), not the usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def config_parser(cls: type, description: str | None = None, prog: str | None = None,
                  aliases: Mapping[str, str] | None = None,
                  base: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser whose ``--help`` documents every field of ``cls`` (value hint, allowed values, default —
    the job's own ``base`` over the class defaults —, help text) and the ``aliases`` (``"--loss" → "train.loss"``)."""
    parser = OneLineParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: defaults < --config YAML < --set key=value < per-field flags. Lists take the comma form "
               "(--datasets a,b) or YAML (--set 'datasets=[a, b]').",
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
    defaults = _merged(to_dict(cls()), base or {})
    leaves = {dotted: (tp, f) for dotted, tp, f in _leaf_fields(cls)}
    if aliases:
        short = parser.add_argument_group("shortcuts")
        for flag, dotted in aliases.items():
            tp, f = leaves[dotted]
            short.add_argument(flag, dest="field:" + dotted, default=argparse.SUPPRESS,
                               metavar=_metavar(tp, choices_of(f)), help=f"= --{dotted.replace('_', '-')}")
    group = parser.add_argument_group("config fields")
    for dotted, (tp, f) in leaves.items():
        node: Any = defaults
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        help_text = f.metadata.get("help", "")
        choices, metavar = choices_of(f), _metavar(tp, choices_of(f))
        if choices is not None and "|" not in metavar:
            help_text += f"; one or more of: {', '.join(map(str, choices))}"
        default = yaml.safe_dump(node, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        group.add_argument(
            "--" + dotted.replace("_", "-"),
            dest="field:" + dotted,
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=f"{help_text} (default: {default})".strip(),
        )
    return parser


def parse_config(
    cls: type[C], argv: Sequence[str] | None = None, description: str | None = None, prog: str | None = None,
    aliases: Mapping[str, str] | None = None, base: Mapping[str, Any] | None = None,
) -> C:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a frozen ``cls`` instance, layering dataclass defaults, ``base``
    (a job's own defaults), ``--config FILE.yaml``, ``--set key=value`` and per-field flags, highest last. A bad
    value exits with code 2 and one line naming the option; ``aliases`` map short flags to dotted fields."""
    parser = config_parser(cls, description=description, prog=prog, aliases=aliases, base=base)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return build_config(cls, config_file=args.config, overrides=args.overrides, fields={
            k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("field:")
        }, base=base)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def _merged(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, nested mappings merged key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def build_config(
    cls: type[C],
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    fields: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> C:
    """Programmatic twin of :func:`parse_config`: ``base``, the YAML file, ``key=value`` overrides, field values.

    Args:
        overrides: ``"dotted.key=value"`` strings, the value parsed as YAML (``--set``).
        fields: ``{dotted key: value}`` from per-field flags, applied last; values are coerced by the field's type.
        base: a job's own defaults, below the YAML file (nested mappings merge key by key).

    Returns:
        The frozen ``cls``; any bad key or value raises a one-line :class:`ConfigError` naming it.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            detail = str(e).replace("\n", " ")
            raise ConfigError(f"{path}: cannot read config file: {detail}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    data = _merged(base or {}, data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"--set {key.strip()}: value is not valid YAML{where}: {text!r}") from None
        _set_nested(data, key.strip(), value)
    for key, text in (fields or {}).items():
        _set_nested(data, key, text)
    return from_dict(cls, data)
