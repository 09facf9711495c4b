"""Temperature search on cached outputs: cache created once and reused, no forward pass during the search, every
trial's metric equal to an independent reference (MSP from torch softmax + sklearn), best T ≥ the grid rows.

The reference recomputes each trial's score from the cached fp16 logits with plain torch (bilinear upsampling to the
label size, ``softmax(logits / T)``, anomaly score ``1 − max``) and sklearn's ``average_precision_score`` /
``roc_curve``: it shares neither the scorer nor the histogram metric with the code under test.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_curve

from oodseg.models import create_model, save_safetensors
from oodseg.models.erfnet import ERFNet
from oodseg.platform.benchmark import ModelSpec, driver
from oodseg.platform.cache import ShardCache
from oodseg.platform.output_cache import CachedSet, evaluate_temperature, find_source_run
from oodseg.platform.results import ResultsStore
from oodseg.platform.tuning.temperature import TemperatureSearchConfig, format_result, run_temperature_search
from oodseg.scoring.metrics import PixelMetrics, float32_keys, keys_to_float32

VAL, OTHER = "road_anomaly_21", "fs_static"
GRID = (0.5, 0.75, 1.1)


@pytest.fixture(scope="module")
def suite(suite_factory) -> Path:
    return suite_factory(seed=5, size=(64, 128), n_train=2, n_val=2, n_anomaly=4, n_coco=2)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = create_model("erfnet", channels=[4, 8, 16], input_size=None)
    with torch.no_grad():  # logits with a trained model's spread (std ≈ 3), so T changes the ranking visibly
        for p in model.param_groups()["head"]:
            p.mul_(40.0)
    return save_safetensors(model, tmp_path_factory.mktemp("tune_model") / "tiny.safetensors")


class Calls:
    """Counts (with timestamps) calls of a wrapped function in this process."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def wrap(self, fn):
        def wrapped(*args, **kwargs):
            self.times.append(time.time())
            return fn(*args, **kwargs)

        return wrapped


@pytest.fixture
def forward_calls(monkeypatch) -> Calls:
    calls = Calls()
    monkeypatch.setattr(ERFNet, "forward", calls.wrap(ERFNet.forward))
    monkeypatch.setattr(ERFNet, "predict", calls.wrap(ERFNet.predict))
    return calls


@pytest.fixture
def benchmark_calls(monkeypatch) -> Calls:
    calls = Calls()
    monkeypatch.setattr(driver.BenchmarkRunner, "run", calls.wrap(driver.BenchmarkRunner.run))
    return calls


def make_cfg(results: Path, suite: Path, model: Path, **kw) -> TemperatureSearchConfig:
    base = dict(
        results=str(results), data_root=str(suite), model=ModelSpec(name="tiny", checkpoint=str(model)),
        scorer="msp", val_set=VAL, datasets=(VAL, OTHER), grid=GRID, batch_size=4, trial_cpus=1.0,
        max_concurrent_trials=2,
    )
    base.update(kw)
    return TemperatureSearchConfig(**base)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tune_results")


def reference(store: ResultsStore, run_id: str, dataset: str, temperature: float) -> dict[str, float]:
    """AuPRC / FPR95 of MSP at ``temperature`` on one cached set, computed with torch + sklearn only."""
    scores, labels = [], []
    for item in ShardCache(store.root, run_id, "tiny", dataset, "outputs").items():
        logits = F.interpolate(item.outputs.logits.float(), size=item.label.shape, mode="bilinear",
                               align_corners=False)
        msp = torch.softmax(logits.double() / temperature, dim=1).amax(dim=1)[0].numpy()
        valid = item.label != 255
        scores.append(1.0 - msp[valid])
        labels.append(item.label[valid])
    s, y = np.concatenate(scores).astype(np.float32), np.concatenate(labels).astype(int)
    # Both metrics are taken on scores floored to PixelMetrics' 24-bit bins (its documented definition, the trials'
    # ``bits``): on this near-chance model the FPR is steep around 95 % TPR, so the bin rounding alone moves FPR95 by
    # up to ~1e-2, and at Optuna's low temperatures (MSP saturating towards 0) it moved AuPRC by 2e-4.
    bins = float32_keys(s) >> np.uint32(8)
    floored = keys_to_float32((bins.astype(np.uint64) << np.uint64(8)).astype(np.uint32))
    fpr, tpr, _ = roc_curve(y, floored, drop_intermediate=False)
    return {"auprc": average_precision_score(y, floored), "fpr95": float(fpr[np.argmax(tpr >= 0.95)])}


