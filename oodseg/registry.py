"""One small registry type shared by scorers, models, losses and datasets (timm style).

Each kind has its own module-level ``Registry``; its ``register`` decorator records a factory (a function or class)
under a name, and ``create(name, **cfg)`` builds it. Factories may carry metadata (for example a scorer's
hyper-parameter ``space``) that other layers, such as Tune, read through ``get``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → factory mapping for one kind of component."""

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

    def __contains__(self, name: object) -> bool:
        return name in self._entries
