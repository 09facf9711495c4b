"""Outlier Exposure paste transform: COCO objects pasted into Cityscapes frames as labelled outliers.

Pasted pixels get ``OUTLIER_ID = 254`` in the semantic target (CE treats it as ignore) and 1 in ``outlier_mask``
(0 inlier, 1 outlier, 255 where the original target was ignore). Follows the COCO-paste OE of Chan et al., ICCV 2021
(Meta-OoD) and Bevandić et al. (2019); ``road_only`` and ``perspective_scale`` make pastes resemble road obstacles:
the object's bottom centre lands on a road/sidewalk pixel (trainId 0/1) and its height grows linearly with the
row of that point, from ``scale[0]·H`` at the top row of the candidate region to ``scale[1]·H`` at the image bottom
(a ground-plane pinhole camera makes image size ∝ distance below the horizon).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from oodseg.data.coco import CocoObject, CocoObjects
from oodseg.labels import IGNORE_ID, OUTLIER_ID

ROAD_TRAIN_IDS = (0, 1)  # Cityscapes trainIds road, sidewalk


@dataclass(frozen=True)
class Placement:
    """Where one object went: bottom-centre pixel (``y``, ``x``) of its box, box size, and COCO annotation id."""

    y: int
    x: int
    height: int
    width: int
    ann_id: int


class OutlierPaste:
    """With probability ``ood_prob`` paste ``n_objects`` (inclusive range) COCO objects into an image/target pair."""

    def __init__(self, objects: CocoObjects, ood_prob: float = 0.5, n_objects: tuple[int, int] = (1, 2),
                 road_only: bool = False, perspective_scale: bool = True, scale: tuple[float, float] = (0.05, 0.3),
                 seed: int | None = None) -> None:
        if not 0.0 <= ood_prob <= 1.0:
            raise ValueError(f"ood_prob must be in [0, 1], got {ood_prob}")
        if not 1 <= n_objects[0] <= n_objects[1]:
            raise ValueError(f"n_objects must be 1 <= lo <= hi, got {n_objects}")
        if not 0.0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be 0 < lo <= hi, got {scale}")
        self.objects, self.ood_prob, self.n_objects = objects, ood_prob, n_objects
        self.road_only, self.perspective_scale, self.scale = road_only, perspective_scale, scale
        self.rng = np.random.default_rng(seed)
        self.last_placements: list[Placement] = []

    def __call__(self, image: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.paste(image, target, self.rng)

    def paste(self, image: np.ndarray, target: np.ndarray, rng: np.random.Generator | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Paste objects (with probability ``ood_prob``) at random allowed pixels, scaled by their row when
        ``perspective_scale``; the inputs are left untouched.

        Args:
            image: uint8 ``[H, W, 3]`` RGB.
            target: uint8 ``[H, W]`` trainIds, 255 = void (never a paste site).

        Returns:
            New uint8 ``(image, target, outlier_mask)``: pasted pixels get target 254 (``OUTLIER_ID``); the mask
            is 1 there, 255 where the target is void, else 0.
        """
        rng = self.rng if rng is None else rng
        if image.shape[:2] != target.shape:
            raise ValueError(f"image {image.shape} and target {target.shape} sizes differ")
        image, target = image.copy(), target.copy()
        self.last_placements = []
        if rng.random() < self.ood_prob:
            allowed = np.isin(target, ROAD_TRAIN_IDS) if self.road_only else target != IGNORE_ID
            ys, xs = np.nonzero(allowed)
            for _ in range(rng.integers(self.n_objects[0], self.n_objects[1] + 1) if ys.size else 0):
                k = rng.integers(ys.size)
                obj = self.objects.load(int(rng.integers(len(self.objects))))
                self._paste_one(image, target, obj, int(ys[k]), int(xs[k]), int(ys.min()), rng)
        outlier = np.where(target == OUTLIER_ID, 1, np.where(target == IGNORE_ID, IGNORE_ID, 0)).astype(np.uint8)
        return image, target, outlier

    def _paste_one(self, image: np.ndarray, target: np.ndarray, obj: CocoObject, yb: int, xc: int, y_top: int,
                   rng: np.random.Generator) -> None:
        h, w = target.shape
        lo, hi = self.scale
        if self.perspective_scale:
            frac = lo + (hi - lo) * (yb - y_top) / max(h - 1 - y_top, 1)
        else:
            frac = rng.uniform(lo, hi)
        oh = max(2, int(round(frac * h)))
        ow = max(2, int(round(oh * obj.mask.shape[1] / obj.mask.shape[0])))
        pix = np.asarray(Image.fromarray(obj.image).resize((ow, oh), Image.BILINEAR))
        m = np.asarray(Image.fromarray(obj.mask.astype(np.uint8) * 255).resize((ow, oh), Image.NEAREST)) > 127
        y0, x0 = yb - oh + 1, xc - ow // 2
        ys, xs = slice(max(y0, 0), min(y0 + oh, h)), slice(max(x0, 0), min(x0 + ow, w))
        local = m[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0]
        image[ys, xs][local] = pix[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0][local]
        target[ys, xs][local] = OUTLIER_ID
        self.last_placements.append(Placement(yb, xc, oh, ow, obj.ann_id))
