"""Typed configs: dataclasses whose field docstrings become the ``--help`` text.

A stage's config is filled in three layers, later ones winning: the dataclass defaults, a
YAML recipe (``--recipe recipes/x.yaml``), then command-line flags. Every error is one line
that says where the bad value came from (``recipe.yaml:4: field 'steps': ...`` or
``command line: field 'steps': ...``): unknown keys (with a "did you mean"), values of the
wrong type (a list where a number goes, NaN, a float where an integer goes), and values that
``__post_init__`` rejects, which are traced back to the field its message names.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import re
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ahamoment import atomic

C = TypeVar("C")


class ConfigError(ValueError):
    """A bad recipe or flag; the message says what to change."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each field of a dataclass (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] -> X
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


_KIND = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    try:
        if tp in (bool, int, float, str) and isinstance(value, list | dict | set | tuple):
            raise ValueError(f"expected {_KIND[tp]}, got a {type(value).__name__}")
        if tp is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError(f"expected {_KIND[tp]}, got {value}")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not an integer")
            return int(value)
        if tp is float:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"expected a finite number, got {value!r}")
            return number
        if tp is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())[:200]}") from e
    return value


def _section(cls: type, name: str) -> type:
    """The most basic class in ``cls``'s MRO that declares field ``name`` (a shared argument
    group, ``args.py``, even where the stage gives the field another default)."""
    for klass in reversed(cls.__mro__):
        if name in vars(klass).get("__annotations__", {}):
            return klass
    return cls


def _title(klass: type) -> str:
    """A section title: the class docstring's first line (dataclass's own repr-like docstring
    does not count)."""
    doc = (klass.__doc__ or "").strip()
    if not doc or doc.startswith(f"{klass.__name__}("):
        return f"{klass.__name__} options"
    return doc.splitlines()[0].rstrip(".")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field, its help taken from the field docstring; the fields of each
    shared argument group form a section of their own, after the stage's own."""
    docs = field_docs(cls)
    fields = [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    owners = {f.name: _section(cls, f.name) for f in fields}
    order = [cls] + [k for k in dict.fromkeys(owners.values()) if k is not cls]
    groups = {k: parser.add_argument_group(_title(k)) for k in order}
    for f in sorted(fields, key=lambda f: order.index(owners[f.name])):
        group = groups[owners[f.name]]
        tp = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            group.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            metavar = {int: "N", float: "X"}.get(tp, "STR")
            group.add_argument(
                flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_text
            )


def _yaml_key_lines(path: Path) -> dict[str, int]:
    node = yaml.compose(path.read_text())
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            lines[str(key.value).replace("-", "_")] = key.start_mark.line + 1
    return lines


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Load a YAML recipe as a flat mapping; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML recipe (not UTF-8 text: {e.reason})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{path}{line}: invalid YAML: {why}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a recipe must be a mapping of field: value")
    return data


def build(cls: type[C], recipe: str | Path | None = None, **overrides: Any) -> C:
    """Defaults, then the recipe, then overrides (CLI flags); validated by ``__post_init__``."""
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any], dict[str, int]]] = []
    if recipe:
        layers.append((str(recipe), read_recipe(recipe), _yaml_key_lines(Path(recipe))))
    layers.append(("command line", overrides, {}))
    wheres: dict[str, str] = {}  # field -> where its value was last set
    for source, data, lines in layers:
        for key, value in data.items():
            key = str(key).replace("-", "_")
            where = f"{source}:{lines[key]}" if key in lines else source
            if key not in names:
                close = difflib.get_close_matches(key, list(names), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}: unknown field {key!r} for {cls.__name__}{hint}")
            tp = _field_type(cls, names[key])
            value = _coerce(value, tp, f"{where}: field {key!r}")
            if source != "command line" and key.endswith("_recipe") and value:
                # a recipe names another recipe relative to itself, so it runs from any folder
                value = str(Path(source).parent / value)
            values[key] = value
            wheres[key] = where
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError, OSError) as e:
        raise ConfigError(_blame(cls, " ".join(str(e).split()), wheres)) from e


def _blame(cls: type, message: str, wheres: dict[str, str]) -> str:
    """``message`` of a rejected config, led by where the field it names first was set
    (``recipe.yaml:4: field 'steps': ...``); by the class name when it names no field set."""
    found = []
    for name, where in wheres.items():
        flag = "--" + name.replace("_", "-")
        m = re.search(rf"(?<![\w-])({re.escape(name)}|{re.escape(flag)})(?![\w-])", message)
        if m:
            found.append((m.start(), name, where))
    if not found:
        return f"{cls.__name__}: {message}"
    _, name, where = min(found)
    return f"{where}: field {name!r}: {message}"


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML, atomically (``atomic.write_text``)."""
    atomic.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
