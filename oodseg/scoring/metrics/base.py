"""The shared base of every mergeable metric, its registry, and the input validation all metrics use.

torchmetrics-style split (``Metric.add_state`` / ``merge_state`` / ``state_dict``): a metric holds a small state that
``update`` accumulates, ``merge`` combines exactly and order-independently (counts add, per-item lists concatenate),
and ``state_dict`` / ``from_state_dict`` turn into plain numpy dicts so states cross Ray cheaply. The math lives in
``compute`` (and, for the pixel curves, in :mod:`oodseg.scoring.metrics.functional`).

A subclass declares

* ``columns``: compute key → column of the ``metrics`` results table (the row facts live with the metric);
* ``config()``: the constructor arguments that define its state (two states merge only when these are equal);
* ``_state()`` / ``_load(state)`` / ``_merge(other)`` / ``_compute()``.

``@register_metric(name)`` makes it constructible by name (``create_metric``, ``metric_from_state``), so a pipeline
keeps ``{name: state}`` maps and never dispatches on metric types.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Self, TypeVar

import numpy as np
import torch

from oodseg.labels import ANOMALY, IGNORE_ID, INLIER
from oodseg.registry import Registry

M = TypeVar("M", bound="MergeableMetric")

METRICS: Registry[MergeableMetric] = Registry("metric")


def register_metric(name: str) -> Callable[[type[M]], type[M]]:
    """Class decorator: register a :class:`MergeableMetric` under ``name`` (also stored as ``cls.name``)."""

    def deco(cls: type[M]) -> type[M]:
        cls.name = name
        return METRICS.register(name)(cls)

    return deco


def create_metric(name: str, **cfg: Any) -> MergeableMetric:
    """A fresh registered metric ``name``; ``cfg`` = its constructor arguments (what :meth:`config` returns)."""
    return METRICS.create(name, **cfg)


def metric_from_state(name: str, state: Mapping[str, Any]) -> MergeableMetric:
    """Rebuild the registered metric ``name`` from its ``state_dict()``."""
    return METRICS.get(name).from_state_dict(state)  # type: ignore[attr-defined]


class MergeableMetric:
    """A metric whose small state ``update`` accumulates, ``merge`` combines exactly and order-independently, and
    ``state_dict`` / ``from_state_dict`` carry across processes as plain numpy; ``compute`` does the math once.
    Subclasses implement ``config`` and ``_state`` / ``_load`` / ``_merge`` / ``_compute`` (module docstring)."""

    name: ClassVar[str] = ""
    columns: ClassVar[dict[str, str]] = {}

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def update(self, *args: Any, **kwargs: Any) -> Self:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _merge(self, other: Any) -> None:
        raise NotImplementedError

    def _compute(self) -> dict[str, Any]:
        raise NotImplementedError

    def merge(self, other: Self) -> Self:
        """Add ``other``'s state into this one (same type and config); exact and order-independent."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other.config() != self.config():
            raise ValueError(f"cannot merge {type(self).__name__} with config {other.config()} into {self.config()}")
        self._merge(other)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"config": copy.deepcopy(self.config()), "state": self._state()}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> Self:
        metric = cls(**d["config"])
        metric._load(d["state"])
        return metric

    def reset(self) -> Self:
        """Forget everything accumulated (the config stays)."""
        self.__dict__.update(type(self)(**self.config()).__dict__)
        return self

    def compute(self, warn: bool = True) -> dict[str, Any]:
        """The metric values; ``warn=False`` silences the ``RuntimeWarning`` of undefined (NaN) values."""
        if warn:
            return self._compute()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return self._compute()

    def row(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``compute()`` values renamed to their results-table columns (``columns``)."""
        values = self.compute(warn=False) if values is None else values
        return {col: values.get(key) for key, col in self.columns.items()}


class MetricSet(Mapping[str, MergeableMetric]):
    """Named metrics updated, merged and serialised together (e.g. a validation's confusion matrix + pixels)."""

    def __init__(self, metrics: Mapping[str, MergeableMetric] | None = None) -> None:
        self._metrics: dict[str, MergeableMetric] = dict(metrics or {})

    def __getitem__(self, key: str) -> MergeableMetric:
        return self._metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._metrics)

    def __len__(self) -> int:
        return len(self._metrics)

    def merge(self, other: MetricSet) -> MetricSet:
        for key, metric in other.items():
            if key in self._metrics:
                self._metrics[key].merge(metric)
            else:
                self._metrics[key] = copy.deepcopy(metric)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {key: {"metric": m.name, **m.state_dict()} for key, m in self._metrics.items()}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> MetricSet:
        return cls({key: metric_from_state(s["metric"], s) for key, s in d.items()})


# ------------------------------------------------------------------------------------------------------------------
# Input validation, one implementation for numpy arrays and torch tensors (any device)
# ------------------------------------------------------------------------------------------------------------------


def _is_integer(x: np.ndarray | torch.Tensor) -> bool:
    if isinstance(x, torch.Tensor):
        return not (x.is_floating_point() or x.is_complex())
    return bool(np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_)


def all_finite(x: np.ndarray | torch.Tensor) -> bool:
    """Whether every value of a float array is finite: its min and max are (NaN propagates through both); on the
    CPU ~20× faster than ``isfinite(x).all()``, which materialises a boolean array."""
    if isinstance(x, torch.Tensor):
        if x.numel() == 0:
            return True
        lo, hi = torch.aminmax(x)
        return bool(torch.isfinite(torch.stack([lo, hi])).all())
    return x.size == 0 or bool(np.isfinite(x.min()) and np.isfinite(x.max()))


def check_scores(scores: np.ndarray | torch.Tensor) -> None:
    """NaN / inf scores raise ``ValueError`` (they have no place in a ranking)."""
    xp = torch if isinstance(scores, torch.Tensor) else np
    if not all_finite(scores):
        n_nan, n_inf = int(xp.isnan(scores).sum()), int(xp.isinf(scores).sum())
        raise ValueError(f"scores contain {n_nan} NaN and {n_inf} inf values; scorers must produce finite scores")


def check_anomaly_labels(labels: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> None:
    """Labels must have ``shape``, an integer (or bool) dtype and values in {0 inlier, 1 anomaly, 255 ignore}."""
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"scores shape {tuple(shape)} and labels shape {tuple(labels.shape)} differ")
    if not _is_integer(labels):
        raise ValueError(f"labels must be an integer array (0 inlier, 1 anomaly, 255 ignore); got dtype {labels.dtype}")
    ok = (labels == INLIER) | (labels == ANOMALY) | (labels == IGNORE_ID)
    if not bool(ok.all()):
        xp = torch if isinstance(labels, torch.Tensor) else np
        bad = xp.unique(labels[~ok])[:10].tolist()
        raise ValueError(f"labels may only be 0 (inlier), 1 (anomaly) or 255 (ignore); found {bad}")


def as_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of an array or tensor (floating tensors as float32/float64, on the host)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def scores_and_labels(scores: Any, labels: Any, validate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous float32 scores and uint8 labels (validated unless ``validate=False``)."""
    s = np.ascontiguousarray(as_numpy(scores), dtype=np.float32)
    lab = as_numpy(labels)
    if validate:
        check_scores(s)
        check_anomaly_labels(lab, s.shape)
    return s, lab.astype(np.uint8, copy=False)


def torch_scores_and_labels(scores: torch.Tensor, labels: Any, validate: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of :func:`scores_and_labels`: float32 scores and uint8 labels on the scores' device, validated
    by the same checks unless ``validate=False``."""
    s = scores.detach().float()
    lab = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels))
    lab = lab.to(s.device)
    if validate:
        check_anomaly_labels(lab, tuple(s.shape))
        check_scores(s)
    return s, lab.to(torch.uint8) if lab.dtype == torch.bool else lab
