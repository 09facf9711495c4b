"""Instance readers for SAOM: Cityscapes instanceIds (hand-written maps) and COCO instances (pycocotools)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from oodseg.data import DataError
from oodseg.data.instances import CityscapesInstances, CocoInstances, read_cityscapes_instances

H, W = 40, 60


def _instance_map() -> tuple[np.ndarray, dict[int, tuple[slice, slice]]]:
    """road (7) background, sky (23), static (4, ignored), two cars, a person, a car group (26) and a caravan
    (29, ignored in evaluation)."""
    raw = np.full((H, W), 7, np.int64)
    regions = {23: (slice(0, 10), slice(0, 60)), 4: (slice(10, 14), slice(0, 5)),
               26000: (slice(20, 30), slice(5, 15)), 26001: (slice(20, 30), slice(20, 32)),
               24000: (slice(12, 35), slice(40, 45)), 26: (slice(32, 38), slice(0, 10)),
               29000: (slice(30, 40), slice(50, 60))}
    for i, (ys, xs) in regions.items():
        raw[ys, xs] = i
    return raw, regions


def _expected(raw: np.ndarray, ids: list[int]) -> np.ndarray:
    return np.stack([raw == i for i in ids])


def _write(path: Path, raw: np.ndarray, dtype: type) -> Path:
    if dtype is np.uint16:
        Image.fromarray(raw.astype(np.uint16)).save(path)  # 16-bit PNG, like the official files (mode I;16)
    else:
        Image.fromarray(raw.astype(np.int32), mode="I").save(path)  # 32-bit mode I (TIFF: PNG cannot hold it)
    return path


@pytest.mark.parametrize("dtype,name", [(np.uint16, "a_gtFine_instanceIds.png"), (np.int32, "a_instanceIds.tif")])
def test_cityscapes_instances_known_objects(tmp_path, dtype, name):
    raw, _ = _instance_map()
    path = _write(tmp_path / name, raw, dtype)
    masks, train_ids = read_cityscapes_instances(path)
    # ordered by id: road, sky (stuff, one mask per class); person, car, car (objects); static/caravan/group left out
    assert train_ids.tolist() == [0, 10, 11, 13, 13]
    assert masks.dtype == bool and masks.shape == (5, H, W)
    np.testing.assert_array_equal(masks, _expected(raw, [7, 23, 24000, 26000, 26001]))
    things, ids = read_cityscapes_instances(path, stuff=False)
    assert ids.tolist() == [11, 13, 13]
    np.testing.assert_array_equal(things, _expected(raw, [24000, 26000, 26001]))
    with_groups, ids = read_cityscapes_instances(path, groups=True)
    assert ids.tolist() == [0, 10, 13, 11, 13, 13]  # the car group (id 26) is one extra car-class mask
    np.testing.assert_array_equal(with_groups[2], raw == 26)


@pytest.mark.parametrize("bad", [7001, 34, 40000])
def test_cityscapes_unknown_ids(tmp_path, bad):
    raw, _ = _instance_map()
    raw[0, 0] = bad  # road has no instances; 34 and 40 are no labelIds
    path = _write(tmp_path / "x_gtFine_instanceIds.png", raw, np.uint16)
    with pytest.raises(DataError) as err:
        read_cityscapes_instances(path)
    assert str(path) in str(err.value) and str(bad) in str(err.value)


def _cityscapes_tree(root: Path) -> Path:
    raw, _ = _instance_map()
    rng = np.random.default_rng(0)
    for city, prefix in [("aachen", "aachen_000000_000019"), ("bonn", "bonn_000001_000019")]:
        (root / "leftImg8bit/train" / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine/train" / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
            root / "leftImg8bit/train" / city / f"{prefix}_leftImg8bit.png")
        _write(root / "gtFine/train" / city / f"{prefix}_gtFine_instanceIds.png", raw, np.uint16)
    return root


def test_cityscapes_instances_dataset_pairing(tmp_path):
    root = _cityscapes_tree(tmp_path / "cityscapes")
    ds = CityscapesInstances(tmp_path, split="train")  # a data root holding cityscapes/
    assert [r.id for r in ds.samples] == ["aachen_000000_000019", "bonn_000001_000019"]
    sample = ds[1]
    assert sample.image.shape == (H, W, 3) and sample.masks.shape == (5, H, W)
    assert sample.classes.tolist() == [0, 10, 11, 13, 13]
    assert sample["label_path"].endswith("bonn_000001_000019_gtFine_instanceIds.png")
    # an image without instance file, and an instance file without image
    orphan = root / "leftImg8bit/train/bonn/bonn_000002_000019_leftImg8bit.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(orphan)
    _write(root / "gtFine/train/aachen/aachen_000009_000019_gtFine_instanceIds.png", _instance_map()[0], np.uint16)
    with pytest.raises(DataError, match="no instance file"):
        CityscapesInstances(root, split="train")
    lenient = CityscapesInstances(root, split="train", strict=False)
    assert len(lenient) == 2 and len(lenient.errors) == 2
    assert any("has no image" in e.problem for e in lenient.errors)
    # size mismatch between image and instance map
    small = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_instanceIds.png"
    _write(small, np.full((H // 2, W), 7), np.uint16)
    with pytest.raises(DataError, match="differs from image size"):
        lenient[0]


# -- COCO --------------------------------------------------------------------------------------------------------------
def _box(y0, x0, y1, x1, h=30, w=40) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.fixture()
def coco_root(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    masks = {1: (1, 18, _box(2, 3, 12, 20)), 2: (1, 3, _box(15, 0, 30, 10)), 3: (2, 18, _box(5, 5, 25, 35)),
             4: (1, 3, _box(0, 30, 8, 40))}  # ann id -> (image id, category, mask); ann 4 is a crowd
    anns = []
    for ann_id, (img, cat, m) in masks.items():
        rle = mask_utils.encode(np.asfortranarray(m))
        ys, xs = np.nonzero(m)
        anns.append({"id": ann_id, "image_id": img, "category_id": cat, "iscrowd": int(ann_id == 4),
                     "segmentation": {"size": list(m.shape), "counts": rle["counts"].decode()},
                     "area": float(m.sum()), "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1),
                                                      float(np.ptp(ys) + 1)]})
    for i in (1, 2, 3):  # image 3 has no annotation
        Image.fromarray(np.full((30, 40, 3), 10 * i, np.uint8)).save(tmp_path / f"val2017/{i:012d}.png")
    (tmp_path / "annotations/instances_val2017.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:012d}.png", "height": 30, "width": 40} for i in (1, 2, 3)],
        "annotations": anns,
        "categories": [{"id": 18, "name": "dog", "supercategory": "animal"},
                       {"id": 3, "name": "car", "supercategory": "vehicle"}]}))
    return tmp_path, masks


def test_coco_instances_masks_and_classes(coco_root):
    root, masks = coco_root
    ds = CocoInstances(root, "annotations/instances_val2017.json")
    assert [r.id for r in ds.samples] == ["1", "2"] and ds.n_empty == 1
    assert ds.category_ids == [3, 18] and ds.class_names == ["car", "dog"] and ds.num_classes == 2
    s = ds[0]
    np.testing.assert_array_equal(s.masks, np.stack([masks[1][2], masks[2][2]]).astype(bool))
    assert s["category_ids"].tolist() == [18, 3] and s.classes.tolist() == [1, 0]
    assert s.image.shape == (30, 40, 3) and (s.image == 10).all()
    crowd = CocoInstances(root, "annotations/instances_val2017.json", include_crowd=True)
    assert crowd[0].masks.shape[0] == 3 and crowd[0].classes.tolist() == [1, 0, 0]
    again = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(again[1].masks[0], masks[3][2].astype(bool))


def test_coco_instances_errors(coco_root, tmp_path):
    root, _ = coco_root
    with pytest.raises(DataError, match="not found"):
        CocoInstances(root, "annotations/instances_missing.json")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "val2017/000000000002.png")
    ds = CocoInstances(root, "annotations/instances_val2017.json")
    with pytest.raises(DataError, match="differs from its annotation size"):
        ds[1]
