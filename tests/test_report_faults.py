"""Report paths that used to fail late or mislead: an anomaly set without a single anomaly pixel (no curves), a
malformed ``--heatmap`` or bad ``--sql`` (one line before any work), heatmaps from caches of superseded runs."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from oodseg.__main__ import main as oodseg_main
from oodseg.data import create_dataset
from oodseg.platform.cache import ShardCache
from oodseg.platform.results import ResultsStore
from oodseg.report import plot_curves

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_an_anomaly_set_without_curves_plots_the_others(tmp_path):
    store = ResultsStore(str(tmp_path / "results"))
    store.write_part("runs", "r", [{"run_id": "r", "attempt": "a", "job": "benchmark", "status": "finished",
                                    "started_at": NOW, "config_json": "{}"}])
    rows = [{"run_id": "r", "model": "m", "dataset": d, "kind": "anomaly", "scorer": "msp", "placement": "cl",
             "temperature": 1.0, "auprc": a, "anomaly_fraction": f, "committed_at": NOW}
            for d, a, f in (("clean_set", float("nan"), 0.0), ("fs_static", 0.5, 0.02))]
    store.write_part("metrics", "r", rows)
    assert plot_curves(store, ["r"]) == []  # the clean set has no curve rows: nothing to draw, no KeyError
    store.write_part("curves", "r", [{"run_id": "r", "model": "m", "dataset": "fs_static", "scorer": "msp",
                                      "placement": "cl", "temperature": 1.0, "curve": c, "x": [0.0, 1.0],
                                      "y": [1.0, 0.0]} for c in ("pr", "roc")])
    (written,) = plot_curves(store, ["r"])
    assert written.endswith("curves_fs_static.png")


def test_unit_line_warns_when_a_set_has_no_anomaly_pixel():
    from oodseg.platform.benchmark.driver import unit_line
    from oodseg.platform.benchmark.units import UnitInfo, UnitResult

    unit = UnitResult(UnitInfo("clean", "folder", "clean", "anomaly", None, 19), [], expected=2, n_images=2)
    line = unit_line("m", "score", unit, [{"auprc": float("nan"), "scorer": "msp", "n_anomaly_pixels": 0}])
    assert "m/clean: 2 images, WARNING: no anomaly pixel, pixel metrics are NaN, committed" in line


@pytest.fixture
def two_runs(tiny_suite, tmp_path):
    """Run ``old`` kept an output cache of m/fs_static; run ``new`` superseded its rows without one."""
    store = ResultsStore(str(tmp_path / "results"))
    ds = create_dataset("fs_static", root=str(tiny_suite))
    for i, run in enumerate(("old", "new")):
        store.write_part("runs", run, [{"run_id": run, "attempt": "a", "job": "benchmark", "status": "finished",
                                        "started_at": NOW + timedelta(days=i),
                                        "config_json": json.dumps({"data_root": str(tiny_suite)})}])
        store.write_part("metrics", run, [{"run_id": run, "model": "m", "dataset": "fs_static", "kind": "anomaly",
                                           "scorer": "msp", "placement": "cl", "temperature": 1.0, "auprc": 0.5,
                                           "committed_at": NOW + timedelta(days=i)}])
    sample = ds.load(ds.samples[0])
    logits = np.random.default_rng(0).normal(size=(19, *sample["label"].shape)).astype(np.float16)
    ShardCache(store.root, "old", "m", "fs_static", "outputs").write([{"logits": logits, "label": sample["label"]}],
                                                                     [ds.samples[0].id])
    return store, ds.samples[0].id


def report(store: ResultsStore, *argv: str) -> int:
    return oodseg_main(["report", "--results", store.root, "--no-plots", *argv])


def test_a_heatmap_comes_from_the_cache_of_a_superseded_run(two_runs, capsys):
    store, image_id = two_runs
    assert report(store, "--heatmap", f"m:fs_static:{image_id}") == 0
    out = capsys.readouterr().out
    assert f"heatmap: {store.root}/plots/old/heatmaps/m__fs_static__{image_id}__msp.png" in out


def one_line(capsys, *needles: str) -> None:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and not captured.out, (err, captured.out)  # before any table is printed
    for needle in needles:
        assert needle in err[0], err


@pytest.mark.parametrize("argv,needles", [
    (["--heatmap", "m:fs_static"], ["--heatmap expects MODEL:DATASET:IMAGE_ID"]),
    (["--sql", "SELECT nope FROM runs"], ["--sql: BinderException", "nope"]),
    (["--runs", "new, nope"], ["--runs: no run 'nope'", "runs there: new, old"]),
])
def test_bad_report_arguments_are_one_line_before_any_output(two_runs, capsys, argv, needles):
    store, _ = two_runs
    assert report(store, *argv) == 2
    one_line(capsys, *needles)


def test_a_heatmap_scorer_the_model_lacks_is_named(two_runs, capsys):
    store, image_id = two_runs
    assert report(store, "--heatmap", f"m:fs_static:{image_id}", "--scorer", "p_ood") == 2
    assert "--scorer p_ood: needs a model with OOD class channels; 'm' has none" in capsys.readouterr().err
