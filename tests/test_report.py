"""The report: standard table from Parquet via DuckDB, plots, CLI (``python -m oodseg report``)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow.parquet as pq
import pytest

from oodseg.__main__ import main as oodseg_main
from oodseg.data import dataset_info, default_datasets
from oodseg.platform.results import ResultsStore
from oodseg.report import format_table, heatmap_png, plot_curves, standard_table

PNG = b"\x89PNG\r\n\x1a\n"
COLUMNS = {d: dataset_info(d).title for d in default_datasets("anomaly")}


def _run(store: ResultsStore, run_id: str, when: datetime, data_root: str = "", protocol: str = "field") -> None:
    store.write_part("runs", run_id, [{"run_id": run_id, "attempt": "a", "job": "benchmark", "status": "finished",
                                       "started_at": when,
                                       "config_json": f'{{"data_root": "{data_root}", "protocol": "{protocol}"}}'}])


@pytest.fixture()
def store(tmp_path):
    """Two runs; the newer one has two models × two scorers on the five anomaly sets and Cityscapes mIoU."""
    rng = np.random.default_rng(0)
    store = ResultsStore(str(tmp_path / "results"))
    t_old = datetime(2026, 1, 1, tzinfo=timezone.utc)
    _run(store, "old", t_old)
    _run(store, "new", t_old + timedelta(days=1))
    store.write_part("metrics", "old", [{"run_id": "old", "model": "a", "dataset": "fs_static", "kind": "anomaly",
                                         "scorer": "msp", "placement": "cl", "temperature": 1.0, "auprc": 0.99,
                                         "committed_at": t_old}])
    for model in ("erfnet", "eomt"):
        for dataset in COLUMNS:
            rows = [
                {"run_id": "new", "model": model, "dataset": dataset, "kind": "anomaly", "scorer": s,
                 "placement": "cl", "temperature": 1.0, "auprc": float(rng.uniform()), "fpr95": float(rng.uniform()),
                 "anomaly_fraction": 0.02, "n_images": 10, "committed_at": t_old + timedelta(days=1)}
                for s in ("msp", "rba")
            ]
            store.write_part("metrics", f"new__{model}__{dataset}", rows)
            store.write_part("curves", f"new__{model}__{dataset}", [
                {"run_id": "new", "model": model, "dataset": dataset, "scorer": "msp", "placement": "cl",
                 "temperature": 1.0, "curve": c, "x": [0.0, 0.5, 1.0], "y": [1.0, 0.6, 0.1]} for c in ("pr", "roc")
            ])
        store.write_part("metrics", f"new__{model}__cityscapes", [
            {"run_id": "new", "model": model, "dataset": "cityscapes", "kind": "semantic",
             "miou": float(rng.uniform()), "n_images": 5, "committed_at": t_old + timedelta(days=1)}
        ])
    return store


def test_table_reproduces_parquet_numbers(store):
    table, info = standard_table(store, ["new"])
    assert info["runs"] == ["new"] and info["sources"] == {"eomt": ["new"], "erfnet": ["new"]}
    raw = pq.read_table(f"{store.root}/metrics").to_pandas()  # independent reader: pyarrow, no DuckDB
    raw = raw[raw.run_id == "new"]
    assert list(table.columns.get_level_values(0).unique()) == [*COLUMNS.values(), "Cityscapes mIoU"]
    assert sorted(table.index) == [("eomt", "msp"), ("eomt", "rba"), ("erfnet", "msp"), ("erfnet", "rba")]
    for r in raw[raw.kind == "anomaly"].itertuples():
        assert table.loc[(r.model, r.scorer), (COLUMNS[r.dataset], "AuPRC")] == pytest.approx(100 * r.auprc)
        assert table.loc[(r.model, r.scorer), (COLUMNS[r.dataset], "FPR95")] == pytest.approx(100 * r.fpr95)
    for r in raw[raw.kind == "semantic"].itertuples():
        for method in ("msp", "rba"):
            assert table.loc[(r.model, method), ("Cityscapes mIoU", "mIoU")] == pytest.approx(100 * r.miou)
    text = format_table(table, info)
    first = raw[(raw.model == "eomt") & (raw.scorer == "msp") & (raw.dataset == "road_anomaly_21")].iloc[0]
    assert f"{100 * first.auprc:5.1f}" in text
    assert "anomaly pixel fraction" in text and "2.00%" in text


def test_default_table_compares_models_across_runs(store):
    """A model benchmarked in another run (here ``a``, run ``old``) sits next to the newer run's models."""
    table, info = standard_table(store)
    assert info["sources"]["a"] == ["old"] and info["sources"]["erfnet"] == ["new"]
    assert table.loc[("a", "msp"), ("FS Static", "AuPRC")] == pytest.approx(99.0)
    assert ("erfnet", "rba") in table.index
    # a second semantic dataset gets its own column instead of overwriting the first
    store.write_part("metrics", "new__erfnet__second", [
        {"run_id": "new", "model": "erfnet", "dataset": "my_city", "kind": "semantic", "miou": 0.5, "n_images": 2,
         "committed_at": datetime.now(timezone.utc)}])
    table, _ = standard_table(store, ["new"])
    assert table.loc[("erfnet", "msp"), ("my_city mIoU", "mIoU")] == pytest.approx(50.0)
    assert not math.isnan(table.loc[("erfnet", "msp"), ("Cityscapes mIoU", "mIoU")])


