"""Parquet results store: schemas, atomic commits, idempotent unit parts, resume bookkeeping, DuckDB views."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import duckdb
import pyarrow.parquet as pq
import pytest

from oodseg.platform import results as results_mod
from oodseg.platform.results import SCHEMAS, ResultsStore, safe_key


def metric_row(run: str, model: str, dataset: str, auprc: float) -> dict:
    return {"run_id": run, "model": model, "dataset": dataset, "kind": "anomaly", "scorer": "msp",
            "placement": "cl", "temperature": 1.0, "auprc": auprc, "n_images": 3,
            "committed_at": datetime.now(timezone.utc)}


def test_write_read_roundtrip_with_fixed_schema(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.write_part("metrics", "a", [metric_row("r1", "m", "d", 0.25)])
    table = store.arrow("metrics")
    assert table.schema == SCHEMAS["metrics"]
    df = table.to_pandas()
    assert df["auprc"].tolist() == [0.25]
    assert math.isnan(df["fpr95"].iloc[0])  # absent columns are null
    # what is on disk is a plain Parquet file any reader understands
    (part,) = store.parts("metrics")
    assert pq.read_table(part).column("model").to_pylist() == ["m"]


def test_unknown_column_is_an_error(tmp_path):
    store = ResultsStore(str(tmp_path))
    with pytest.raises(KeyError, match="no column"):
        store.write_part("metrics", "a", [{"run_id": "r", "auprc_typo": 1.0}])


def test_same_unit_key_overwrites_instead_of_duplicating(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.commit_tables("r1__m__d", {"metrics": [metric_row("r1", "m", "d", 0.1)]})
    store.commit_tables("r1__m__d", {"metrics": [metric_row("r1", "m", "d", 0.2)]})
    store.commit_tables("r1__m__e", {"metrics": [metric_row("r1", "m", "e", 0.3)]})
    store.commit_tables("r1__m__e__s2m", {"metrics": [{**metric_row("r1", "m", "e", 0.4), "stage": "s2m"}]})
    df = store.read("metrics").sort_values(["dataset", "auprc"])
    assert df["auprc"].tolist() == [0.2, 0.3, 0.4]
    assert store.completed_units("r1") == {("m", "d", "score"), ("m", "e", "score"), ("m", "e", "s2m")}
    assert store.completed_units("other") == set()


def test_crash_during_write_leaves_nothing_visible(tmp_path, monkeypatch):
    store = ResultsStore(str(tmp_path))
    store.write_part("metrics", "old", [metric_row("r1", "m", "d", 0.5)])

    def exploding_write(table, sink, **kw):
        sink.write(b"PAR1 partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(results_mod.pq, "write_table", exploding_write)
    with pytest.raises(KeyboardInterrupt):
        store.write_part("metrics", "new", [metric_row("r1", "m", "e", 0.9)])
    monkeypatch.undo()
    assert [p.rsplit("/", 1)[1] for p in store.parts("metrics")] == ["part-old.parquet"]
    assert not [p for p in (tmp_path / "metrics").iterdir() if p.name.startswith(".tmp")]
    assert store.read("metrics")["auprc"].tolist() == [0.5]


def test_stray_temp_file_of_killed_process_is_invisible(tmp_path):
    """A process killed by SIGKILL cannot clean up: its hidden temp file must not be read as data."""
    store = ResultsStore(str(tmp_path))
    store.write_part("metrics", "a", [metric_row("r1", "m", "d", 0.5)])
    (tmp_path / "metrics" / ".tmp-deadbeef.partial").write_bytes(b"PAR1 truncated")
    assert len(store.read("metrics")) == 1
    # the README's DuckDB glob skips hidden files too
    n = duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/metrics/*.parquet'").fetchall()[0][0]
    assert n == 1


def test_commit_unit_writes_metrics_last(tmp_path, monkeypatch):
    store = ResultsStore(str(tmp_path))
    order = []
    real = store.write_part
    monkeypatch.setattr(store, "write_part", lambda t, k, rows: (order.append(t), real(t, k, rows))[1])
    store.commit_tables("r__m__d", {
        "metrics": [metric_row("r", "m", "d", 0.1)],
        "per_image": [{"run_id": "r", "model": "m", "dataset": "d", "image_id": "x"}],
        "failures": [{"run_id": "r", "model": "m", "dataset": "d", "file": "f", "stage": "read", "error": "e"}],
    })
    assert order[-1] == "metrics" and set(order) == {"metrics", "per_image", "failures"}


def test_duckdb_views_and_list_columns(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.write_part("metrics", "a", [metric_row("r1", "m", "d", 0.25), metric_row("r1", "m2", "d", 0.75)])
    store.write_part("curves", "a", [{"run_id": "r1", "model": "m", "dataset": "d", "scorer": "msp",
                                      "curve": "pr", "x": [0.0, 0.5, 1.0], "y": [1.0, 0.5, 0.25]}])
    con = store.duckdb()
    assert con.execute("SELECT avg(auprc) FROM metrics").fetchone()[0] == pytest.approx(0.5)
    assert con.execute("SELECT x FROM curves").fetchone()[0] == [0.0, 0.5, 1.0]
    assert con.execute("SELECT count(*) FROM trials").fetchone()[0] == 0  # empty tables still queryable


def test_safe_key_is_file_name_safe_and_deterministic():
    assert safe_key("run 1", "eomt/large", "fs_static") == "run-1__eomt-large__fs_static"
    assert safe_key("a", "b") == safe_key("a", "b")
