"""A tiny named-function registry, shared by tasks, rewards, losses, advantages and KL estimators.

Variants are registered functions (or objects) looked up by name. A name of the form
``package.module:attribute`` is imported on demand, so users plug in their own variant
without touching ahamoment (e.g. ``--reward mypkg.rewards:my_fn``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that is neither registered nor importable; the message lists the choices."""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if ":" in name:
            return self._import(name)
        raise UnknownName(
            f"unknown {self.kind} {name!r}; choose one of {sorted(self._items)} "
            f"or give an import path like 'mypkg.module:name'"
        )

    def _import(self, path: str) -> T:
        module_name, _, attr = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UnknownName(f"cannot import {self.kind} {path!r}: {e}") from e
        try:
            return getattr(module, attr)
        except AttributeError as e:
            raise UnknownName(
                f"{self.kind} {path!r}: module {module_name!r} has no {attr!r}"
            ) from e

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
