"""The registry of training tasks (what :func:`oodseg.training.loop.fit` trains; see :mod:`oodseg.training.task`).

``segmentation`` is registered by :mod:`oodseg.training.task`, ``s2m_detector`` by
:mod:`oodseg.training.detector_task` and ``saom`` by its module in :mod:`oodseg.refine`. The registry knows all three from the start (:data:`oodseg.registry.PROVIDERS`) and imports a
task's module the first time it is asked for, in whatever process asks (a Ray Train worker included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from oodseg.registry import Registry

TASKS: Registry[Any] = Registry("training task")


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator registering a :class:`~oodseg.training.task.Task` subclass under ``name``."""

    def deco(cls: type) -> type:
        cls.name = name
        return TASKS.register(name)(cls)

    return deco


def create_task(cfg: Any) -> Any:
    """The task ``cfg.task`` for the run ``cfg`` (a ``TrainConfig``; the task reads its own options from
    ``cfg.task_cfg``), importing the task's module on first use."""
    return TASKS.get(cfg.task)(cfg)


def list_tasks() -> list[str]:
    return TASKS.list()
