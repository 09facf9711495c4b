"""Synthetic suite: the readers and pycocotools load it unchanged; counts, formats, label values, instance ids,
determinism, and the OE objects' independence from the test anomalies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodseg.data import cityscapes_id_to_train_id, create_dataset
from oodseg.data import synthetic as syn
from oodseg.data.instances import CityscapesInstances
from oodseg.data.synthetic import suite as suite_module

SMALL = dict(size=(96, 192), n_train=6, n_val=3, n_anomaly=5, n_coco=4)
SETS = {"road_anomaly_21": ("RoadAnomaly21", "PNG"), "road_obstacle_21": ("RoadObsticle21", "WEBP"),
        "fs_lost_found": ("FS_LostFound_full", "PNG"), "fs_static": ("fs_static", "JPEG"),
        "road_anomaly": ("RoadAnomaly", "JPEG")}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return syn.build_suite(tmp_path_factory.mktemp("suite") / "s", seed=3, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != syn.MARKER}


def test_cityscapes_splits_load_with_official_ids(suite):
    for split, n, cities in (("train", 6, {"synthtown", "synthville"}), ("val", 3, {"synthburg"})):
        ds = create_dataset("cityscapes", root=suite, split=split)
        assert len(ds) == n and not ds.errors
        assert {Path(r.image_path).parent.name for r in ds.samples} == cities
        seen: set[int] = set()
        for s in ds:
            assert s["image"].shape == (96, 192, 3) and s["label"].shape == (96, 192)
            seen |= set(np.unique(s["label"]).tolist())
        assert seen <= set(range(19)) | {255}
        # raw files hold Cityscapes labelIds (road=7, sidewalk=8, sky=23), not trainIds
        raw = np.asarray(Image.open(ds.samples[0].label_path))
        assert {7, 8, 23} <= set(np.unique(raw).tolist())
    name = Path(ds.samples[0].image_path).name
    assert name.startswith("synthburg_") and len(name.split("_")[1]) == 6 and len(name.split("_")[2]) == 6


def test_instance_ids_decode_and_agree_with_label_ids(suite):
    """Every frame has a 16-bit instanceIds map in the official encoding: labelId·1000 + k on person / car pixels,
    the plain labelId elsewhere; ``oodseg.data.instances`` decodes it into masks that partition the evaluated
    pixels with the trainIds of the labelIds file."""
    lut = np.full(256, 255, np.int64)
    for label_id, train_id in cityscapes_id_to_train_id().items():
        lut[label_id] = train_id
    objects = 0
    for split, n in (("train", 6), ("val", 3)):
        ds = CityscapesInstances(suite, split=split)
        assert len(ds) == n and not ds.errors
        for ref in ds.samples:
            with Image.open(ref.label_path) as im:
                assert im.format == "PNG" and im.mode == "I;16"
                raw = np.asarray(im).astype(np.int64)
            label_ids = np.asarray(Image.open(ref.label_path.replace("_instanceIds", "_labelIds"))).astype(np.int64)
            things = np.isin(label_ids, [24, 26])  # person, car: the suite's classes with instances
            np.testing.assert_array_equal(raw[~things], label_ids[~things])
            assert (raw[things] >= 1000).all()
            np.testing.assert_array_equal(raw[things] // 1000, label_ids[things])
            sample = ds.load(ref)
            cover = sample.masks.sum(0)
            train = lut[label_ids]
            assert (cover[train != 255] == 1).all() and (cover[train == 255] == 0).all()
            decoded = np.tensordot(sample.classes, sample.masks.astype(np.int64), 1)
            np.testing.assert_array_equal(decoded[train != 255], train[train != 255])
            ids = np.unique(raw[raw >= 1000])
            assert len(ids) == int((sample.classes >= 11).sum())  # one mask per object (persons 11, cars 13)
            objects += len(ids)
    assert objects >= 9  # the frames do hold several objects


@pytest.mark.parametrize("name", list(SETS))
def test_anomaly_sets_load(suite, name):
    folder, fmt = SETS[name]
    ds = create_dataset(name, root=suite)
    assert len(ds) == SMALL["n_anomaly"] and not ds.errors
    fractions = []
    for i, s in enumerate(ds):
        assert Image.open(s["image_path"]).format == fmt
        assert Path(s["label_path"]).stem == Path(s["image_path"]).stem
        assert set(np.unique(s["label"]).tolist()) <= {0, 1, 255}
        n_anom = int((s["label"] == 1).sum())
        smiyc = name in ("road_anomaly_21", "road_obstacle_21")
        assert (n_anom == 0) == (smiyc and i % 5 == 4)  # SMIYC sets: every 5th frame has no anomaly
        fractions.append(n_anom / s["label"].size)
    assert max(fractions) < (0.02 if name == "road_obstacle_21" else 0.4)
    if name == "road_anomaly":  # stored as 2 on disk, read as 1
        raw = np.asarray(Image.open(ds.samples[0].label_path))
        assert 2 in raw and 1 not in raw
    if name == "road_obstacle_21":  # off-road pixels are void in the obstacle track
        assert all((s["label"] == 255).mean() > 0.3 for s in ds)


def test_coco_json_loads_with_pycocotools(suite):
    from pycocotools.coco import COCO

    coco = COCO(str(suite / "coco/annotations/instances_train2017.json"))
    names = {c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert {"person", "car", "elephant", "kite"} <= names
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns and {type(a["segmentation"]).__name__ for a in anns} == {"list", "dict"}  # polygons and RLE
    for a in anns:
        info = coco.loadImgs(a["image_id"])[0]
        assert (suite / "coco/train2017" / info["file_name"]).is_file()
        m = coco.annToMask(a)
        assert m.shape == (info["height"], info["width"])
        assert abs(int(m.sum()) - a["area"]) <= 0.15 * a["area"] + 10  # polygon raster vs PIL raster
    # the OE reader drops the excluded categories that the file does contain
    from oodseg.data.coco import DEFAULT_EXCLUDE, CocoObjects

    objects = CocoObjects(suite, min_area=0, min_side=0)
    assert objects.categories and not set(objects.categories) & set(DEFAULT_EXCLUDE)
    assert len(objects) == sum(coco.loadCats(a["category_id"])[0]["name"] not in DEFAULT_EXCLUDE for a in anns)


def test_oe_objects_are_not_test_anomalies(suite):
    """No leakage: test-anomaly pixels are drawn from the saturated hue table (up to their 0.8–1.0 brightness factor,
    sensor noise and ramps), the OE objects' pixels are not (smooth random colours from another generator)."""
    from pycocotools.coco import COCO

    from oodseg.data.synthetic.anomalies import HUES

    table = np.concatenate([HUES * f for f in (0.8, 0.9, 1.0)])

    def distance(px: np.ndarray) -> np.ndarray:  # to the nearest table colour, per pixel
        return np.sqrt(((px[:, None, :].astype(np.float64) - table[None]) ** 2).sum(-1)).min(1)

    ds = create_dataset("road_anomaly_21", root=suite)
    anomaly = distance(np.concatenate([s["image"][s["label"] == 1] for s in ds]))
    coco = COCO(str(suite / "coco/annotations/instances_train2017.json"))
    objects = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        info = coco.loadImgs(ann["image_id"])[0]
        image = np.asarray(Image.open(suite / "coco/train2017" / info["file_name"]))
        objects.append(image[coco.annToMask(ann).astype(bool)])
    oe = distance(np.concatenate(objects))
    assert np.median(anomaly) < 30 and (anomaly < 60).mean() > 0.8
    assert np.median(oe) > 60


