"""S2M's validation release as datasets (its ``val/`` layout, listing, pairing and label reading as
``datasets/validation/val_score.py`` does them, on small files written in exactly that layout), its saved maps
through ``arch: precomputed``, and ``configs/s2m_released.yaml`` passing the benchmark's pre-Ray checks with its paths
replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodseg.data import DataError, create_dataset, dataset_info
from oodseg.models import ImageSource, create_model

H, W = 24, 32
#: set → (folder under val/, image files in S2M's names (written in this order), label files, score files)
FILES = {
    "s2m_fs_static": ("fishyscapes/Static", ["image_12.png", "image_3.png"], ["image_12.png", "image_3.png"],
                      ["12.npz", "3.npz"]),
    "s2m_fs_lost_found": ("fishyscapes/LostAndFound", ["image_0.png"], ["image_0.png"], ["0.npz"]),
    "s2m_road_anomaly_21": ("segment_me/dataset_AnomalyTrack", ["validation0002.jpg", "validation0001.jpg"],
                            ["validation0002_labels_semantic.png", "validation0001_labels_semantic.png"],
                            ["0.npz", "1.npz"]),
    "s2m_road_obstacle_21": ("segment_me/dataset_ObstacleTrack", ["validation_10.webp", "validation_2.webp"],
                             ["validation_10_labels_semantic.png", "validation_2_labels_semantic.png"],
                             ["0.npz", "1.npz"]),
    "s2m_road_anomaly": ("road_anomaly", ["b_sheep.jpg", "a_cow.jpg"], ["b_sheep.png", "a_cow.png"],
                         ["0.npz", "1.npz"]),
}
#: set → the expected (sample id, image name) order: FS by the score file's number, SMIYC RA-21 / Road Anomaly by
#: name, RO-21 by the number in validation_<d>.webp; score/<i>.npz belongs to the i-th
ORDER = {
    "s2m_fs_static": [("3", "image_3.png"), ("12", "image_12.png")],
    "s2m_fs_lost_found": [("0", "image_0.png")],
    "s2m_road_anomaly_21": [("0", "validation0001.jpg"), ("1", "validation0002.jpg")],
    "s2m_road_obstacle_21": [("0", "validation_2.webp"), ("1", "validation_10.webp")],
    "s2m_road_anomaly": [("0", "a_cow.jpg"), ("1", "b_sheep.jpg")],
}


def image_dir(name: str) -> str:
    return "original" if name.startswith("s2m_fs") or name == "s2m_road_anomaly" else "images"


def label_dir(name: str) -> str:
    return "labels" if name.startswith("s2m_fs") or name == "s2m_road_anomaly" else "labels_masks"


def anomaly_box(key: str) -> tuple[slice, slice]:
    """A distinct anomaly square per image (from its name), so a mis-paired map shows."""
    k = sum(map(ord, key)) % 12
    return slice(2 + k // 2, 8 + k // 2), slice(4 + k, 12 + k)


def write_s2m_val(root: Path) -> Path:
    """``root/val`` in S2M's layout: RGB images, raw labels (0 / 1 anomaly / 2 / 255; S2M reads only 1 as anomaly),
    SMIYC ``_color`` label files (skipped by S2M), and per image a ``score/<id>.npz`` (key ``arr_0``) that is 0.875
    on its anomaly square and 0.125 elsewhere."""
    rng = np.random.default_rng(0)
    for name, (sub, images, labels, _) in FILES.items():
        base = root / "val" / sub
        for d in (image_dir(name), label_dir(name), "score"):
            (base / d).mkdir(parents=True, exist_ok=True)
        for img, lab in zip(images, labels):
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(base / image_dir(name) / img)
            raw = np.zeros((H, W), np.uint8)
            raw[-3:] = 255
            raw[-6:-3, :4] = 2
            raw[anomaly_box(img)] = 1
            Image.fromarray(raw).save(base / label_dir(name) / lab)
            if label_dir(name) == "labels_masks":
                Image.fromarray(raw * 100).save(base / "labels_masks" / lab.replace(".png", "_color.png"))
        for sample_id, img in ORDER[name]:
            score = np.full((H, W), 0.125, np.float32)  # fp16-exact values: the component pass reads fp16 maps
            score[anomaly_box(img)] = 0.875
            np.savez(base / "score" / f"{sample_id}.npz", score)
    return root / "val"


@pytest.fixture(scope="module")
def s2m_val(tmp_path_factory) -> Path:
    return write_s2m_val(tmp_path_factory.mktemp("s2m"))


@pytest.mark.parametrize("name", list(FILES))
def test_s2m_sets_list_pair_and_read_labels_as_s2m(s2m_val, name):
    for root in (s2m_val.parent, s2m_val, s2m_val / FILES[name][0]):  # parent of val/, val/ or the set itself
        ds = create_dataset(name, root=str(root))
        assert [(r.id, Path(r.image_path).name) for r in ds.samples] == ORDER[name]
    info = dataset_info(name)
    assert info.kind == "anomaly" and info.track == ("obstacle" if name == "s2m_road_obstacle_21" else "anomaly")
    for ref in ds.samples:
        sample = ds.load(ref)
        want = np.zeros((H, W), np.uint8)  # 1 → anomaly, 255 → void, 0 and 2 → not anomaly
        want[-3:] = 255
        want[anomaly_box(Path(ref.image_path).name)] = 1
        np.testing.assert_array_equal(sample["label"], want)
        assert sample["image"].shape == (H, W, 3)
        # the released map of this sample (score/<id>.npz) is the one made for its image
        model = create_model("precomputed", folder=str(Path(ds.root) / "score"), pattern="{id}.npz")
        src = ImageSource(name, ref.id, ref.image_path)
        scores = model.predict(torch.from_numpy(sample["image"][None]), sources=[src]).scores[0].numpy()
        np.testing.assert_array_equal(scores > 0.5, want == 1)


def test_s2m_missing_files_are_listing_problems(tmp_path):
    val = write_s2m_val(tmp_path)
    (val / "fishyscapes/Static/original/image_3.png").unlink()
    (val / "road_anomaly/labels/a_cow.png").unlink()
    with pytest.raises(DataError, match=r"image_3.png: image file not found"):
        create_dataset("s2m_fs_static", root=str(tmp_path))
    ds = create_dataset("s2m_road_anomaly", root=str(tmp_path), strict=False)
    assert [r.id for r in ds.samples] == ["1"] and "a_cow.png: label file not found" in str(ds.errors[0])
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataError, match=r"elsewhere/val/fishyscapes/Static: dataset folder not found"):
        create_dataset("s2m_fs_static", root=str(tmp_path / "elsewhere"))


def released_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The shipped config and stand-ins for its two downloads: S2M's detector as released, a detectron2 Faster R-CNN
    ``model_final.pth`` (the tiny config of the same design with ``tests/test_d2_rcnn.py``'s seeded random weights,
    whose outputs match detectron2's), and a tiny random SAM ``.pth`` in segment-anything's format."""
    segment_anything = pytest.importorskip("segment_anything.build_sam")
    from test_d2_rcnn import d2_fixture, write_d2_checkpoint

    detector = write_d2_checkpoint(d2_fixture("tiny"), tmp_path / "model_final.pth")
    sam = tmp_path / "sam_vit_tiny.pth"
    torch.save(segment_anything._build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                                           encoder_global_attn_indexes=[1]).state_dict(), sam)
    return Path(__file__).resolve().parents[1] / "configs" / "s2m_released.yaml", detector, sam


