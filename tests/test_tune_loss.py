"""Loss hyper-parameter search: ≥ 4 Ray Train (V2) trials under ASHA on the tiny synthetic suite; ASHA stops some
trials early, every trial lands in the Parquet ``trials`` table (queried with DuckDB) and TensorBoard, and a second
call with the same run id restores the finished experiment instead of re-running it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from oodseg.losses import loss_space
from oodseg.platform.results import ResultsStore
from oodseg.platform.trainer import FinetuneConfig
from oodseg.platform.tuning.loss import SQL_COMPLETED, LossSearchConfig, run_loss_search, with_objectives
from oodseg.training.config import TrainConfig

STEPS = 4  # = max_t: one validation (Tune iteration) per step


@pytest.fixture(scope="module")
def suite(suite_factory) -> Path:
    return suite_factory(seed=7, size=(64, 128), n_train=4, n_val=2, n_anomaly=2, n_coco=4)


def all_cpus_free(ray, timeout_s: float = 20.0) -> bool:
    """Every CPU of the cluster is available again within ``timeout_s`` (resource views lag by ~1 s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"] - 1e-6:
            return True
        time.sleep(0.5)
    return False


def make_cfg(results: Path, suite: Path, **kw) -> LossSearchConfig:
    train = TrainConfig(
        model="erfnet", model_cfg={"channels": [4, 8, 16], "input_size": None}, data_root=str(suite),
        dataset="cityscapes", anomaly_set="road_anomaly_21", coco_root=str(suite / "coco"), loss="oe",
        steps=STEPS, val_every=1, warmup=0, global_batch=2, crop=(32, 64), val_images=2, seed=0,
    )
    ft = FinetuneConfig(train=train, strategy="ddp", num_workers=1, cpus_per_worker=1, max_failures=0)
    # one trial at a time: the seeded configs then reach ASHA in a fixed order and the run is reproducible
    base = dict(results=str(results), finetune=ft, num_samples=4, max_concurrent_trials=1, grace_period=1,
                reduction_factor=2.0, seed=0)
    base.update(kw)
    return LossSearchConfig(**base)


def test_with_objectives_harmonic_mean():
    assert with_objectives({"val_auprc": 0.2, "val_miou": 0.6})["val_combo"] == pytest.approx(2 * 0.12 / 0.8)
    assert "val_combo" not in with_objectives({"val_auprc": 0.2})


def test_config_rejects_asha_without_periodic_validation(tmp_path, suite):
    cfg = make_cfg(tmp_path, suite)
    with pytest.raises(ValueError, match="val_every"):
        LossSearchConfig(finetune=FinetuneConfig(train=TrainConfig(steps=5, val_every=2)))
    assert cfg.max_t == STEPS


def test_asha_loss_search(ray_session, tmp_path, suite):
    cfg = make_cfg(tmp_path / "results", suite, run_id="loss1")
    res = run_loss_search(cfg)
    assert not res.restored and len(res.trials) == 4
    # ASHA kills stopped trials with their Train controllers; no worker placement group may stay behind
    assert all_cpus_free(ray_session)
    assert all(t["status"] == "ok" for t in res.trials)
    iterations = [json.loads(t["metrics_json"])["iterations"] for t in res.trials]
    assert max(iterations) == STEPS and min(iterations) < STEPS, iterations  # ASHA stopped someone early
    # replay asynchronous successive halving (Li et al., MLSys 2020; Ray's rule): in launch order, a trial reaching
    # rung r (= 1, 2 validations) stops when its value is below the median of the earlier trials' values at r
    rungs: dict[int, list[float]] = {1: [], 2: []}
    for t in sorted(res.trials, key=lambda t: t["trial_id"]):
        history, expected = json.loads(t["metrics_json"])["history_val_auprc"], STEPS
        for it, value in enumerate(history, start=1):
            if it in rungs:
                earlier, cutoff = rungs[it], np.median(rungs[it]) if rungs[it] else None
                earlier.append(value)
                if cutoff is not None and value < cutoff:
                    expected = it
                    break
        assert len(history) == expected, (t["trial_id"], history, rungs)
    # max_concurrent_trials=1: the trials' [start, end] intervals do not overlap (timestamps are whole seconds)
    spans = sorted((m["timestamp"] - m["time_total_s"], m["timestamp"])
                   for m in (json.loads(t["metrics_json"]) for t in res.trials))
    assert all(prev[1] <= nxt[0] + 1.0 for prev, nxt in zip(spans, spans[1:])), spans
    space = loss_space("oe", "pixel")  # ERFNet: the per-pixel thresholds are what the search samples
    for t in res.trials:
        p = json.loads(t["params_json"])
        assert space["weight"]["low"] <= p["loss_cfg.weight"] <= space["weight"]["high"]
        assert p["loss_cfg.tau_in"] in space["tau_in"]["values"] and p["loss_cfg.tau_out"] in space["tau_out"]["values"]
        assert cfg.lr_low <= p["lr"] <= cfg.lr_high
        history = json.loads(t["metrics_json"])["history_val_auprc"]
        assert len(history) == json.loads(t["metrics_json"])["iterations"] and t["value"] == history[-1]
    # the best trial is the best final value among the trials ASHA let finish
    finished = [t for t in res.trials if json.loads(t["metrics_json"])["iterations"] == STEPS]
    assert res.best_value == max(t["value"] for t in finished)
    # the trials table joins runs by run_id; DuckDB's best completed row is the search's best trial
    con = ResultsStore(str(tmp_path / "results")).duckdb()
    best = con.execute(
        "SELECT t.params_json, t.value, r.job, r.status FROM trials t JOIN runs r USING (run_id) "
        f"WHERE t.run_id = 'loss1' AND {SQL_COMPLETED.format(STEPS)} ORDER BY t.value DESC LIMIT 1"
    ).fetchone()
    assert best[1] == pytest.approx(res.best_value) and best[2:] == ("tune_loss", "finished")
    assert {t["mode"] for t in res.trials} == {"max"}
    assert json.loads(best[0])["lr"] == pytest.approx(res.best_config["lr"])
    assert len(list(Path(res.experiment_dir).glob("*/events.out.tfevents*"))) == 4
    assert (Path(res.best_checkpoint) / "model.safetensors").is_file()  # the fine-tuned model of the best trial
    # same run id again: the experiment is restored, nothing is re-trained
    again = run_loss_search(cfg)
    assert again.restored and sorted(t["trial_id"] for t in again.trials) == sorted(t["trial_id"] for t in res.trials)
    assert again.best_value == pytest.approx(res.best_value)
