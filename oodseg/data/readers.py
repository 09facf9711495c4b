"""Readers for Cityscapes, the five anomaly validation sets, the SegmentMeIfYouCan releases and generic folders.

Layouts (``root`` is either a data root holding the dataset sub-folder, or the dataset folder itself):

* ``cityscapes``: ``cityscapes/leftImg8bit/{split}/{city}/<prefix>_leftImg8bit.png`` paired with
  ``cityscapes/gtFine/{split}/{city}/<prefix>_gtFine_labelTrainIds.png`` when present, else
  ``<prefix>_gtFine_labelIds.png`` mapped to the 19 trainIds with cityscapesscripts' official label table
  (``cityscapesscripts.helpers.labels``; trainId 255 and -1 → 255).
* ``Validation_Dataset/<name>/images/<stem>.<ext>`` with ``labels_masks/<stem>.png`` (pairing rule: equal stems),
  the layout of most public eval code (``root`` may also be ``Validation_Dataset/`` or ``<name>/`` itself). Raw label
  conventions: 0 inlier / 1 anomaly / 255 void, except ``RoadAnomaly`` (anomaly stored as 2, mapped to 1).
* SegmentMeIfYouCan release (github.com/SegmentMeIfYouCan/road-anomaly-benchmark): ``dataset_AnomalyTrack`` /
  ``dataset_ObstacleTrack`` with ``images/<stem>.{jpg,webp}`` and ``labels_masks/<stem>_labels_semantic.png``
  (0 not anomaly / 1 anomaly / 255 void; in the obstacle track everything off the road is 255). Only the validation
  frames carry labels; unlabeled images are the held-out test split and are skipped (counted in ``.n_unlabeled``).

Tracks follow SMIYC: RoadObstacle21 is the obstacle track (road-only evaluation, off-road = void). RoadAnomaly21,
Road Anomaly, Fishyscapes Static and Fishyscapes Lost&Found are scored as anomaly track (whole image minus void);
the road-anomaly-benchmark lists ``FishyLAFAnomaly-val`` among the anomaly-track splits.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oodseg.data.base import (
    DataError,
    ListedDataset,
    SampleRef,
    apply_lut,
    data_root,
    read_label,
    register_dataset,
    resolve_root,
    value_lut,
)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
ANOMALY_MAP = {0: 0, 1: 1, 255: 255}
ROAD_ANOMALY_MAP = {0: 0, 2: 1, 255: 255}


def cityscapes_id_to_train_id() -> dict[int, int]:
    """Official Cityscapes labelId → trainId table (cityscapesscripts), with ignored classes (255 / -1) → 255."""
    from cityscapesscripts.helpers.labels import labels

    return {lab.id: (255 if lab.trainId in (255, -1) else lab.trainId) for lab in labels if 0 <= lab.id <= 255}


class CityscapesDataset(ListedDataset):
    """Cityscapes fine annotations as trainIds 0..18 / 255 (``kind="semantic"``, 19 classes)."""

    kind = "semantic"
    track = None
    num_classes = 19
    ID_SUFFIX = "_gtFine_labelIds.png"
    TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "val", strict: bool = True,
                 name: str = "cityscapes") -> None:
        super().__init__(strict)
        self.name, self.split = name, split
        self._id_lut = value_lut(cityscapes_id_to_train_id())
        self._train_lut = value_lut({**{i: i for i in range(19)}, 255: 255})
        self.root = self._list_cityscapes(root, split, (self.TRAIN_ID_SUFFIX, self.ID_SUFFIX))

    def _decode_label(self, ref: SampleRef) -> np.ndarray:
        assert ref.label_path is not None
        raw = read_label(ref.label_path)
        if ref.label_path.endswith(self.TRAIN_ID_SUFFIX):
            return apply_lut(raw, self._train_lut, ref.label_path, "Cityscapes trainId (0..18, 255)")
        return apply_lut(raw, self._id_lut, ref.label_path, "Cityscapes labelId (0..33)")


class MaskFolderDataset(ListedDataset):
    """Images in ``image_dir`` paired with masks ``mask_dir/<image stem><label_suffix><label_ext>``.

    Raw mask values go through ``value_map`` (raw → 0 inlier / 1 anomaly / 255 void); any other raw value is a
    ``DataError``. ``unlabeled="error"`` treats an image without mask as a listing problem; ``"skip"`` drops it
    silently (SMIYC test frames) and counts it in ``n_unlabeled``.
    """

    kind = "anomaly"
    num_classes = 2

    def __init__(self, image_dir: Path, mask_dir: Path, value_map: Mapping[Any, Any], *, name: str,
                 track: str = "anomaly", label_suffix: str = "", label_ext: str = ".png",
                 image_exts: Iterable[str] = IMAGE_EXTS, unlabeled: str = "error", strict: bool = True,
                 listing: bool = True) -> None:
        super().__init__(strict)
        if track not in ("anomaly", "obstacle"):
            raise ValueError(f"track must be 'anomaly' or 'obstacle', got {track!r}")
        if unlabeled not in ("error", "skip"):
            raise ValueError(f"unlabeled must be 'error' or 'skip', got {unlabeled!r}")
        self.name, self.track = name, track
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        self.value_map = {int(k): int(v) for k, v in value_map.items()}
        if not set(self.value_map.values()) <= {0, 1, 255}:
            raise ValueError(f"value_map must map onto 0/1/255, got {self.value_map}")
        self._lut = value_lut(self.value_map)
        self._convention = "{" + ", ".join(f"{k}->{v}" for k, v in sorted(self.value_map.items())) + "}"
        self.n_unlabeled = 0
        exts = {e.lower() for e in image_exts}
        label_tail = label_suffix + label_ext
        if not listing:  # the folder could not be resolved: the caller records why
            return
        if not self.image_dir.is_dir():
            self._problem(self.image_dir, "image folder does not exist")
            return
        images: dict[str, Path] = {}
        for p in sorted(self.image_dir.iterdir()):
            if p.is_file() and p.suffix.lower() in exts:
                if p.stem in images:
                    self._problem(p, f"two images share the stem {p.stem!r} ({images[p.stem].name})")
                    continue
                images[p.stem] = p
        if not images:
            self._problem(self.image_dir, f"no images with extensions {sorted(exts)}")
        labels: dict[str, Path] = {}
        if self.mask_dir.is_dir():
            labels = {p.name[: -len(label_tail)]: p for p in sorted(self.mask_dir.glob(f"*{label_tail}"))}
        elif images:
            self._problem(self.mask_dir, "label folder does not exist")
        for stem, img in images.items():
            lab = labels.get(stem)
            if lab is None:
                if unlabeled == "skip":
                    self.n_unlabeled += 1
                else:
                    self._problem(img, f"image has no label file (expected {self.mask_dir / (stem + label_tail)})")
                continue
            self.samples.append(SampleRef(stem, str(img), str(lab)))
        for stem, lab in labels.items():
            if stem not in images:
                self._problem(lab, f"label has no image (expected {self.image_dir / stem}.<{'|'.join(sorted(exts))}>)")

    def _decode_label(self, ref: SampleRef) -> np.ndarray:
        assert ref.label_path is not None
        return apply_lut(read_label(ref.label_path), self._lut, ref.label_path, self._convention)


def _mask_dataset(root: str | os.PathLike[str] | None, subdir: str | tuple[str, ...], value_map: Mapping[int, int], *,
                  strict: bool, **kw: Any) -> MaskFolderDataset:
    """``images/`` + ``labels_masks/`` under the resolved root; a missing root is a listing problem like any other
    (recorded with the folder the reader expected, so the user knows where the data must go)."""
    try:
        base = resolve_root(root, subdir, "images")
    except DataError as err:
        if strict:
            raise
        dataset = MaskFolderDataset(Path(err.path) / "images", Path(err.path) / "labels_masks", value_map,
                                    strict=False, listing=False, **kw)
        dataset.errors.append(err)
        return dataset
    return MaskFolderDataset(base / "images", base / "labels_masks", value_map, strict=strict, **kw)


def _validation_set(folder: str, name: str, title: str, track: str, value_map: Mapping[int, int], image_ext: str):
    def factory(root: str | os.PathLike[str] | None = None, strict: bool = True) -> MaskFolderDataset:
        return _mask_dataset(root, (f"Validation_Dataset/{folder}", folder), value_map, name=name, track=track,
                             strict=strict)

    factory.__name__ = name
    factory.__doc__ = (f"``Validation_Dataset/{folder}``: images ``*{image_ext}``, labels ``<stem>.png`` "
                       f"with raw values {sorted(value_map)} → {value_map}; track {track!r}.")
    return register_dataset(name, title=title, kind="anomaly", track=track, default=True)(factory)


road_anomaly_21 = _validation_set("RoadAnomaly21", "road_anomaly_21", "SMIYC RA-21", "anomaly", ANOMALY_MAP, ".png")
road_obstacle_21 = _validation_set("RoadObsticle21", "road_obstacle_21", "SMIYC RO-21", "obstacle", ANOMALY_MAP,
                                   ".webp")
fs_lost_found = _validation_set("FS_LostFound_full", "fs_lost_found", "FS L&F", "anomaly", ANOMALY_MAP, ".png")
fs_static = _validation_set("fs_static", "fs_static", "FS Static", "anomaly", ANOMALY_MAP, ".jpg")
road_anomaly = _validation_set("RoadAnomaly", "road_anomaly", "Road Anomaly", "anomaly", ROAD_ANOMALY_MAP, ".jpg")


def _smiyc(folder: str, name: str, title: str, track: str):
    def factory(root: str | os.PathLike[str] | None = None, strict: bool = True) -> MaskFolderDataset:
        return _mask_dataset(root, folder, ANOMALY_MAP, name=name, track=track, label_suffix="_labels_semantic",
                             unlabeled="skip", strict=strict)

    factory.__name__ = name
    factory.__doc__ = (f"SegmentMeIfYouCan ``{folder}``: ``images/<stem>.*`` + ``labels_masks/<stem>_labels_semantic"
                       f".png`` (0/1/255); unlabeled test images skipped; track {track!r}.")
    return register_dataset(name, title=title, kind="anomaly", track=track)(factory)


smiyc_anomaly = _smiyc("dataset_AnomalyTrack", "smiyc_anomaly", "SMIYC AT val", "anomaly")
smiyc_obstacle = _smiyc("dataset_ObstacleTrack", "smiyc_obstacle", "SMIYC OT val", "obstacle")


@register_dataset("cityscapes", title="Cityscapes", kind="semantic", num_classes=19, default=True)
def cityscapes(root: str | os.PathLike[str] | None = None, split: str = "val",
               strict: bool = True) -> CityscapesDataset:
    """Cityscapes ``split`` ("train"/"val") as 19 trainIds."""
    return CityscapesDataset(root, split=split, strict=strict)


@register_dataset("folder", title="folder", kind="anomaly", track="anomaly")
def folder(root: str | os.PathLike[str] | None = None, *, mapping: Mapping[Any, Any] | None = None,
           image_dir: str = "images", mask_dir: str = "labels_masks", label_suffix: str = "", label_ext: str = ".png",
           name: str = "folder", track: str = "anomaly", strict: bool = True) -> MaskFolderDataset:
    """User dataset: ``root/image_dir`` + ``root/mask_dir/<stem><label_suffix><label_ext>`` with a raw → {0, 1, 255}
    ``mapping`` (e.g. ``{0: 0, 1: 1, 2: 1, 255: 255}``; YAML string keys are accepted).

    Args:
        root: dataset folder; ``None`` reads ``$OODSEG_DATA``.
        mapping: raw mask value → 0 inlier / 1 anomaly / 255 ignore; a raw value not in it is a ``DataError``.
        image_dir, mask_dir: image and mask subfolders of ``root``.
        label_suffix, label_ext: mask file name after the image stem (``<stem><label_suffix><label_ext>``).
        name: the dataset's ``.name``.
        track: SMIYC track (``"anomaly"`` / ``"obstacle"``) whose metric rules apply.
        strict: raise on the first listing problem (image without mask, ...); ``False`` records it in ``.errors``
            and skips the file.
    """
    if not mapping:
        raise DataError("<folder dataset>", "needs a value mapping raw → {0, 1, 255}, e.g. "
                        "datasets=[{name: folder, cfg: {root: DIR, mapping: {0: 0, 1: 1, 255: 255}}}]")
    base = data_root(root)
    return MaskFolderDataset(base / image_dir, base / mask_dir, mapping, name=name, track=track,
                             label_suffix=label_suffix, label_ext=label_ext, strict=strict)