def released_argv(config: Path, val: Path, tmp_path: Path, detector: Path, sam: Path) -> list[str]:
    folders = {name: str(val / sub / "score") for name, (sub, *_rest) in FILES.items()}
    models = ("[{name: s2m-released, arch: precomputed, checkpoint: '', cfg: {pattern: '{id}.npz', folder: {"
              + ", ".join(f"{k}: '{v}'" for k, v in folders.items()) + "}}}]")
    return ["--config", str(config), "--set", f"data_root={val.parent}", "--set", f"results={tmp_path / 'results'}",
            "--set", f"models={models}", "--set", f"refine_cfg.detectors={{precomputed: '{detector}'}}",
            "--set", f"refine_cfg.sam={sam}", "--set", "progress=false"]


def test_s2m_released_config_dry_checks(s2m_val, tmp_path):
    """configs/s2m_released.yaml with its paths replaced (S2M's layout written above, :func:`released_inputs`): it
    parses, and the benchmark's pre-Ray checks pass with one key, ``precomputed``, refined by the detector prompter
    with that SAM, on the five S2M sets."""
    from oodseg.config import parse_config
    from oodseg.platform.benchmark import BenchmarkConfig
    from oodseg.platform.benchmark.prepare import prepare

    config, detector, sam = released_inputs(tmp_path)
    cfg = parse_config(BenchmarkConfig, released_argv(config, s2m_val, tmp_path, detector, sam))
    assert cfg.refine == "s2m" and cfg.refine_cfg.prompter == "detector" and cfg.scorers == ("precomputed",)
    assert [d.name for d in cfg.datasets] == list(FILES)
    plan = prepare(cfg)
    assert {k: len(ds.samples) for k, ds in plan.datasets.items()} == {k: len(v) for k, v in ORDER.items()}
    assert [k.scorer for k in plan.keys["s2m-released"]] == ["precomputed"]
    refine = plan.refine["s2m-released"]
    assert refine["sam"] == str(sam) and refine["prompters"]["precomputed"]["checkpoint"] == str(detector)
    unparsed = parse_config(BenchmarkConfig, ["--config", str(config)])  # as shipped: the documented paths
    assert unparsed.refine_cfg.detectors == {"precomputed": "/data/s2m/model_final.pth"}
    assert unparsed.refine_cfg.sam == "/data/checkpoints/sam_vit_b_01ec64.pth" and unparsed.data_root == "/data/s2m"


