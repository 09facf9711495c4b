"""COCO instance objects as an Outlier Exposure source (crops + masks via pycocotools).

Objects of categories that overlap the Cityscapes label space are excluded, so that a pasted "outlier" is never an
inlier class (Outlier Exposure, Hendrycks et al. ICLR 2019; COCO-pasted OE for segmentation, Chan et al. "Entropy
Maximization and Meta Classification for Out-of-Distribution Detection in Semantic Segmentation", ICCV 2021, which
likewise removes COCO images with Cityscapes-overlapping classes). ``DEFAULT_EXCLUDE`` maps each excluded COCO name to
the reason.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oodseg.data.base import DataError, read_image

DEFAULT_EXCLUDE: dict[str, str] = {
    "person": "Cityscapes person / rider",
    "bicycle": "Cityscapes bicycle",
    "car": "Cityscapes car",
    "motorcycle": "Cityscapes motorcycle",
    "bus": "Cityscapes bus",
    "train": "Cityscapes train (incl. trams)",
    "truck": "Cityscapes truck",
    "traffic light": "Cityscapes traffic light",
    "stop sign": "Cityscapes traffic sign",
    "parking meter": "street furniture on Cityscapes sidewalks (labelled pole/static): an inlier of road scenes",
    "fire hydrant": "street furniture on Cityscapes sidewalks (labelled static): an inlier of road scenes",
    "bench": "street furniture on Cityscapes sidewalks (labelled static): an inlier of road scenes",
}


def coco_api(ann_path: str | os.PathLike[str]) -> Any:
    """pycocotools' ``COCO`` index of an annotation file (its progress prints silenced); ``DataError`` naming the
    file when it is not a valid COCO annotation file."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_path))
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(ann_path, f"invalid COCO annotation file ({exc})") from None


class LazyCoco:
    """Mixin: the pycocotools index of ``self.ann_path``, built on first use and never pickled (Ray workers rebuild
    it, so a dataset travels as its file list)."""

    ann_path: Any
    _coco: Any = None

    @property
    def coco(self) -> Any:
        if self._coco is None:
            self._coco = coco_api(self.ann_path)
        return self._coco

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_coco": None}


@dataclass(frozen=True)
class CocoObject:
    """One object crop: ``image`` uint8 hxwx3 RGB and boolean ``mask`` hxw (tight box of the mask)."""

    image: np.ndarray
    mask: np.ndarray
    category: str
    ann_id: int


@dataclass(frozen=True)
class CocoObjectRef:
    ann_id: int
    image_path: str
    category: str
    area: float


class CocoObjects(LazyCoco):
    """Instance objects from ``root/ann_file`` (``instances_<split>.json``; images in ``<ann dir>/../<split>/``).

    Kept: non-crowd annotations whose category is not in ``exclude`` and whose mask area ≥ ``min_area`` px and box
    sides ≥ ``min_side`` px (tiny objects carry no shape once rescaled). ``root`` may also be a data root holding
    ``coco/``. Picklable: the pycocotools index is rebuilt lazily after unpickling.
    """

    def __init__(self, root: str | os.PathLike[str], ann_file: str = "annotations/instances_train2017.json",
                 exclude: Iterable[str] = tuple(DEFAULT_EXCLUDE), min_area: float = 400.0, min_side: int = 16,
                 image_dir: str | None = None) -> None:
        root = Path(root)
        if not (root / ann_file).is_file() and (root / "coco" / ann_file).is_file():
            root = root / "coco"
        self.root = root
        self.ann_path = root / ann_file  # an absolute ann_file stays as it is
        if not self.ann_path.is_file() and Path(ann_file).is_file():
            self.ann_path = Path(ann_file)  # already joined with root by the caller
        if not self.ann_path.is_file():
            raise DataError(self.ann_path, "COCO annotation file not found")
        split = self.ann_path.stem.removeprefix("instances_")
        # standard COCO layout: <root>/annotations/instances_<split>.json next to <root>/<split>/
        self.image_dir = root / image_dir if image_dir else self.ann_path.parent.parent / split
        self.exclude = frozenset(exclude)
        self.min_area, self.min_side = float(min_area), int(min_side)
        coco = self.coco
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        self.objects: list[CocoObjectRef] = []
        for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
            name = names.get(ann["category_id"])
            if name is None:
                raise DataError(self.ann_path, f"annotation {ann['id']} has unknown category {ann['category_id']}")
            _, _, bw, bh = ann["bbox"]
            if name in self.exclude or ann["area"] < self.min_area or min(bw, bh) < self.min_side:
                continue
            img = coco.loadImgs(ann["image_id"])[0]
            self.objects.append(CocoObjectRef(int(ann["id"]), str(self.image_dir / img["file_name"]), name,
                                              float(ann["area"])))
        if not self.objects:
            raise DataError(self.ann_path, "no COCO objects left after category/size filtering")

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def categories(self) -> list[str]:
        return sorted({o.category for o in self.objects})

    def load(self, i: int) -> CocoObject:
        """Decode object ``i``: mask via ``COCO.annToMask``, both cropped to the mask's bounding box."""
        ref = self.objects[i]
        ann = self.coco.loadAnns(ref.ann_id)[0]
        image = read_image(ref.image_path)
        mask = self.coco.annToMask(ann).astype(bool)
        if mask.shape != image.shape[:2]:
            raise DataError(ref.image_path, f"image size {image.shape[1::-1]} differs from annotation "
                                            f"{ann['id']} mask size {mask.shape[::-1]}")
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            raise DataError(self.ann_path, f"annotation {ann['id']} has an empty mask")
        box = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
        return CocoObject(image[box].copy(), mask[box].copy(), ref.category, ref.ann_id)

    def __getitem__(self, i: int) -> CocoObject:
        return self.load(i)
