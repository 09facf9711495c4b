"""The fit stage and the post-hoc scorers in the Ray benchmark, checked against a single-process loop: the fit pass
stores exactly the state one in-process pass over the training split gives, the scores use it, a later run reuses
it, and ``--fit never`` without a stored fit fails before Ray in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from oodseg.config import ConfigError
from oodseg.data import create_dataset
from oodseg.models import create_model, save_safetensors
from oodseg.platform.benchmark import BenchmarkConfig, ModelSpec, run_benchmark
from oodseg.platform.benchmark.fit import load_fit
from oodseg.platform.benchmark.prepare import prepare
from oodseg.platform.results import ResultsStore
from oodseg.scoring import SCORERS, create_fit, create_scorer
from oodseg.scoring.metrics import PixelMetrics

POSTHOC = ("sml", "mahalanobis", "knn", "react", "gen", "odin", "energy")
N = 3  # training and test images, = batch_size: the pipeline and the reference run identical batches


@pytest.fixture(scope="module")
def suite(suite_factory) -> Path:
    return suite_factory(seed=5, size=(48, 96), n_train=N, n_val=1, n_anomaly=N, n_coco=2)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("erfnet", channels=[4, 8, 16], input_size=None)
    return save_safetensors(model, tmp_path_factory.mktemp("model") / "tiny.safetensors")


def config(results: Path, suite: Path, model: Path, **kw) -> BenchmarkConfig:
    base = {"results": str(results), "data_root": str(suite),
            "models": (ModelSpec(name="tiny", checkpoint=str(model)),), "datasets": ("road_anomaly_21",),
            "scorers": POSTHOC, "batch_size": N, "actor_num_cpus": 1.0, "read_num_cpus": 0.5, "read_concurrency": 1,
            "component_metrics": False, "plots": False, "progress": False, "fit_cfg": {"feature_bank": {"cap": 100}}}
    base.update(kw)
    return BenchmarkConfig(**base)


def reference_fits(suite: Path, model_path: Path) -> tuple[object, dict]:
    torch.set_num_threads(1)
    model = create_model(checkpoint=model_path).eval()
    ds = create_dataset("cityscapes", root=str(suite), split="train")
    samples = [ds.load(r) for r in ds.samples]
    with torch.inference_mode():
        out = model.predict(torch.from_numpy(np.stack([s["image"] for s in samples])), features=True)
    cfgs = {"max_logit_stats": {}, "class_gaussians": {"num_classes": 19}, "activation_histogram": {},
            "feature_bank": {"num_classes": 19, "cap": 100, "seed": 0}}
    labels = np.stack([s["label"] for s in samples])
    return model, {n: create_fit(n, **c).update(out, labels, [r.id for r in ds.samples]) for n, c in cfgs.items()}


def test_fit_stage_scores_and_reuse(ray_session, suite, model_file, tmp_path):
    results = tmp_path / "results"
    run_id = run_benchmark(config(results, suite, model_file, run_id="fit1"))
    store = ResultsStore(str(results))
    runs = store.read("runs")
    fit_rows = runs[runs.job == "fit"]
    assert list(fit_rows.status) == ["finished"] and fit_rows.run_id.iloc[0].startswith("fit1")
    paths = {n: p.with_suffix("").relative_to(results).as_posix() for p in (results / "fits").rglob("*.npz")
             for n in [p.stem]}
    assert set(paths) == {"max_logit_stats", "class_gaussians", "activation_histogram", "feature_bank"}
    model, ref = reference_fits(suite, model_file)
    for name, path in paths.items():  # the Ray pass stored what one in-process pass gives, bit for bit
        got, want = load_fit(str(results), path, name).state_dict(), ref[name].state_dict()
        assert got["config"] == want["config"]
        for key in want["state"]:
            assert np.array_equal(np.asarray(got["state"][key]), np.asarray(want["state"][key])), (name, key)
        meta = json.loads((results / f"{path}.json").read_text())
        assert meta["n_images"] == N and meta["fingerprint"]["fit"] == name
    rows = store.read("metrics")
    rows = rows[rows.run_id == run_id].set_index("scorer")
    assert set(rows.index) == set(POSTHOC)
    ds = create_dataset("road_anomaly_21", root=str(suite))
    samples = [ds.load(r) for r in ds.samples]
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))
    with torch.inference_mode():
        out = model.predict(images, features=True)
    for name in POSTHOC:  # the reference: the same scorers with the in-process fits, one metric object
        fit = SCORERS.meta(name)["fit"]
        maps = create_scorer(name, fit=ref.get(fit))(out, samples[0]["label"].shape, model=model, images=images)
        pm = PixelMetrics()
        for m, s in zip(maps.numpy(), samples):
            pm.update(m, s["label"])
        want = pm.compute()["auprc"]
        assert math.isclose(rows.loc[name, "auprc"], want, rel_tol=1e-6), (name, rows.loc[name, "auprc"], want)
    run_benchmark(config(results, suite, model_file, run_id="fit2", scorers=("knn", "sml")))
    runs = store.read("runs")
    assert len(runs[runs.job == "fit"]) == 1  # reused, not fitted again


def test_missing_fit_with_fit_never_fails_before_ray(suite, model_file, tmp_path):
    with pytest.raises(ConfigError, match=r"--scorers .*knn.*no stored fit.*python jobs/benchmark.py --fit missing"):
        prepare(config(tmp_path / "results", suite, model_file, fit="never", scorers=("knn", "msp")))
