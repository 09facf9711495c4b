"""Instance masks (one boolean mask + class per object) for SAOM fine-tuning: Cityscapes ``instanceIds`` and COCO.

* Cityscapes ``gtFine/{split}/{city}/<prefix>_gtFine_instanceIds.png`` (16-bit): official encoding
  (``cityscapesscripts/preparation/json2instanceImg.py``) ``id = labelId·1000 + k`` for an individual object of a class
  with instances, plain ``labelId`` for everything else, including *groups* of such objects (crowds, "cargroup").
  :func:`read_cityscapes_instances` returns one mask per object of an evaluated class (its trainId), and by default one
  mask per evaluated "stuff" class holding all its pixels (road, sky, …: SAOM trains on whole regions, not pieces).
  Groups are left out by default (not one object); classes ignored in evaluation (trainId 255, e.g. caravan) always.
* COCO ``instances_*.json`` through pycocotools: :func:`read_coco_instances` returns one mask per (non-crowd)
  annotation with its category id; :class:`CocoInstances` maps category ids to contiguous classes ``0..C-1``.

Datasets return :class:`InstanceSample` (``image`` uint8 HxWx3, ``masks`` bool ``[K, H, W]``, ``classes`` int64
``[K]``, ``id``, ``image_path``, ``label_path``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from oodseg.data.base import DataError, ListedDataset, SampleRef, read_image, read_label
from oodseg.data.coco import LazyCoco

INSTANCE_OFFSET = 1000  # Cityscapes: id = labelId * 1000 + instance index


class InstanceSample(dict):
    """Dict with ``image``, ``masks`` ``[K, H, W]`` bool, ``classes`` ``[K]`` int64, ``id``, ``image_path``,
    ``label_path`` (COCO adds ``category_ids``)."""

    @property
    def image(self) -> np.ndarray:
        return self["image"]

    @property
    def masks(self) -> np.ndarray:
        return self["masks"]

    @property
    def classes(self) -> np.ndarray:
        return self["classes"]


def _cityscapes_labels() -> dict[int, tuple[int, bool]]:
    """labelId → (trainId with ignored → 255, hasInstances), from cityscapesscripts' label table."""
    from cityscapesscripts.helpers.labels import labels

    return {lab.id: (255 if lab.trainId in (255, -1) else lab.trainId, bool(lab.hasInstances))
            for lab in labels if lab.id >= 0}


def decode_cityscapes_instances(raw: np.ndarray, path: str | os.PathLike[str], stuff: bool = True,
                                groups: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An ``instanceIds`` array ``[H, W]`` → ``(masks [K, H, W] bool, train_ids [K] int64)``, ordered by id: one
    mask per object of a class with instances, one per evaluated stuff class with ``stuff``, and with ``groups``
    one per crowd region of an instance class (stored as the bare labelId); ignored classes (trainId 255) never
    get a mask. Ids outside the encoding raise ``DataError`` naming ``path`` and the ids."""
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
        raise DataError(path, f"instanceIds must be a single-channel integer map, got {raw.dtype} {raw.shape}")
    table = _cityscapes_labels()
    ids = np.unique(raw)
    keep, classes, bad = [], [], []
    for i in ids.tolist():
        label = i // INSTANCE_OFFSET if i >= INSTANCE_OFFSET else i
        entry = table.get(label)
        if i < 0 or entry is None or (i >= INSTANCE_OFFSET and not entry[1]):
            bad.append(i)
            continue
        train_id, has_instances = entry
        wanted = i >= INSTANCE_OFFSET or (groups if has_instances else stuff)
        if wanted and train_id != 255:
            keep.append(i)
            classes.append(train_id)
    if bad:
        raise DataError(path, f"ids {bad[:10]} are not Cityscapes instance ids (labelId 0..33, or labelId·1000 + k "
                              "for classes with instances)")
    masks = raw[None] == np.asarray(keep, dtype=raw.dtype)[:, None, None]
    return masks, np.asarray(classes, dtype=np.int64)


def read_cityscapes_instances(path: str | os.PathLike[str], stuff: bool = True,
                              groups: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a Cityscapes ``*_gtFine_instanceIds.png`` → ``(masks [K, H, W] bool, train_ids [K])``."""
    return decode_cityscapes_instances(read_label(path), path, stuff=stuff, groups=groups)


class CityscapesInstances(ListedDataset):
    """Cityscapes frames ``leftImg8bit/{split}/{city}/<prefix>_leftImg8bit.png`` with
    ``gtFine/{split}/{city}/<prefix>_gtFine_instanceIds.png``; ``load`` → :class:`InstanceSample` (19 trainIds).
    Listing problems (a frame without its instanceIds file or the reverse) follow ``strict`` as in every reader."""

    kind = "instances"
    num_classes = 19
    INST_SUFFIX = "_gtFine_instanceIds.png"

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "train", strict: bool = True,
                 stuff: bool = True, groups: bool = False, name: str = "cityscapes_instances") -> None:
        super().__init__(strict)
        self.name, self.split, self.stuff, self.groups = name, split, stuff, groups
        self.root = self._list_cityscapes(root, split, (self.INST_SUFFIX,), what="instance")

    def load(self, ref: SampleRef) -> InstanceSample:  # type: ignore[override]
        """Decode one frame; ``DataError`` (naming the file) on corrupt files, unknown ids or size mismatch."""
        image = read_image(ref.image_path)
        assert ref.label_path is not None
        masks, classes = read_cityscapes_instances(ref.label_path, stuff=self.stuff, groups=self.groups)
        if masks.shape[1:] != image.shape[:2]:
            raise DataError(ref.label_path, f"instance map size {masks.shape[:0:-1]} differs from image size "
                                            f"{image.shape[1::-1]}")
        return InstanceSample(image=image, masks=masks, classes=classes, id=ref.id, image_path=ref.image_path,
                              label_path=ref.label_path)


