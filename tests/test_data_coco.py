"""COCO outlier source (pycocotools) and the OutlierPaste transform, on a COCO file written by the test."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from oodseg.data import DataError
from oodseg.data.coco import DEFAULT_EXCLUDE, CocoObjects
from oodseg.data.paste import OUTLIER_ID, OutlierPaste

H, W = 60, 80


def _box_mask(y0, x0, y1, x1) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.fixture()
def coco_root(tmp_path) -> tuple[Path, dict[int, tuple[np.ndarray, tuple[int, int, int]]]]:
    """Two PNG images; objects: kite (polygon), elephant (RLE), person & bench (excluded), tiny cat, crowd kite."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    objects = {  # ann id -> (image index, category id, mask, colour)
        1: (0, 38, _box_mask(10, 10, 40, 40), (250, 0, 250)),  # kite, polygon
        2: (0, 1, _box_mask(5, 50, 55, 75), (10, 200, 10)),  # person: excluded
        3: (1, 22, _box_mask(20, 5, 50, 45), (0, 250, 250)),  # elephant, RLE
        4: (1, 15, _box_mask(0, 50, 20, 78), (200, 200, 0)),  # bench: excluded
        5: (1, 17, _box_mask(55, 60, 58, 63), (0, 0, 250)),  # cat: too small
        6: (0, 38, _box_mask(45, 0, 60, 30), (90, 90, 90)),  # kite but iscrowd: skipped
    }
    images = [np.full((H, W, 3), 128, np.uint8) for _ in range(2)]
    anns = []
    for ann_id, (img, cat, m, col) in objects.items():
        images[img][m.astype(bool)] = col
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        if ann_id == 1:
            seg = [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]
        else:
            rle = mask_utils.encode(np.asfortranarray(m))
            seg = {"size": [H, W], "counts": rle["counts"].decode()}
        anns.append({"id": ann_id, "image_id": img + 1, "category_id": cat, "segmentation": seg,
                     "area": float(m.sum()), "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                     "iscrowd": int(ann_id == 6)})
    for i, arr in enumerate(images):
        Image.fromarray(arr).save(tmp_path / f"train2017/{i + 1:012d}.png")
    cats = [(1, "person"), (15, "bench"), (17, "cat"), (22, "elephant"), (38, "kite")]
    (tmp_path / "annotations/instances_train2017.json").write_text(json.dumps({
        "images": [{"id": i + 1, "file_name": f"{i + 1:012d}.png", "height": H, "width": W} for i in range(2)],
        "annotations": anns, "categories": [{"id": i, "name": n, "supercategory": "x"} for i, n in cats]}))
    return tmp_path, {k: (v[2], v[3]) for k, v in objects.items()}


def test_exclusion_and_size_filter(coco_root):
    root, objects = coco_root
    co = CocoObjects(root, min_area=50, min_side=4)
    assert sorted((o.ann_id, o.category) for o in co.objects) == [(1, "kite"), (3, "elephant")]
    assert {"person", "bench", "car", "bicycle", "traffic light", "stop sign"} <= set(DEFAULT_EXCLUDE)
    for i in range(len(co)):
        obj = co[i]
        assert obj.category not in DEFAULT_EXCLUDE
        m, col = objects[obj.ann_id]
        ys, xs = np.nonzero(m)
        np.testing.assert_array_equal(obj.mask, m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(bool))
        assert (obj.image[obj.mask] == np.array(col, np.uint8)).all()
    assert [o.ann_id for o in CocoObjects(root, min_area=0, min_side=0).objects] == [1, 3, 5]
    # ann_file given already joined with root (as training configs do) or absolute: same objects
    joined = CocoObjects(root, str(root / "annotations/instances_train2017.json"), min_area=50)
    assert [o.image_path for o in joined.objects] == [o.image_path for o in co.objects]
    with_person = CocoObjects(root, exclude=["bench"], min_area=50)
    assert "person" in with_person.categories and "bench" not in with_person.categories


def test_coco_bad_inputs_and_pickle(coco_root, tmp_path):
    root, _ = coco_root
    with pytest.raises(DataError, match="annotation file not found"):
        CocoObjects(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no COCO objects left"):
        CocoObjects(root, min_area=10**6)
    co = pickle.loads(pickle.dumps(CocoObjects(root, min_area=50)))
    assert co.load(0).category == "kite"
    (root / "train2017/000000000002.png").unlink()
    with pytest.raises(DataError, match="not found") as e:
        co.load(1)
    assert e.value.path.endswith("000000000002.png")


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """Target: sky (10) on top, road (0) / sidewalk (1) below row 30, an ignore (255) block, building (2) strip."""
    target = np.full((H, W), 10, np.uint8)
    target[30:, :] = 0
    target[30:, 60:] = 1
    target[30:, :8] = 2
    target[50:, 20:35] = 255
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return image, target


def test_paste_consistency_and_road_only(coco_root):
    root, _ = coco_root
    co = CocoObjects(root, min_area=50)
    image, target = _scene()
    paste = OutlierPaste(co, ood_prob=1.0, n_objects=(1, 3), road_only=True, scale=(0.2, 0.5), seed=1)
    n_pasted = 0
    for _ in range(20):
        img2, t2, om = paste(image, target)
        pasted = t2 == OUTLIER_ID
        np.testing.assert_array_equal(om == 1, pasted)
        np.testing.assert_array_equal(om == 255, (target == 255) & ~pasted)
        np.testing.assert_array_equal(om == 0, ~pasted & (target != 255))
        np.testing.assert_array_equal(t2[~pasted], target[~pasted])
        assert (img2[~pasted] == image[~pasted]).all()
        assert paste.last_placements
        for p in paste.last_placements:
            assert target[p.y, p.x] in (0, 1)  # bottom centre on road / sidewalk
            # perspective: height = (lo + (hi - lo) * (y - y_top) / (H - 1 - y_top)) * H, y_top = first road row 30
            assert p.height == max(2, round((0.2 + 0.3 * (p.y - 30) / (H - 1 - 30)) * H))
        n_pasted += int(pasted.sum())
    assert n_pasted > 0


def test_paste_determinism_and_probability(coco_root):
    root, _ = coco_root
    co = CocoObjects(root, min_area=50)
    image, target = _scene()
    a = OutlierPaste(co, ood_prob=0.5, seed=7)
    b = OutlierPaste(co, ood_prob=0.5, seed=7)
    outs = []
    for _ in range(6):
        ra, rb = a(image, target), b(image, target)
        for x, y in zip(ra, rb):
            np.testing.assert_array_equal(x, y)
        outs.append(bool((ra[1] == OUTLIER_ID).any()))
    assert any(outs)
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    for x, y in zip(a.paste(image, target, rng1), a.paste(image, target, rng2)):
        np.testing.assert_array_equal(x, y)
    img0, t0, m0 = OutlierPaste(co, ood_prob=0.0, seed=0)(image, target)
    np.testing.assert_array_equal(img0, image)
    np.testing.assert_array_equal(t0, target)
    np.testing.assert_array_equal(m0, np.where(target == 255, 255, 0))