def test_deterministic_and_seed_dependent(suite, tmp_path):
    again = _files(syn.build_suite(tmp_path / "again", seed=3, workers=2, **SMALL))  # parallel == serial
    assert again == _files(suite)
    other = _files(syn.build_suite(tmp_path / "other", seed=4, **SMALL))
    assert other.keys() == again.keys()
    assert all(other[k] != again[k] for k in again if "gtFine" in k)
    masks = [k for k in again if "labels_masks" in k]  # frames without anomaly and hood are all-zero in both
    assert sum(other[k] != again[k] for k in masks) >= 0.8 * len(masks)


def test_ensure_suite_builds_once_and_atomically(tmp_path, monkeypatch):
    kw = dict(size=(64, 128), n_train=2, n_val=1, n_anomaly=1, n_coco=1)
    root = syn.ensure_suite(tmp_path / "cache", seed=0, **kw)
    marker = root / syn.MARKER
    stamp = marker.stat().st_mtime_ns
    assert syn.ensure_suite(tmp_path / "cache", seed=0, **kw) == root and marker.stat().st_mtime_ns == stamp
    assert json.loads(marker.read_text())["seed"] == 0
    syn.ensure_suite(tmp_path / "cache", seed=1, **kw)  # other params: stale suite replaced
    assert json.loads(marker.read_text())["seed"] == 1

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(suite_module, "write_coco", boom)
    with pytest.raises(KeyboardInterrupt):
        syn.ensure_suite(tmp_path / "killed", seed=0, **kw)
    assert not (tmp_path / "killed").exists() and not list(tmp_path.glob(".killed*"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign/user.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        syn.ensure_suite(tmp_path / "foreign", seed=0, **kw)
    assert (tmp_path / "foreign/user.txt").exists()


def test_cli(tmp_path):
    out = tmp_path / "cli"
    assert syn.main(["--out", str(out), "--seed", "2", "--size", "64", "128", "--n-train", "2", "--n-val", "1",
                     "--n-anomaly", "1", "--n-coco", "1"]) == 0
    assert len(create_dataset("cityscapes", root=out, split="train")) == 2
    assert len(create_dataset("fs_static", root=out)) == 1