@pytest.fixture(scope="module")
def first_search(ray_session, results_dir, suite, model_path):
    """A grid search on an empty results store: must run the benchmark once to create the cache."""
    calls = Calls()
    original = driver.BenchmarkRunner.run
    driver.BenchmarkRunner.run = calls.wrap(original)
    try:
        cfg = make_cfg(results_dir, suite, model_path, search="grid", run_id="grid1")
        res = run_temperature_search(cfg)
    finally:
        driver.BenchmarkRunner.run = original
    return cfg, res, calls


def test_missing_cache_runs_benchmark_once_and_grid_rows_match_reference(first_search, results_dir):
    cfg, res, calls = first_search
    store = ResultsStore(str(results_dir))
    assert res.created_cache and len(calls.times) == 1
    runs = store.read("runs")
    assert set(runs.loc[runs.job == "benchmark", "run_id"]) == {res.source_run}
    assert runs.loc[runs.run_id == "grid1", "status"].iloc[-1] == "finished"
    (study,) = res.studies  # per-pixel logits: cl ≡ pl, one study
    temps = sorted(json.loads(t["params_json"])["temperature"] for t in study.trials)
    assert temps == list(GRID)
    for t in study.trials:
        ref = reference(store, res.source_run, VAL, json.loads(t["params_json"])["temperature"])
        assert t["value"] == pytest.approx(ref["auprc"], abs=1e-4)
    best_ref = max(GRID, key=lambda t: reference(store, res.source_run, VAL, t)["auprc"])
    assert study.best_temperature == best_ref
    # every reported row (grid rows + best, on both sets) is the reference value on that set
    assert len(res.rows) == (len(GRID) + 1) * 2
    for r in res.rows:
        ref = reference(store, res.source_run, r["dataset"], r["temperature"])
        assert r["auprc"] == pytest.approx(ref["auprc"], abs=1e-4)
        assert r["fpr95"] == pytest.approx(ref["fpr95"], abs=1e-3)
        assert set(PixelMetrics.columns.values()) <= set(r)  # the metric's own row(), as the benchmark's rows
        assert 0.0 <= r["fpr95_interp"] <= 1.0
    text = format_result(res, cfg)
    assert "t=0.5" in text and "best" in text and "tensorboard --logdir" in text


def test_optuna_search_reuses_cache_no_forward_pass_and_beats_grid(
    first_search, results_dir, suite, model_path, forward_calls, benchmark_calls, tmp_path
):
    _, first, _ = first_search
    store = ResultsStore(str(results_dir))
    # any model load anywhere (driver or Ray worker) would now fail: the checkpoint is gone during the search
    hidden = tmp_path / "hidden.safetensors"
    shutil.move(model_path, hidden)
    try:
        cfg = make_cfg(results_dir, suite, model_path, search="optuna", num_samples=8, run_id="optuna1")
        res = run_temperature_search(cfg)
    finally:
        shutil.move(hidden, model_path)
    assert not res.created_cache and res.source_run == first.source_run
    assert benchmark_calls.times == [] and forward_calls.times == []
    (study,) = res.studies
    assert len(study.trials) == 8 and all(t["status"] == "ok" for t in study.trials)
    assert len(list(Path(study.experiment_dir).glob("*/events.out.tfevents*"))) == 8  # TensorBoard, per trial
    temps = [json.loads(t["params_json"])["temperature"] for t in study.trials]
    assert set(GRID) <= set(temps) and len(set(temps)) == 8 and all(0.05 <= t <= 20 for t in temps)
    ref = {t: reference(store, res.source_run, VAL, t)["auprc"] for t in temps}
    for t in study.trials:
        assert t["value"] == pytest.approx(ref[json.loads(t["params_json"])["temperature"]], abs=1e-4)
    assert ref[study.best_temperature] >= max(ref[t] for t in GRID) - 1e-4
    assert ref[study.best_temperature] >= max(ref.values()) - 1e-4
    # trials table joins runs; the best row by DuckDB is the best trial
    con = store.duckdb()
    best = con.execute(
        "SELECT t.params_json, t.value, r.job FROM trials t JOIN runs r USING (run_id) "
        "WHERE t.run_id = 'optuna1' AND r.status = 'finished' ORDER BY t.value DESC LIMIT 1"
    ).fetchone()
    assert json.loads(best[0])["temperature"] == study.best_temperature and best[2] == "tune_temperature"