def read_coco_instances(coco: Any, image_id: int, include_crowd: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All annotations of ``image_id`` in a pycocotools ``COCO`` index → ``(masks [K, H, W] bool via annToMask,
    category_ids [K])``, in annotation-id order; crowd regions only with ``include_crowd``."""
    info = coco.loadImgs(image_id)[0]
    h, w = int(info["height"]), int(info["width"])
    ann_ids = sorted(coco.getAnnIds(imgIds=[image_id], iscrowd=None if include_crowd else False))
    anns = coco.loadAnns(ann_ids)
    masks = np.zeros((len(anns), h, w), dtype=bool)
    for i, ann in enumerate(anns):
        masks[i] = coco.annToMask(ann).astype(bool)
    return masks, np.asarray([int(a["category_id"]) for a in anns], dtype=np.int64)


class CocoInstances(LazyCoco):
    """Every COCO image with at least one (non-crowd) annotation: ``root/ann_file`` with images in
    ``<ann dir>/../<split>/`` (the layout :class:`oodseg.data.coco.CocoObjects` reads; ``root`` may hold ``coco/``).
    ``classes`` are contiguous indices of the sorted category ids (``category_ids``, ``class_names``); images
    without annotations are skipped (``n_empty``). Picklable: the pycocotools index is rebuilt lazily."""

    kind = "instances"

    def __init__(self, root: str | os.PathLike[str], ann_file: str = "annotations/instances_train2017.json",
                 include_crowd: bool = False, image_dir: str | None = None, name: str = "coco_instances") -> None:
        root = Path(root)
        if not (root / ann_file).is_file() and (root / "coco" / ann_file).is_file():
            root = root / "coco"
        self.name, self.include_crowd = name, include_crowd
        self.ann_path = root / ann_file
        if not self.ann_path.is_file():
            raise DataError(self.ann_path, "COCO annotation file not found")
        split = self.ann_path.stem.removeprefix("instances_")
        self.image_dir = root / image_dir if image_dir else self.ann_path.parent.parent / split
        cats = self.coco.loadCats(self.coco.getCatIds())
        cats = sorted(cats, key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in cats]
        self.class_names = [str(c["name"]) for c in cats]
        self.num_classes = len(cats)
        self._index = {cid: i for i, cid in enumerate(self.category_ids)}
        self.samples: list[SampleRef] = []
        self.n_empty = 0
        for img in self.coco.loadImgs(sorted(self.coco.getImgIds())):
            if not self.coco.getAnnIds(imgIds=[img["id"]], iscrowd=None if include_crowd else False):
                self.n_empty += 1
                continue
            self.samples.append(SampleRef(str(img["id"]), str(self.image_dir / img["file_name"]), str(self.ann_path)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> InstanceSample:
        return self.load(self.samples[i])

    def load(self, ref: SampleRef) -> InstanceSample:
        """Decode one image and its annotations; ``DataError`` on unknown categories or size mismatch."""
        image = read_image(ref.image_path)
        masks, cat_ids = read_coco_instances(self.coco, int(ref.id), self.include_crowd)
        unknown = sorted(set(cat_ids.tolist()) - set(self._index))
        if unknown:
            raise DataError(self.ann_path, f"image {ref.id} has annotations of unknown categories {unknown}")
        if masks.shape[1:] != image.shape[:2]:
            raise DataError(ref.image_path, f"image size {image.shape[1::-1]} differs from its annotation size "
                                            f"{masks.shape[:0:-1]}")
        classes = np.asarray([self._index[c] for c in cat_ids.tolist()], dtype=np.int64)
        return InstanceSample(image=image, masks=masks, classes=classes, category_ids=cat_ids, id=ref.id,
                              image_path=ref.image_path, label_path=ref.label_path)
