"""One small registry type shared by every kind of component (timm style): scorers, models, losses, datasets,
metrics, prompters, checkpoint sources.

Each kind has its own module-level ``Registry``; its ``register`` decorator records a factory (a function or class)
under a name together with the facts about it (metadata such as a scorer's Tune ``space``, a dataset's table
``title``), and ``create(name, **cfg)`` builds it. Other layers read the facts through ``meta`` instead of keeping
lists of their own. ``registered(...)`` scopes a registration (tests, notebooks): the entry is removed on exit.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → factory mapping (plus per-entry metadata) for one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register ``fn`` under ``name`` (default: its ``__name__``) with optional metadata."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            key = name or fn.__name__
            if key in self._entries and self._entries[key] is not fn:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = fn
            self._meta[key] = dict(meta)
            return fn

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a ``KeyError`` naming the known entries if it is not registered)."""
        self.get(name)
        del self._entries[name], self._meta[name]

    @contextlib.contextmanager
    def registered(self, name: str, fn: Callable[..., T], **meta: Any) -> Iterator[Callable[..., T]]:
        """Register ``fn`` for the duration of a ``with`` block."""
        self.register(name, **meta)(fn)
        try:
            yield fn
        finally:
            self.unregister(name)

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def create(self, name: str, **cfg: Any) -> T:
        return self.get(name)(**cfg)

    def list(self) -> list[str]:
        return sorted(self._entries)

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def import_plugins(modules: Iterable[str]) -> None:
    """Import a user's plugin modules, whose import registers their scorers / models / datasets / losses; the
    benchmark calls it in the driver (before its config is checked) and in every Ray worker."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"plugins: cannot import {name!r} ({e}); put the module on PYTHONPATH or in the job's "
                             "--working-dir") from None
