"""The model output kinds every model returns and the scorers accept, and the boxes a detector returns.

* ``PixelLogits``: per-pixel class logits ``[B, C, h, w]`` (ERFNet, timm per-pixel models).
* ``ScoreMaps``: ready-made anomaly score maps ``[B, H, W]`` (the ``precomputed`` model: another method's saved
  outputs); only scorers registered for the ``score`` kind read them (``precomputed``, the map as it is).
* ``MaskOutputs``: per-query class logits ``[N, Q, C+1]`` (last column = no-object) and mask logits ``[N, Q, h, w]``
  (EoMT / Mask2Former). When a model runs sliding windows, each of the ``N`` rows is one crop: ``crops[n]`` is
  ``(image_index, top, left, height, width)`` in a frame of ``frame_size`` (the resized image), and the scoring
  layer stitches per-crop class scores back into ``batch_size`` full images.

``size`` is the label resolution ``(H, W)`` that scores are finally upsampled to (``None``: keep the output size).
``ood_channels`` lists class channels that stand for *unknown* objects rather than an in-distribution class (TDOS's
``ood`` class): in-distribution scorers and the closed-set argmax ignore them, ``p_ood`` reads them; models without
such a class leave it empty. Both are plain dataclasses of tensors so they cross process boundaries (Ray) cheaply.

``features``: per-pixel features ``[N, D, h', w']`` of the same forward pass (one row per image, or per crop with
sliding windows), set only by ``model.predict(images, features=True)`` (``None`` otherwise, so the default path
carries nothing extra); which layer each model exposes is said in its docstring (ERFNet: the decoder's penultimate map
at half resolution; timm_seg: the FPN decoder's fused map at the finest feature stride; EoMT: the per-pixel mask
embeddings of the last layer at the mask logits' resolution). Feature-reading scorers (``mahalanobis``, ``knn``,
``react``) score on that grid and resize the map to the label size (crops stitched as the class scores are).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class PixelLogits:
    """Per-pixel outputs of a ``pixel`` model.

    Attributes:
        logits: raw class logits ``[B, C, h, w]`` (NCHW, not probabilities) at the network's resolution.
        size: label ``(H, W)`` scorers upsample to (bilinear); None: keep ``(h, w)``.
        ood_channels: channels standing for unknown objects (empty for closed-set models).
        features: ``[B, D, h', w']`` per-pixel features when asked for (``predict(..., features=True)``).
    """

    logits: torch.Tensor
    size: tuple[int, int] | None = None
    ood_channels: tuple[int, ...] = ()
    features: torch.Tensor | None = None

    @property
    def num_channels(self) -> int:
        return int(self.logits.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.logits.shape[0])

    def to(self, *args, **kwargs) -> PixelLogits:
        f = None if self.features is None else self.features.to(*args, **kwargs)
        return replace(self, logits=self.logits.to(*args, **kwargs), features=f)


@dataclass(frozen=True)
class MaskOutputs:
    """Per-query outputs of a ``mask`` (mask-classification) model; ``N`` rows = images, or crops with windows.

    Attributes:
        class_logits: ``[N, Q, C+1]`` raw logits per query, last column = no-object.
        mask_logits: ``[N, Q, h, w]`` raw mask logits (sigmoid gives the mask), any resolution.
        crops: ``[N, 5]`` int64 ``(image, top, left, height, width)`` of each row in the ``frame_size`` frame, or
            None when each row is a whole image; ``n_images``: the batch size ``B`` behind the crops.
        size, ood_channels, features: as :class:`PixelLogits`.
    """

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    size: tuple[int, int] | None = None
    crops: torch.Tensor | None = None
    frame_size: tuple[int, int] | None = None
    n_images: int | None = None
    ood_channels: tuple[int, ...] = ()
    features: torch.Tensor | None = None

    @property
    def num_channels(self) -> int:
        """Class channels of the per-pixel scores (the no-object column dropped)."""
        return int(self.class_logits.shape[-1]) - 1

    @property
    def batch_size(self) -> int:
        if self.crops is None:
            return int(self.class_logits.shape[0])
        return int(self.n_images if self.n_images is not None else int(self.crops[:, 0].max()) + 1)

    def to(self, *args, **kwargs) -> MaskOutputs:
        return replace(
            self,
            class_logits=self.class_logits.to(*args, **kwargs),
            mask_logits=self.mask_logits.to(*args, **kwargs),
            features=None if self.features is None else self.features.to(*args, **kwargs),
        )


@dataclass(frozen=True)
class ScoreMaps:
    """Ready-made anomaly maps ``scores [B, H, W]`` (float32, higher = more anomalous) at ``size``; no classes."""

    scores: torch.Tensor
    size: tuple[int, int] | None = None
    ood_channels: tuple[int, ...] = ()
    features: torch.Tensor | None = None

    @property
    def num_channels(self) -> int:
        return 0

    @property
    def batch_size(self) -> int:
        return int(self.scores.shape[0])

    def to(self, *args, **kwargs) -> ScoreMaps:
        return replace(self, scores=self.scores.to(*args, **kwargs))


ModelOutputs = PixelLogits | MaskOutputs | ScoreMaps


def read_only_tensor(x: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy(x)`` for a tensor that is only read, never written (arrays from Arrow buffers and Ray's
    object store are read-only), without torch's warning on read-only arrays."""
    if x.flags.writeable:
        return torch.from_numpy(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(x)


def inlier_channels(outputs: ModelOutputs) -> list[int]:
    """The in-distribution class channels of ``outputs`` (all but ``ood_channels``), ascending."""
    ood = set(outputs.ood_channels)
    return [c for c in range(outputs.num_channels) if c not in ood]


@dataclass(frozen=True)
class Boxes:
    """A detector's or prompter's boxes: ``xyxy`` float32 ``[K, 4]`` (original pixels) and ``scores`` float32
    ``[K]``, on the CPU.

    Convention: continuous pixel-edge xyxy, i.e. a region covering columns ``x0..x1`` and rows ``y0..y1``
    (inclusive) has the box ``[x0, y0, x1 + 1, y1 + 1]``, as detectron2's ``BitMasks.get_bounding_boxes``
    (facebookresearch/detectron2:detectron2/structures/masks.py); torchvision's ``masks_to_boxes`` gives x1, y1 one
    less."""

    xyxy: torch.Tensor
    scores: torch.Tensor

    def __post_init__(self) -> None:
        if self.xyxy.ndim != 2 or self.xyxy.shape[1] != 4 or self.scores.shape != (self.xyxy.shape[0],):
            raise ValueError(f"Boxes needs xyxy [K,4] and scores [K]; got {tuple(self.xyxy.shape)} and "
                             f"{tuple(self.scores.shape)}")

    @classmethod
    def empty(cls) -> Boxes:
        return cls(torch.zeros((0, 4), dtype=torch.float32), torch.zeros(0, dtype=torch.float32))

    @classmethod
    def ranked(cls, xyxy: Any, scores: Any, max_boxes: int | None = None) -> Boxes:
        """Boxes sorted by descending score (stable: ties keep their input order), at most ``max_boxes``."""
        xyxy = torch.as_tensor(xyxy, dtype=torch.float32).detach().cpu().reshape(-1, 4)
        scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
        order = torch.sort(scores, descending=True, stable=True).indices[:max_boxes]
        return cls(xyxy[order].contiguous(), scores[order].contiguous())

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """xyxy box of a bool mask ``[H, W]`` (the pixel-edge convention of :class:`Boxes`); None if empty.

    (S2M's released generator takes ``np.argwhere`` (row, col) min/max as (x, y): its boxes are transposed.)"""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return np.array([x0, y0, x1 + 1, y1 + 1], dtype=np.float32)