def test_fpr95_objective_is_minimised_and_the_documented_best_trial_query_follows_it(
    first_search, results_dir, suite, model_path, forward_calls, benchmark_calls
):
    _, first, _ = first_search
    store = ResultsStore(str(results_dir))
    grid = (0.3, 0.5, 1.1, 3.0)
    cfg = make_cfg(results_dir, suite, model_path, search="grid", grid=grid, objective="fpr95", run_id="fpr1")
    res = run_temperature_search(cfg)
    assert benchmark_calls.times == [] and forward_calls.times == []
    (study,) = res.studies
    ref = {t: reference(store, first.source_run, VAL, t)["fpr95"] for t in grid}
    for t in study.trials:
        assert t["value"] == pytest.approx(ref[json.loads(t["params_json"])["temperature"]], abs=1e-3)
        assert t["mode"] == "min"
    assert ref[study.best_temperature] <= min(ref.values()) + 1e-3
    # the query printed in the hints (and shown in the README) returns the lowest FPR95, not the highest
    from oodseg.platform.tuning.trials import best_trial_sql

    best = duckdb.sql(best_trial_sql(store.base, "fpr1", study.study)).fetchall()[0]
    assert json.loads(best[3])["temperature"] == study.best_temperature and best[2] == pytest.approx(min(
        ref.values()), abs=1e-3)
    assert "tensorboard --logdir" in format_result(res, cfg) and "target" not in format_result(res, cfg)


