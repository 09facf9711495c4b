"""S2M's validation release (Zhao et al., "Segment Every Out-of-Distribution Object", CVPR 2024; WenjieZhao1/S2M,
README "validation dataset" + ``datasets/validation/val_score.py``), read as its evaluation reads it.

Layout (``root`` holds ``val/``, or is ``val/``, or is the set's own folder)::

    val/fishyscapes/{Static,LostAndFound}/  original/image_<n>.png  labels/image_<n>.png  score/<n>.npz
    val/segment_me/dataset_AnomalyTrack/    images/validation<d>.jpg   labels_masks/<..d..>.png  score/<i>.npz
    val/segment_me/dataset_ObstacleTrack/   images/validation_<d>.webp labels_masks/<..d..>.png  score/<i>.npz
    val/road_anomaly/                       original/<name>.jpg  labels/<name>.png  score/<i>.npz

Listing and pairing, as ``val_score.py`` does:

* Fishyscapes (``val_score``): one sample per ``score/*.npz``, ordered by the number ending its name; its image and
  label are ``image_<n>.png``; the sample id is ``<n>``.
* SMIYC (``SMIYC``): one sample per ``labels_masks`` file without ``color`` in its name; the image is ``validation``
  (RoadAnomaly21) or ``validation_`` (RoadObstacle21) + all digits of the label's name + ``.jpg`` / ``.webp``.
  Images are ordered by file name (RA-21) or by the number in ``validation_<d>.webp`` (RO-21).
* Road Anomaly (``RoadAnomaly``): one sample per ``original/*.jpg``, ordered by path, label ``labels/<name>.png``.

For SMIYC and Road Anomaly the score list is ``score/0.npz, 1.npz, …`` in that order and the image list is sorted,
so S2M pairs the i-th image in the order above with ``score/<i>.npz``: the sample id is ``<i>``. The saved maps
therefore load with ``arch: precomputed`` and ``pattern: "{id}.npz"`` over each set's ``score/`` folder.

Labels: ``Image.open(label).convert('L')``, anomaly = value 1 (``calculate_miou``: ``y_true == 1``). Here 1 → 1
(anomaly), 255 → 255 (void: left out of the pixel metrics; S2M's own IoU / F1 count it as background, as
:class:`~oodseg.scoring.metrics.S2MMetrics` does by default), every other value → 0 (not anomaly).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from oodseg.data.base import (
    DataError,
    ListedDataset,
    SampleRef,
    apply_lut,
    read_label,
    register_dataset,
    resolve_root,
)

#: S2M's label reading: 1 is anomaly, 255 void, anything else inlier
S2M_LUT = np.zeros(256, dtype=np.int16)
S2M_LUT[1], S2M_LUT[255] = 1, 255

#: layout → (folder under val/, the folder that marks a set's own root)
LAYOUTS = {"fs_static": ("fishyscapes/Static", "score"), "fs_lost_found": ("fishyscapes/LostAndFound", "score"),
           "road_anomaly_21": ("segment_me/dataset_AnomalyTrack", "labels_masks"),
           "road_obstacle_21": ("segment_me/dataset_ObstacleTrack", "labels_masks"),
           "road_anomaly": ("road_anomaly", "original")}


def _trailing_number(name: str) -> int:
    """``val_score.extract_number_from_filename``: the number before ``.npz`` (0 without one)."""
    m = re.search(r"(\d+)\.npz$", name)
    return int(m.group(1)) if m else 0


def _obstacle_number(name: str) -> int:
    """``extract_number_from_filename_SM_OB_IMG``: the number of ``validation_<d>.webp`` (0 without one)."""
    m = re.search(r"validation_(\d+)\.webp", name)
    return int(m.group(1)) if m else 0


class S2MValidationSet(ListedDataset):
    """One set of S2M's validation release (``layout``: a key of :data:`LAYOUTS`), listed and paired in the order
    S2M's ``val_score.py`` uses, so sample ids match its ``score/<i>.npz`` maps; labels 1 = anomaly, 255 = void."""

    kind = "anomaly"
    num_classes = 2

    def __init__(self, root: str | os.PathLike[str] | None, layout: str, *, name: str, track: str,
                 strict: bool = True) -> None:
        super().__init__(strict)
        self.name, self.track, self.layout = name, track, layout
        sub, marker = LAYOUTS[layout]
        try:
            self.root = resolve_root(root, (f"val/{sub}", sub), marker)
        except DataError as err:
            self._problem(err.path, err.problem)
            return
        if layout.startswith("fs_"):
            self._list_fishyscapes()
        elif layout == "road_anomaly":
            self._list_road_anomaly()
        else:
            self._list_smiyc(obstacle=layout == "road_obstacle_21")
        if not self.samples and not self.errors:
            self._problem(self.root, "no images in S2M's layout")

    def _add(self, sample_id: str, image: Path, label: Path) -> None:
        for path, what in ((image, "image"), (label, "label")):
            if not path.is_file():
                self._problem(path, f"{what} file not found (S2M's layout)")
                return
        self.samples.append(SampleRef(sample_id, str(image), str(label)))

    def _list_fishyscapes(self) -> None:
        scores = sorted((p.name for p in (self.root / "score").glob("*.npz")), key=_trailing_number)
        for name in scores:
            n = name[: -len(".npz")]
            self._add(n, self.root / "original" / f"image_{n}.png", self.root / "labels" / f"image_{n}.png")

    def _list_smiyc(self, obstacle: bool) -> None:
        prefix, suffix = ("validation_", ".webp") if obstacle else ("validation", ".jpg")
        pairs = []
        for label in sorted((self.root / "labels_masks").iterdir()):
            if label.is_file() and "color" not in label.name:
                digits = "".join(c for c in label.name if c.isdigit())
                pairs.append((self.root / "images" / f"{prefix}{digits}{suffix}", label))
        pairs.sort(key=lambda p: _obstacle_number(p[0].name) if obstacle else p[0].name)
        for i, (image, label) in enumerate(pairs):
            self._add(str(i), image, label)

    def _list_road_anomaly(self) -> None:
        images = sorted(p for p in (self.root / "original").iterdir() if p.suffix == ".jpg")
        for i, image in enumerate(images):
            self._add(str(i), image, self.root / "labels" / f"{image.stem}.png")

    def _decode_label(self, ref: SampleRef) -> np.ndarray:
        assert ref.label_path is not None
        return apply_lut(read_label(ref.label_path), S2M_LUT, ref.label_path, "S2M (1 anomaly, 255 void)")


def _s2m_set(layout: str, title: str, track: str):
    name = f"s2m_{layout}"

    def factory(root: str | os.PathLike[str] | None = None, strict: bool = True) -> S2MValidationSet:
        return S2MValidationSet(root, layout, name=name, track=track, strict=strict)

    factory.__name__ = name
    factory.__doc__ = (f"S2M's validation set ``val/{LAYOUTS[layout][0]}``, in S2M's own sample order (ids match "
                       f"its ``score/<i>.npz``); SMIYC track {track!r}.")
    return register_dataset(name, title=title, kind="anomaly", track=track)(factory)


s2m_fs_static = _s2m_set("fs_static", "FS Static (S2M val)", "anomaly")
s2m_fs_lost_found = _s2m_set("fs_lost_found", "FS L&F (S2M val)", "anomaly")
s2m_road_anomaly_21 = _s2m_set("road_anomaly_21", "SMIYC RA-21 val (S2M)", "anomaly")
s2m_road_obstacle_21 = _s2m_set("road_obstacle_21", "SMIYC RO-21 val (S2M)", "obstacle")
s2m_road_anomaly = _s2m_set("road_anomaly", "Road Anomaly (S2M val)", "anomaly")
