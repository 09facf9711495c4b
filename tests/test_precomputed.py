"""Saved score maps as a model (``arch: precomputed``): the four file formats read back the map they were written
with, bad files are per-image ``SourceError``s naming the file, bad config is one line before Ray, and a folder of
``.npz`` maps made from a real model's scores benchmarks to the same pixel / component / S2M metrics as that model,
with a ``failures`` row for each missing or mis-sized map and every other image scored."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodseg.config import ConfigError
from oodseg.data import create_dataset
from oodseg.models import ImageSource, SourceError, create_model
from oodseg.outputs import ScoreMaps
from oodseg.scoring import create_scorer, default_scorers
from oodseg.scoring.metrics import PixelMetrics

MAP = np.linspace(-2.5, 7.0, 4 * 6, dtype=np.float32).reshape(4, 6)
IMAGES = torch.zeros(2, 4, 6, 3, dtype=torch.uint8)


def sources(*stems: str, dataset: str = "set") -> list[ImageSource]:
    return [ImageSource(dataset, f"id{i}", f"/data/{dataset}/images/{s}.png") for i, s in enumerate(stems)]


def test_npz_npy_and_16bit_png_read_back(tmp_path):
    np.savez(tmp_path / "a.npz", MAP)  # S2M's release: np.savez → key arr_0
    np.savez(tmp_path / "b.npz", MAP[None] * 2)  # a leading singleton dimension is accepted
    model = create_model("precomputed", folder=str(tmp_path))
    out = model.predict(IMAGES, sources=sources("a", "b"))
    assert isinstance(out, ScoreMaps) and out.size == (4, 6)
    np.testing.assert_array_equal(out.scores.numpy(), np.stack([MAP, MAP * 2]))
    torch.testing.assert_close(create_scorer("precomputed")(out, size=(4, 6)), out.scores, rtol=0, atol=0)
    assert default_scorers("score") == ["precomputed"] and "precomputed" not in default_scorers()

    np.save(tmp_path / "id0.npy", MAP)
    np.save(tmp_path / "id1.npy", -MAP)
    out = create_model("precomputed", folder=str(tmp_path), pattern="{id}.npy").predict(IMAGES, sources=sources("x", "y"))
    np.testing.assert_array_equal(out.scores.numpy(), np.stack([MAP, -MAP]))

    raw = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2700)
    for stem in ("a", "b"):
        Image.fromarray(raw).save(tmp_path / f"{stem}.png")  # mode I;16
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    out = create_model("precomputed", folder=str(tmp_path), pattern="{stem}.png", scale=0.5).predict(
        IMAGES, sources=sources("a", "b"))
    np.testing.assert_allclose(out.scores[0].numpy(), raw * 0.5)
    out = create_model("precomputed", folder=str(tmp_path), format="png").predict(IMAGES, sources=sources("a", "b"))
    np.testing.assert_allclose(out.scores[1].numpy(), raw / 65535, rtol=1e-6)


def test_smiyc_hdf5_submission(tmp_path):
    """road-anomaly-benchmark's ``save_output``: float16 map in HDF5 dataset ``value``, gzip 9, file ``<fid>.hdf5``
    under ``anomaly_p/<method>/<dataset>/`` (fid = image stem)."""
    h5py = pytest.importorskip("h5py")
    folder = tmp_path / "anomaly_p" / "Mine" / "{dataset}"
    for stem in ("a", "b"):
        path = tmp_path / "anomaly_p" / "Mine" / "AnomalyTrack-validation" / f"{stem}.hdf5"
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("value", data=MAP.astype(np.float16), compression=9)
    model = create_model("precomputed", folder=str(folder), format="smiyc")
    out = model.predict(IMAGES, sources=sources("a", "b", dataset="AnomalyTrack-validation"))
    np.testing.assert_array_equal(out.scores[0].numpy(), MAP.astype(np.float16).astype(np.float32))


def test_bad_maps_are_per_image_errors_naming_the_file(tmp_path):
    np.savez(tmp_path / "good.npz", MAP)
    np.savez(tmp_path / "small.npz", MAP[:3])
    bad = MAP.copy()
    bad[1, 2], bad[0, 0] = np.nan, np.inf
    np.savez(tmp_path / "nan.npz", bad)
    np.savez(tmp_path / "other.npz", scores=MAP)
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip")
    model = create_model("precomputed", folder=str(tmp_path))
    stems = ("good", "missing", "small", "nan", "other", "corrupt")
    with pytest.raises(SourceError) as e:
        model.predict(torch.zeros(6, 4, 6, 3, dtype=torch.uint8), sources=sources(*stems))
    failed = e.value.failed
    assert sorted(failed) == [1, 2, 3, 4, 5]
    for i, (file, msg) in failed.items():
        assert file == str(tmp_path / f"{stems[i]}.npz") and msg.startswith(file) and "\n" not in msg
    assert "not found" in failed[1][1] and "3×6, its image 4×6" in failed[2][1]
    assert "2 NaN/inf pixels" in failed[3][1] and "no array 'arr_0' (has scores)" in failed[4][1]
    assert "unreadable npz" in failed[5][1]


def test_folder_per_dataset(tmp_path):
    for key in ("fs", "ra"):
        (tmp_path / key).mkdir()
        np.savez(tmp_path / key / "a.npz", MAP if key == "fs" else -MAP)
    model = create_model("precomputed", folder={"fs": str(tmp_path / "fs"), "ra": str(tmp_path / "ra")})
    out = model.predict(IMAGES[:1], sources=sources("a", dataset="ra"))
    np.testing.assert_array_equal(out.scores[0].numpy(), -MAP)
    model.check_sources(["fs", "ra"])
    with pytest.raises(ValueError, match="no entry for dataset.s. other"):
        model.check_sources(["fs", "other"])
    templ = create_model("precomputed", folder=str(tmp_path / "{dataset}"))
    assert templ.path_of(sources("a", dataset="fs")[0]) == tmp_path / "fs" / "a.npz"


@pytest.mark.parametrize("cfg, match", [
    ({"folder": "/nonexistent/maps"}, "folder /nonexistent/maps: /nonexistent/maps is not a directory"),
    ({"pattern": "{stem}.tiff"}, "unknown format '.tiff'"),
    ({"format": "jpeg"}, "unknown format 'jpeg'"),
    ({"pattern": "{name}.npz"}, r"must name the image by \{stem\} or \{id\}"),
    ({"scale": 0}, "scale must be > 0"),
])
def test_bad_config_is_one_line(tmp_path, cfg, match):
    with pytest.raises(ValueError, match=match):
        create_model("precomputed", **{"folder": str(tmp_path), **cfg})


def scores_of(model: torch.nn.Module, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    with torch.inference_mode():
        return create_scorer("msp")(model.predict(torch.from_numpy(image[None])), size=size)[0].numpy()


def test_bad_benchmark_config_fails_before_ray(tiny_suite, tmp_path):
    from oodseg.platform.benchmark import BenchmarkConfig, ModelSpec
    from oodseg.platform.benchmark.config import RefineSpec
    from oodseg.platform.benchmark.prepare import prepare

    def cfg(model_cfg, checkpoint="", datasets=("road_anomaly_21",)):
        return BenchmarkConfig(results=str(tmp_path / "r"), data_root=str(tiny_suite), datasets=datasets,
                               models=(ModelSpec(name="saved", arch="precomputed", checkpoint=checkpoint,
                                                 cfg=model_cfg),), progress=False)

    with pytest.raises(ConfigError, match="models: 'saved': precomputed: folder /nope"):
        prepare(cfg({"folder": "/nope"}))
    with pytest.raises(ConfigError, match="unknown format '.jpg'"):
        prepare(cfg({"folder": str(tmp_path), "pattern": "{stem}.jpg"}))
    with pytest.raises(ConfigError, match="drop semantic dataset.s. cityscapes"):
        prepare(cfg({"folder": str(tmp_path)}, datasets=("road_anomaly_21", "cityscapes")))
    with pytest.raises(ConfigError, match="no entry for dataset.s. road_anomaly_21"):
        prepare(cfg({"folder": {"fs_static": str(tmp_path)}}))
    with pytest.raises(ConfigError, match="takes no checkpoint"):
        prepare(cfg({"folder": str(tmp_path)}, checkpoint="model.safetensors"))
    plan = prepare(cfg({"folder": str(tmp_path)}, checkpoint="demo"))  # the ModelSpec default: not a checkpoint
    assert plan.checkpoints["saved"] is None and [k.scorer for k in plan.keys["saved"]] == ["precomputed"]
    with pytest.raises(ConfigError, match="no detector for scorer 'precomputed' of model 'saved'"):
        prepare(replace(cfg({"folder": str(tmp_path)}, checkpoint="demo"), refine="s2m",  # no demo detector
                        refine_cfg=RefineSpec(sam="tiny", scorers=("precomputed",))))
    plan = prepare(replace(cfg({"folder": str(tmp_path)}), temperatures=(1.0, 2.0)))  # no temperature applies
    assert [(k.scorer, k.temperature) for k in plan.keys["saved"]] == [("precomputed", 1.0)]


def test_saved_maps_benchmark_like_the_model(ray_session, tiny_suite, tiny_erfnet, tmp_path):
    """msp maps of the tiny ERFNet saved as S2M-style ``.npz`` (key arr_0): on a set with every map the
    precomputed model's pixel, component and S2M metrics equal the ERFNet's msp row; on the other sets one map is
    missing / mis-sized: a ``failures`` row naming it, and the remaining image scored."""
    from oodseg.platform.benchmark import BenchmarkConfig, ModelSpec, run_benchmark
    from oodseg.platform.results import ResultsStore

    model = create_model(checkpoint=tiny_erfnet).eval()
    maps = tmp_path / "maps"  # one folder per dataset: the synthetic sets share image stems
    sets = ("road_anomaly_21", "fs_static", "road_anomaly")
    bad = {"fs_static": "missing", "road_anomaly": "small"}
    broken = {}
    for name in sets:
        ds = create_dataset(name, root=str(tiny_suite))
        (maps / name).mkdir(parents=True)
        for i, ref in enumerate(ds.samples):
            sample = ds.load(ref)
            score = scores_of(model, sample["image"], sample["label"].shape)
            stem = Path(ref.image_path).stem
            if i == 0 and name in bad:
                broken[name] = str(maps / name / f"{stem}.npz")
                if bad[name] == "missing":
                    continue
                score = score[:-1]
            np.savez(maps / name / f"{stem}.npz", score)
    cfg = BenchmarkConfig(
        results=str(tmp_path / "results"), data_root=str(tiny_suite), datasets=sets, scorers=("msp", "precomputed"),
        models=(ModelSpec(name="tiny", checkpoint=str(tiny_erfnet)),
                ModelSpec(name="saved", arch="precomputed", checkpoint="", cfg={"folder": str(maps / "{dataset}")})),
        batch_size=2, read_concurrency=1, plots=False, progress=False)
    run_benchmark(cfg)
    store = ResultsStore(str(tmp_path / "results"))
    metrics = store.read("metrics")
    rows = metrics[metrics.stage == "score"] if "stage" in metrics else metrics
    tiny = rows[(rows.model == "tiny") & (rows.dataset == "road_anomaly_21")].iloc[0]
    saved = rows[(rows.model == "saved") & (rows.dataset == "road_anomaly_21")].iloc[0]
    assert saved.scorer == "precomputed" and saved.n_images == 2 and saved.n_failures == 0
    pm = PixelMetrics()  # the saved maps, measured in-process: the same pixel numbers exactly
    ds = create_dataset("road_anomaly_21", root=str(tiny_suite))
    for ref in ds.samples:
        pm.update(np.load(maps / "road_anomaly_21" / f"{Path(ref.image_path).stem}.npz")["arr_0"], ds.load(ref)["label"])
    want = pm.compute()
    for col in ("auprc", "fpr95", "auroc", "best_f1", "auprc_smiyc"):
        assert saved[col] == want[col], col
    # the model's own row: equal up to the float noise of batch-of-2 vs one-image forward passes
    for col in ("auprc", "fpr95", "auroc", "best_f1", "siou", "ppv", "mean_f1", "s2m_iou", "s2m_auiou",
                "s2m_mean_f1", "auprc_smiyc", "siou_smiyc"):
        assert saved[col] == pytest.approx(tiny[col], abs=1e-4), col
    assert np.isfinite(saved[["auprc", "siou", "s2m_iou"]].astype(float)).all()
    failures = store.read("failures")
    failures = failures[failures.model == "saved"]
    assert sorted(failures.file) == sorted(broken.values())
    assert all(e.startswith(f) for e, f in zip(failures.error, failures.file))
    for name in bad:
        row = rows[(rows.model == "saved") & (rows.dataset == name)].iloc[0]
        assert (row.n_images, row.n_failures) == (1, 1) and np.isfinite(row.auroc)


def test_smiyc_format_without_h5py_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # as on a machine without h5py
    with pytest.raises(ValueError, match=r"format smiyc \(.hdf5\) needs h5py: pip install h5py"):
        create_model("precomputed", folder=str(tmp_path), pattern="{stem}.hdf5")
