"""One small registry type shared by every kind of component (timm style): scorers, models, losses, datasets,
metrics, prompters, checkpoint sources.

Each kind has its own module-level ``Registry``; its ``register`` decorator records a factory (a function or class)
under a name together with the facts about it (metadata such as a scorer's Tune ``space``, a dataset's table
``title``), and ``create(name, **cfg)`` builds it. Other layers read the facts through ``meta`` instead of keeping
lists of their own. ``registered(...)`` scopes a registration (tests, notebooks): the entry is removed on exit.

Built-in providers that live outside their registry's package are listed in :data:`PROVIDERS` (kind → name → the
module whose import registers it): the registry knows those names from the start and imports the module on first
use, so ``create_task(cfg)`` with ``task="saom"`` or ``resolve_checkpoint("demo-sam")`` works in any process (a Ray
Train worker included) without the caller importing ``oodseg.refine`` first, and no import is kept only for its side
effect. A user's plugin still registers by being imported (:func:`import_plugins`).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: kind → {name: module that registers it on import}: the built-in providers outside their registry's package
PROVIDERS: dict[str, dict[str, str]] = {
    "training task": {"segmentation": "oodseg.training.task", "s2m_detector": "oodseg.training.detector_task",
                      "saom": "oodseg.training.saom_task"},
    "checkpoint source": {"demo": "oodseg.training.demo", "demo-tdos": "oodseg.training.demo_tdos",
                          "demo-mask": "oodseg.training.demo_mask", "demo-sam": "oodseg.refine.demo",
                          "demo-saom": "oodseg.refine.demo", "demo-detector": "oodseg.refine.demo"},
}


class Registry(Generic[T]):
    """Name → factory mapping (plus per-entry metadata) for one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._providers = dict(PROVIDERS.get(kind, {}))

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
        """The factory of ``name``, importing its provider module first when it is a built-in not loaded yet."""
        if name not in self._entries and name in self._providers:
            importlib.import_module(self._providers[name])
            if name not in self._entries:
                raise RuntimeError(f"{self._providers[name]} does not register the {self.kind} {name!r}")
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.list()) or '(none)'}") from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def create(self, name: str, **cfg: Any) -> T:
        return self.get(name)(**cfg)

    def list(self) -> list[str]:
        return sorted(self._entries.keys() | self._providers.keys())

    def names(self) -> list[str]:
        """Registered names in registration order (built-ins not loaded yet last, in :data:`PROVIDERS` order)."""
        return [*self._entries, *(n for n in self._providers if n not in self._entries)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._providers


def import_plugins(modules: Iterable[str]) -> None:
    """Import a user's plugin modules, whose import registers their scorers / models / datasets / losses; the
    benchmark calls it in the driver (before its config is checked) and in every Ray worker."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"plugins: cannot import {name!r} ({e}); put the module on PYTHONPATH or in the job's "
                             "--working-dir") from None