def test_s2m_released_config_runs_end_to_end(ray_session, s2m_val, tmp_path):
    """The same config, run on one set (RO-21: positional score ids, obstacle track): the released maps are scored,
    refined by the (random tiny) detectron2-format detector + SAM, and the set gets its ``precomputed`` and
    ``precomputed+s2m`` rows with S2M's IoU / AuIoU / mean F1; the maps here are perfect, so the plain row's AuPRC
    and S2M IoU are 1."""
    from oodseg.config import parse_config
    from oodseg.platform.benchmark import BenchmarkConfig, run_benchmark
    from oodseg.platform.results import ResultsStore

    config, detector, sam = released_inputs(tmp_path)
    name = "s2m_road_obstacle_21"
    argv = released_argv(config, s2m_val, tmp_path, detector, sam) + [
        "--set", f"datasets=[{name}]", "--set", "plots=false", "--set", "read_concurrency=1"]
    run_benchmark(parse_config(BenchmarkConfig, argv))
    metrics = ResultsStore(str(tmp_path / "results")).read("metrics")
    assert set(zip(metrics.dataset, metrics.scorer)) == {(name, "precomputed"), (name, "precomputed+s2m")}
    plain = metrics[metrics.scorer == "precomputed"].iloc[0]
    refined = metrics[metrics.scorer == "precomputed+s2m"].iloc[0]
    assert plain.n_images == refined.n_images == len(ORDER[name]) and plain.n_failures == 0
    assert plain.auprc == pytest.approx(1.0) and plain.s2m_iou == pytest.approx(1.0)
    assert np.isfinite([refined.s2m_iou, refined.s2m_auiou, refined.s2m_mean_f1]).all()