def test_evaluate_temperature_energy_matches_sklearn_without_ray():
    """The trial's scoring pass for another scorer (energy = −T·logsumexp(z/T), Liu et al. 2020) on an in-memory
    cached set: fp16 logits at half the label resolution, upsampled bilinearly; ignore pixels skipped."""
    rng = np.random.default_rng(0)
    records, labels = [], []
    for _ in range(3):
        logits = (3 * rng.standard_normal((19, 16, 32))).astype(np.float16)
        label = (rng.random((32, 64)) < 0.1).astype(np.uint8)
        label[:2] = 255
        records.append({"logits": logits})
        labels.append(label)
    data = CachedSet("toy", ("a", "b", "c"), tuple(records), tuple(labels))
    for t in (0.5, 2.0):
        got = evaluate_temperature(data, "energy", t)
        s, y = [], []
        for rec, lab in zip(records, labels):
            z = F.interpolate(torch.from_numpy(rec["logits"]).double()[None], size=lab.shape, mode="bilinear",
                              align_corners=False)[0]
            energy = (-t * torch.logsumexp(z / t, dim=0)).numpy()  # free energy: higher = more anomalous
            s.append(energy[lab != 255])
            y.append(lab[lab != 255])
        s, y = np.concatenate(s), np.concatenate(y)
        assert got["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-4)
        assert got["n_images"] == 3 and got["n_pixels"] == int((np.concatenate(labels) != 255).sum())


def test_cached_images_are_scored_in_batches_of_one_shape_with_the_metrics_of_one_at_a_time():
    """Consecutive cached images whose per-pixel logits share shape, dtype, OOD channels and label size are stacked,
    up to the pixel budget; any difference or mask outputs start a new batch. The histogram (all of a trial's
    metrics) equals that of one image at a time."""
    from oodseg.outputs import MaskOutputs
    from oodseg.platform.cache import record_outputs, split_outputs
    from oodseg.platform.output_cache import cached_batches, score_cached_set
    from oodseg.scoring import create_scorer

    rng = np.random.default_rng(4)

    def logits(h, w, dtype=np.float16):
        return {"logits": (3 * rng.standard_normal((19, h // 2, w // 2))).astype(dtype)}

    mask = split_outputs(MaskOutputs(torch.randn(1, 5, 20), torch.randn(1, 5, 8, 16)))[0]
    records = [logits(16, 32), logits(16, 32), logits(16, 32), logits(16, 32, np.float32), logits(8, 16), mask,
               logits(16, 32), logits(16, 32)]
    sizes = [(16, 32)] * 4 + [(8, 16), (16, 32), (16, 32), (16, 32)]
    labels = [(rng.random(size) < 0.2).astype(np.uint8) for size in sizes]
    labels[1][:3] = 255
    data = CachedSet("mixed", tuple("abcdefgh"), tuple(records), tuple(labels))
    batches = list(cached_batches(data, max_pixels=2 * 16 * 32))
    assert [lab.shape[0] for _, lab in batches] == [2, 1, 1, 1, 1, 2]
    assert isinstance(batches[4][0], MaskOutputs) and tuple(batches[0][0].logits.shape) == (2, 19, 8, 16)
    for name, t in (("msp", 0.7), ("energy", 2.0)):
        ref = PixelMetrics(smiyc=False)
        scorer = create_scorer(name, temperature=t)
        for rec, lab in zip(records, labels):
            ref.update(scorer(record_outputs(rec, size=lab.shape), size=lab.shape)[0], lab)
        got = score_cached_set(data, name, t)[0].state_dict()["state"]
        want = ref.state_dict()["state"]
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_default_trial_concurrency_leaves_a_cpu_to_the_tune_driver():
    from oodseg.platform.tuning.temperature import trial_concurrency

    assert [trial_concurrency(n, c) for n, c in ((2, 1), (16, 1), (1, 1), (8, 0.5), (4, 2))] == [1, 15, 1, 14, 1]


def test_read_only_cached_outputs_are_scored_without_a_copy_warning_or_a_write():
    """Cached records read from the object store are read-only arrays: five pixel-wise scorers score fp16 and float32
    ones (T = 0.5: an owned copy is divided in place) without torch's not-writable warning, and leave their bytes as
    they were."""
    rng = np.random.default_rng(1)
    records = []
    for dtype in (np.float16, np.float32):
        logits = (3 * rng.standard_normal((19, 16, 32))).astype(dtype)
        logits.flags.writeable = False
        records.append({"logits": logits})
    labels = tuple((rng.random((16, 32)) < 0.2).astype(np.uint8) for _ in records)
    before = [r["logits"].copy() for r in records]
    data = CachedSet("ro", ("a", "b"), tuple(records), labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("msp", "maxentropy", "energy", "gen", "rba"):
            assert evaluate_temperature(data, name, 0.5)["n_pixels"] == 2 * 16 * 32
    assert all(np.array_equal(r["logits"], b) for r, b in zip(records, before))


def test_source_run_without_cache_is_a_clear_error(tmp_path):
    store = ResultsStore(str(tmp_path))
    spec = ModelSpec(name="m", checkpoint="x.safetensors")
    assert find_source_run(store, spec, (VAL,)) == ""  # nothing cached: the job will run the benchmark
    with pytest.raises(ValueError, match=r"run 'r0' has no committed output cache of model 'm' for \['road_anomaly"):
        find_source_run(store, spec, (VAL,), source_run="r0")


def test_mask_outputs_search_both_placements(ray_session, tmp_path):
    """A hand-written mask-output cache (EoMT-style class + mask logits) registered as a finished benchmark unit:
    one grid study per placement, each trial equal to the reference ``L = Σ_q softmax(cls/T_cl)[:C]·σ(mask)``,
    ``z = L / T_pl``, MSP = 1 − max softmax(z) (T_cl = T for ``cl``, T_pl = T for ``pl``) + sklearn."""
    from oodseg.platform.results import safe_key

    rng = np.random.default_rng(3)
    store, run, n_cls, grid = ResultsStore(str(tmp_path)), "maskrun", 5, (0.5, 1.0, 2.0)
    records, labels = [], []
    for _ in range(3):
        label = (rng.random((24, 40)) < 0.15).astype(np.uint8)
        records.append({"class_logits": (2 * rng.standard_normal((1, 6, n_cls + 1))).astype(np.float16),
                        "mask_logits": (3 * rng.standard_normal((1, 6, 24, 40))).astype(np.float16), "label": label})
        labels.append(label)
    ShardCache(store.root, run, "mask", VAL, "outputs").write(records, ["a", "b", "c"])
    store.write_part("metrics", safe_key(run, "mask", VAL),
                     [{"run_id": run, "model": "mask", "dataset": VAL, "kind": "anomaly", "track": "anomaly"}])

    def ref_auprc(t_cl: float, t_pl: float) -> float:
        s, y = [], []
        for rec, lab in zip(records, labels):
            probs = torch.softmax(torch.from_numpy(rec["class_logits"]).double()[0] / t_cl, dim=-1)[:, :n_cls]
            masks = torch.sigmoid(torch.from_numpy(rec["mask_logits"]).double()[0])
            z = torch.einsum("qc,qhw->chw", probs, masks) / t_pl
            s.append((1 - torch.softmax(z, dim=0).amax(dim=0)).numpy().ravel())
            y.append(lab.ravel())
        return average_precision_score(np.concatenate(y), np.concatenate(s))

    cfg = TemperatureSearchConfig(results=str(tmp_path), source_run=run, model=ModelSpec(name="mask"), val_set=VAL,
                                  datasets=(VAL,), search="grid", grid=grid, placements=("cl", "pl"),
                                  max_concurrent_trials=2, run_id="masktune")
    res = run_temperature_search(cfg)
    assert [s.placement for s in res.studies] == ["cl", "pl"] and not res.created_cache
    for study in res.studies:
        for t in study.trials:
            temp = json.loads(t["params_json"])["temperature"]
            t_cl, t_pl = (temp, 1.0) if study.placement == "cl" else (1.0, temp)
            assert t["value"] == pytest.approx(ref_auprc(t_cl, t_pl), abs=1e-4)
    cl, pl = ({json.loads(t["params_json"])["temperature"]: t["value"] for t in s.trials} for s in res.studies)
    assert cl[1.0] == pytest.approx(pl[1.0]) and cl[2.0] != pytest.approx(pl[2.0], abs=1e-4)  # T = 1: same model
