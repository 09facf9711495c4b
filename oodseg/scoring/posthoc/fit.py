"""Fit states: what a post-hoc scorer learns from the training split, as mergeable state.

A :class:`FitState` is a :class:`~oodseg.scoring.metrics.base.MergeableMetric` (``update`` / ``merge`` /
``state_dict`` / ``from_state_dict``) whose ``update(outputs, labels, ids)`` reads one batch of model outputs on
training images (``labels``: trainIds ``[B, H, W]``, 255 = ignore; ``ids``: stable image ids), so a fit is a
Ray Data pass whose shard states merge — exactly and in any order (sums are integer, :mod:`.exact`; the kNN bank keeps
the smallest seeded hash keys) — into the state one pass would give. Scorers read the fitted parameters through
the state's own accessors (cached until the next ``update`` / ``merge``).

``@register_fit(name, features=...)`` registers a state; ``features=True``: its ``update`` reads
``outputs.features`` (the fit pass then predicts with ``features=True``). Scorers name the state they need at their
registration (``register_scorer(..., fit=name)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Self, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from oodseg.labels import IGNORE_ID
from oodseg.registry import Registry
from oodseg.scoring.metrics.base import MergeableMetric

S = TypeVar("S", bound="FitState")

FITS: Registry[Any] = Registry("fit state")


def register_fit(name: str, features: bool = False) -> Callable[[type[S]], type[S]]:
    """Class decorator: register a :class:`FitState` under ``name`` (``features``: its update reads features)."""

    def deco(cls: type[S]) -> type[S]:
        cls.name = name
        return FITS.register(name, features=features)(cls)

    return deco


def create_fit(name: str, **cfg: Any) -> FitState:
    """An empty registered fit state ``name``; ``cfg`` = its constructor arguments (e.g. ``num_classes``)."""
    return FITS.create(name, **cfg)


def fit_from_state(name: str, state: Mapping[str, Any]) -> FitState:
    return FITS.get(name).from_state_dict(state)


def fit_reads_features(name: str) -> bool:
    return bool(FITS.meta(name)["features"])


class FitState(MergeableMetric):
    """Mergeable train-split state of a post-hoc scorer."""

    columns: ClassVar[dict[str, str]] = {}

    def update(self, outputs: Any, labels: Any, ids: Sequence[str]) -> Self:
        """Add one batch of the training split.

        Args:
            outputs: the model's outputs for the batch (with ``features`` when the state was registered with
                ``features=True``).
            labels: semantic trainIds ``[B, H, W]`` at image resolution, 255 = void, 254 = outlier (states that
                group features by class leave both out).
            ids: one stable id per image (states that subsample, such as the kNN bank, hash them).
        """
        self._cached: dict[str, Any] = {}
        self._update(outputs, as_labels(labels), list(ids))
        return self

    def _update(self, outputs: Any, labels: torch.Tensor, ids: list[str]) -> None:
        raise NotImplementedError

    def merge(self, other: Self) -> Self:
        self._cached = {}
        return super().merge(other)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per state (invalidated by ``update`` / ``merge``)."""
        cache = self.__dict__.setdefault("_cached", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _compute(self) -> dict[str, Any]:
        return self._state()


def as_labels(labels: Any) -> torch.Tensor:
    """Labels as an int64 tensor ``[B, H, W]``."""
    t = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels))
    return t.to(torch.int64)


def labels_on_grid(labels: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Labels ``[B, H, W]`` sampled (nearest) on a feature grid ``hw`` → ``[B, h, w]`` int64."""
    if tuple(labels.shape[-2:]) == tuple(hw):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(hw), mode="nearest")[:, 0].to(torch.int64)


def feature_rows(outputs: Any, labels: torch.Tensor, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The features ``[N, D, h, w]`` of a batch, their labels on the feature grid ``[N, h, w]`` and one id per row.

    With sliding windows (``outputs.crops``) a row is a crop: the labels are resized (nearest) to the frame, cut to
    the crop's box and sampled on the grid; its id is ``"<image id>#<top>,<left>"``."""
    f = outputs.features
    if f is None:
        raise ValueError("this fit reads features: predict with model.predict(images, features=True)")
    crops = getattr(outputs, "crops", None)
    if crops is None:
        return f, labels_on_grid(labels.to(f.device), tuple(f.shape[-2:])), list(ids)
    frame = labels_on_grid(labels, tuple(int(v) for v in outputs.frame_size))
    rows, names = [], []
    for img, top, left, h, w in crops.detach().to("cpu", torch.long).tolist():
        rows.append(labels_on_grid(frame[img : img + 1, top : top + h, left : left + w], tuple(f.shape[-2:])))
        names.append(f"{ids[img]}#{top},{left}")
    return f, torch.cat(rows).to(f.device), names


def feature_pixels(features: torch.Tensor) -> torch.Tensor:
    """``[B, D, h, w]`` → ``[B·h·w, D]`` float32 (row = one feature pixel, image-major)."""
    return features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def valid_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mask of pixels labelled with an in-distribution class ``0 ≤ y < num_classes`` (not 255 / 254)."""
    return (labels >= 0) & (labels < num_classes) & (labels != IGNORE_ID)