def test_course_protocol_rows_show_the_course_codes_fpr95(store):
    """The course evaluation reports ood_metrics' interpolated FPR95; field-protocol rows keep the exact one."""
    when = datetime(2026, 2, 1, tzinfo=timezone.utc)
    _run(store, "course", when, protocol="course")
    store.write_part("metrics", "course", [
        {"run_id": "course", "model": "c", "dataset": "fs_static", "kind": "anomaly", "scorer": "msp",
         "placement": "cl", "temperature": 1.0, "auprc": 0.5, "fpr95": 0.40, "fpr95_interp": 0.37,
         "committed_at": when}])
    table, info = standard_table(store, ["course", "new"])
    assert table.loc[("c", "msp"), ("FS Static", "FPR95")] == pytest.approx(37.0)
    raw = pq.read_table(f"{store.root}/metrics").to_pandas()
    exact = raw[(raw.run_id == "new") & (raw.model == "erfnet") & (raw.scorer == "msp") & (raw.dataset == "fs_static")]
    assert table.loc[("erfnet", "msp"), ("FS Static", "FPR95")] == pytest.approx(100 * exact.fpr95.iloc[0])
    assert info["mixed"]  # the two runs used different protocols: the report warns


def test_table_of_an_older_run_and_temperature_labels(store):
    table, _ = standard_table(store, ["old"])
    assert table.loc[("a", "msp"), ("FS Static", "AuPRC")] == pytest.approx(99.0)
    assert math.isnan(table.loc[("a", "msp"), ("FS Static", "FPR95")])
    store.write_part("metrics", "sweep", [
        {"run_id": "sweep", "model": "m", "dataset": "fs_static", "kind": "anomaly", "scorer": "msp",
         "placement": p, "temperature": t, "auprc": 0.1 * t, "committed_at": datetime.now(timezone.utc)}
        for p in ("cl", "pl") for t in (1.0, 2.0)
    ])
    table, _ = standard_table(store, ["sweep"])
    assert table.loc[("m", "msp (pl, T=2)"), ("FS Static", "AuPRC")] == pytest.approx(20.0)
    assert len(table) == 4


def test_plots_and_heatmap_are_png(store):
    paths = plot_curves(store, ["new"])
    assert len(paths) == len(COLUMNS)
    for p in paths:
        with open(p, "rb") as fh:
            assert fh.read(8) == PNG
    image = np.zeros((32, 64, 3), np.uint8)
    score = np.linspace(0, 1, 32 * 64, dtype=np.float32).reshape(32, 64)
    label = np.zeros((32, 64), np.uint8)
    label[10:20, 10:20] = 1
    assert heatmap_png(image, score, label, title="t", masks=label == 1)[:8] == PNG


def test_cli_prints_table_and_runs_sql(store, capsys, tmp_path):
    assert oodseg_main(["report", "--results", store.root, "--no-plots", "--runs", "new"]) == 0
    out = capsys.readouterr().out
    assert "SMIYC RA-21" in out and "Cityscapes mIoU" in out and "erfnet" in out
    assert oodseg_main(["report", "--results", store.root, "--sql",
                        "SELECT count(*) AS n FROM metrics WHERE run_id = 'new'"]) == 0
    assert "22" in capsys.readouterr().out  # 2 models × (5 datasets × 2 scorers + 1 mIoU row)
    empty = tmp_path / "empty"
    ResultsStore(str(empty))
    assert oodseg_main(["report", "--results", str(empty), "--no-plots"]) == 1  # a store without results
    assert oodseg_main(["report", "--results", store.root, "--no-plots", "--runs", "nope"]) == 2
    assert "runs there: new, old" in capsys.readouterr().err


def test_cli_typo_in_results_is_one_line_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "no_such_results"
    assert oodseg_main(["report", "--results", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and not missing.exists()
    assert oodseg_main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert oodseg_main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("benchmark", "finetune", "tune-temperature", "tune-loss", "report", "convert-checkpoint"):
        assert command in out
