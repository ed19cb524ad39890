"""Configuration: frozen dataclasses built from TOML tables, checked key by key.

An unknown key or a value of the wrong type raises :class:`ConfigError`, which
names the key and lists the valid ones; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from metarl.errors import ConfigError

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the dataclass source, inherited fields
    included (a subclass's docstring wins over its base's)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                    docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def _describe_fields(cls: type) -> str:
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        lines.append(f"  {f.name} = {default!r}  {docs.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {annotation}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args or [Any] * len(value), strict=True))
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type[T], table: dict[str, Any], section: str) -> T:
    """Builds the frozen dataclass ``cls`` from ``table``, checking every key and type.

    Raises:
        ConfigError: for an unknown key (listing the valid ones with their docs), a value of the
            wrong type, or a value the dataclass's ``__post_init__`` rejects.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in [{section}]; valid keys for {cls.__name__}:\n"
            + _describe_fields(cls)
        )
    values = {k: _coerce(v, hints[k], f"[{section}] {k}") for k, v in table.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}] {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``section.key=value`` (value in TOML syntax, bare words as strings)."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of a TOML document with ``--set`` overrides applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in table.items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) != 2:
            raise ConfigError(f"--set key must be section.key (e.g. agent.inner_lr), got {'.'.join(path)!r}")
        section, key = path
        if section not in out or not isinstance(out[section], dict):
            raise ConfigError(f"--set names unknown section [{section}]; sections: {sorted(out)}")
        out[section][key] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Reads a TOML config, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass the path to a .toml under experiments/")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def require_at_least(config: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    """Raises ``ValueError`` naming the first of ``config``'s fields ``names`` below ``minimum``."""
    for name in names:
        if getattr(config, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(config, name)}")


def count_at_least(minimum: int):
    """An ``argparse`` ``type`` for a whole-number option such as ``--workers`` or ``--threads``:
    a value below ``minimum`` is refused while the command line is parsed, before anything runs."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}: give at least {minimum}")
        return value

    return parse
