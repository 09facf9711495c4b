"""Readers round-trip on files written here in the real formats (png/jpg/webp), plus every bad-input case."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodseg.data import DataError, SampleRef, cityscapes_id_to_train_id, create_dataset, list_datasets


def _img(path: Path, h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    """A smooth colour ramp (so lossy jpg/webp round trips stay close) with a seed-dependent offset."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 40 * seed + 60)], -1)
    arr = arr.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **({"quality": 95} if path.suffix in (".jpg", ".webp") else {}))
    return arr


def _lab(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


# official Cityscapes labelId -> trainId, written out by hand from cityscapesscripts/helpers/labels.py
HAND_TABLE = {0: 255, 1: 255, 6: 255, 7: 0, 8: 1, 9: 255, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
              23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 31: 16, 32: 17, 33: 18}


def test_registry_lists_all_readers():
    names = set(list_datasets())
    assert {"cityscapes", "road_anomaly_21", "road_obstacle_21", "fs_lost_found", "fs_static", "road_anomaly",
            "smiyc_anomaly", "smiyc_obstacle", "folder"} <= names
    with pytest.raises(KeyError, match="unknown dataset"):
        create_dataset("nope", root=".")


def test_cityscapes_table_matches_official_values():
    table = cityscapes_id_to_train_id()
    for label_id, train_id in HAND_TABLE.items():
        assert table[label_id] == train_id, label_id


def _cityscapes(root: Path, split: str = "val") -> tuple[np.ndarray, Path]:
    ids = np.array(list(HAND_TABLE), dtype=np.uint8)
    label = np.resize(ids, (12, 16))
    _img(root / "cityscapes/leftImg8bit" / split / "aachen/aachen_000000_000019_leftImg8bit.png")
    lab_path = root / "cityscapes/gtFine" / split / "aachen/aachen_000000_000019_gtFine_labelIds.png"
    _lab(lab_path, label)
    return label, lab_path


def test_cityscapes_labelids_mapped_to_trainids(tmp_path):
    label, _ = _cityscapes(tmp_path)
    ds = create_dataset("cityscapes", root=tmp_path, split="val")
    assert (ds.kind, ds.track, ds.num_classes, len(ds)) == ("semantic", None, 19, 1)
    s = ds[0]
    expected = np.vectorize(HAND_TABLE.get)(label)
    np.testing.assert_array_equal(s["label"], expected)
    assert s["image"].dtype == np.uint8 and s["image"].shape == (12, 16, 3)
    assert s["id"] == "aachen_000000_000019"
    # root may also be the cityscapes folder itself, or come from $OODSEG_DATA
    assert len(create_dataset("cityscapes", root=tmp_path / "cityscapes")) == 1


def test_cityscapes_prefers_train_id_file(tmp_path, monkeypatch):
    _cityscapes(tmp_path)
    tid = np.full((12, 16), 5, np.uint8)
    tid[0, 0] = 255
    _lab(tmp_path / "cityscapes/gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png", tid)
    monkeypatch.setenv("OODSEG_DATA", str(tmp_path))
    np.testing.assert_array_equal(create_dataset("cityscapes")[0]["label"], tid)


def test_cityscapes_invalid_label_id(tmp_path):
    _, lab_path = _cityscapes(tmp_path)
    _lab(lab_path, np.full((12, 16), 40))
    ds = create_dataset("cityscapes", root=tmp_path)
    with pytest.raises(DataError, match=r"labelId.*\[40\]") as e:
        ds[0]
    assert e.value.path == str(lab_path)


VALIDATION = [  # registry name, folder, image ext, raw label values, expected mapped values
    ("road_anomaly_21", "RoadAnomaly21", ".png", [0, 1, 255], [0, 1, 255]),
    ("road_obstacle_21", "RoadObsticle21", ".webp", [0, 1, 255], [0, 1, 255]),
    ("fs_lost_found", "FS_LostFound_full", ".png", [0, 1, 255], [0, 1, 255]),
    ("fs_static", "fs_static", ".jpg", [0, 1, 255], [0, 1, 255]),
    ("road_anomaly", "RoadAnomaly", ".jpg", [0, 2, 255], [0, 1, 255]),
]


@pytest.mark.parametrize("name,folder,ext,raw,mapped", VALIDATION)
def test_validation_sets_round_trip(tmp_path, name, folder, ext, raw, mapped):
    base = tmp_path / "Validation_Dataset" / folder
    raw_label = np.resize(np.array(raw, np.uint8), (12, 16))
    images = {}
    for k in range(2):
        images[f"frame{k}"] = _img(base / "images" / f"frame{k}{ext}", seed=k)
        _lab(base / "labels_masks" / f"frame{k}.png", raw_label)
    ds = create_dataset(name, root=tmp_path)
    for other_root in (tmp_path / "Validation_Dataset", base):  # the folder above the set, or the set itself
        assert create_dataset(name, root=other_root).samples == ds.samples
    assert ds.kind == "anomaly" and ds.track == ("obstacle" if name == "road_obstacle_21" else "anomaly")
    assert [r.id for r in ds.samples] == ["frame0", "frame1"]
    for s in ds:
        lut = dict(zip(raw, mapped))
        np.testing.assert_array_equal(s["label"], np.vectorize(lut.get)(raw_label).astype(np.uint8))
        diff = np.abs(s["image"].astype(int) - images[s["id"]].astype(int))
        assert s["image"].shape == (12, 16, 3) and s["image"].dtype == np.uint8
        assert diff.max() == 0 if ext == ".png" else diff.mean() < 10  # lossy codecs: close to the written ramp
        assert s["image_path"].endswith(ext) and s["label_path"].endswith(".png")


@pytest.mark.parametrize("name,folder,ext,track", [("smiyc_anomaly", "dataset_AnomalyTrack", ".jpg", "anomaly"),
                                                   ("smiyc_obstacle", "dataset_ObstacleTrack", ".webp", "obstacle")])
def test_smiyc_release_layout(tmp_path, name, folder, ext, track):
    base = tmp_path / folder
    label = np.resize(np.array([0, 1, 255], np.uint8), (12, 16))
    _img(base / "images" / f"validation0000{ext}")
    _img(base / "images" / f"test0001{ext}")  # held-out test frame: no label, skipped
    _lab(base / "labels_masks" / "validation0000_labels_semantic.png", label)
    color = base / "labels_masks/validation0000_labels_semantic_color.png"  # visualisation file: ignored
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(color)
    ds = create_dataset(name, root=tmp_path)
    assert ds.track == track and len(ds) == 1 and ds.n_unlabeled == 1
    np.testing.assert_array_equal(ds[0]["label"], label)


def test_folder_dataset_with_mapping(tmp_path):
    raw = np.resize(np.array([0, 1, 2, 255], np.uint8), (12, 16))
    _img(tmp_path / "imgs/a.jpg")
    _lab(tmp_path / "masks/a_mask.png", raw)
    ds = create_dataset("folder", root=tmp_path, image_dir="imgs", mask_dir="masks", label_suffix="_mask",
                        mapping={"0": 0, "1": 1, "2": 1, "255": 255}, name="mine")
    assert ds.name == "mine" and len(ds) == 1
    np.testing.assert_array_equal(ds[0]["label"], np.resize(np.array([0, 1, 1, 255], np.uint8), (12, 16)))


def _ra21(tmp_path: Path) -> Path:
    base = tmp_path / "Validation_Dataset/RoadAnomaly21"
    _img(base / "images/a.png")
    _lab(base / "labels_masks/a.png", np.zeros((12, 16)))
    return base


def test_image_without_label(tmp_path):
    base = _ra21(tmp_path)
    orphan = base / "images/b.png"
    _img(orphan)
    with pytest.raises(DataError, match="image has no label file") as e:
        create_dataset("road_anomaly_21", root=tmp_path)
    assert e.value.path == str(orphan)
    lenient = create_dataset("road_anomaly_21", root=tmp_path, strict=False)
    assert [r.id for r in lenient.samples] == ["a"] and [err.path for err in lenient.errors] == [str(orphan)]


def test_label_without_image(tmp_path):
    base = _ra21(tmp_path)
    orphan = base / "labels_masks/c.png"
    _lab(orphan, np.zeros((12, 16)))
    with pytest.raises(DataError, match="label has no image") as e:
        create_dataset("road_anomaly_21", root=tmp_path)
    assert e.value.path == str(orphan) and str(orphan) in str(e.value)


def test_cityscapes_orphans(tmp_path):
    _cityscapes(tmp_path)
    lab = tmp_path / "cityscapes/gtFine/val/aachen/aachen_000001_000019_gtFine_labelIds.png"
    _lab(lab, np.zeros((12, 16)))
    img = tmp_path / "cityscapes/leftImg8bit/val/bonn/bonn_000000_000019_leftImg8bit.png"
    _img(img)
    ds = create_dataset("cityscapes", root=tmp_path, strict=False)
    assert len(ds) == 1 and sorted(e.path for e in ds.errors) == sorted([str(lab), str(img)])
    with pytest.raises(DataError):
        create_dataset("cityscapes", root=tmp_path)


def test_size_mismatch(tmp_path):
    base = _ra21(tmp_path)
    _lab(base / "labels_masks/a.png", np.zeros((10, 16)))
    ds = create_dataset("road_anomaly_21", root=tmp_path)
    with pytest.raises(DataError, match="size") as e:
        ds[0]
    assert e.value.path == str(base / "labels_masks/a.png")


@pytest.mark.parametrize("name,folder,bad", [("road_anomaly_21", "RoadAnomaly21", 3),
                                             ("road_anomaly", "RoadAnomaly", 1)])
def test_values_outside_convention(tmp_path, name, folder, bad):
    base = tmp_path / "Validation_Dataset" / folder
    _img(base / "images/a.jpg")
    lab = np.zeros((12, 16))
    lab[3, 3] = bad
    _lab(base / "labels_masks/a.png", lab)
    with pytest.raises(DataError, match=rf"values \[{bad}\] outside") as e:
        create_dataset(name, root=tmp_path)[0]
    assert e.value.path.endswith("labels_masks/a.png")


def test_rgb_label_with_differing_channels(tmp_path):
    base = _ra21(tmp_path)
    Image.fromarray(np.dstack([np.zeros((12, 16)), np.ones((12, 16)), np.zeros((12, 16))]).astype(np.uint8)).save(
        base / "labels_masks/a.png")
    with pytest.raises(DataError, match="single-channel"):
        create_dataset("road_anomaly_21", root=tmp_path)[0]


@pytest.mark.parametrize("which", ["image", "label"])
def test_corrupt_files(tmp_path, which):
    base = _ra21(tmp_path)
    target = base / ("images/a.png" if which == "image" else "labels_masks/a.png")
    target.write_bytes(target.read_bytes()[:40])  # truncated PNG
    ds = create_dataset("road_anomaly_21", root=tmp_path)
    with pytest.raises(DataError, match="corrupt") as e:
        ds[0]
    assert e.value.path == str(target)


def test_empty_and_missing_root(tmp_path, monkeypatch):
    (tmp_path / "Validation_Dataset/RoadAnomaly21/images").mkdir(parents=True)
    with pytest.raises(DataError, match="no images") as e:
        create_dataset("road_anomaly_21", root=tmp_path)
    assert "RoadAnomaly21/images" in str(e.value)
    assert create_dataset("road_anomaly_21", root=tmp_path, strict=False).errors
    with pytest.raises(DataError, match="does not exist"):
        create_dataset("fs_static", root=tmp_path / "missing")
    with pytest.raises(DataError, match="no \\*_leftImg8bit.png"):
        (tmp_path / "cityscapes/leftImg8bit/val").mkdir(parents=True)
        create_dataset("cityscapes", root=tmp_path)
    monkeypatch.delenv("OODSEG_DATA", raising=False)
    with pytest.raises(DataError, match="OODSEG_DATA"):
        create_dataset("road_anomaly")


def test_datasets_and_refs_pickle(tmp_path):
    _ra21(tmp_path)
    ds = create_dataset("road_anomaly_21", root=tmp_path)
    ref = ds.samples[0]
    assert isinstance(ref, SampleRef) and pickle.loads(pickle.dumps(ref)) == ref
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2.load(ref)["label"], ds[0]["label"])
    err = pickle.loads(pickle.dumps(DataError("x.png", "bad")))
    assert (err.path, err.problem, str(err)) == ("x.png", "bad", "x.png: bad")
