"""Parquet results store: append-only tables under one root (a local directory or a cloud URI such as ``s3://b/p``).

Layout: ``<root>/<table>/part-<key>.parquet`` for the tables ``runs``, ``metrics``, ``per_image``, ``failures``,
``curves`` and ``trials``. One *unit* of work (run × model × dataset × stage; stages: ``score``, and a refine stage
such as ``s2m``) writes one part per table it touches.

Atomic commit: each part is written under a hidden temporary name (``.tmp-….partial``, which globs such as
``metrics/*.parquet`` never match) and then renamed to its final name, so a crashed or killed job never leaves a
half-written part visible. Part names are deterministic per unit, so redoing a unit after a crash overwrites its
parts instead of duplicating rows. The ``metrics`` part is committed last and marks the unit as done: a rerun with
the same run id skips every unit that has one (:meth:`ResultsStore.completed_units`).

Remote roots go through ``pyarrow.fs`` (S3, GCS, HDFS); on object stores the rename is a server-side copy, and a
single object only becomes visible once fully written, so the guarantee holds there too.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_STR, _F64, _I64 = pa.string(), pa.float64(), pa.int64()
_TS = pa.timestamp("us", tz="UTC")

#: Fixed schemas keep the parts of a table unionable across runs and code versions (new columns only appended).
SCHEMAS: dict[str, pa.Schema] = {
    "runs": pa.schema(
        [
            ("run_id", _STR), ("attempt", _STR), ("job", _STR), ("status", _STR), ("started_at", _TS),
            ("finished_at", _TS), ("config_json", _STR), ("git_sha", _STR), ("versions_json", _STR),
            ("seed", _I64), ("host", _STR), ("gpu", _STR), ("wall_s", _F64), ("fingerprint_json", _STR),
        ]
    ),
    "metrics": pa.schema(
        [
            ("run_id", _STR), ("model", _STR), ("dataset", _STR), ("kind", _STR), ("track", _STR),
            ("scorer", _STR), ("placement", _STR), ("temperature", _F64),
            ("auprc", _F64), ("fpr95", _F64), ("auroc", _F64), ("best_f1", _F64), ("best_threshold", _F64),
            ("siou", _F64), ("ppv", _F64), ("mean_f1", _F64), ("miou", _F64), ("pixel_acc", _F64),
            ("n_images", _I64), ("n_pixels", _I64), ("n_anomaly_pixels", _I64), ("anomaly_fraction", _F64),
            ("n_failures", _I64), ("wall_s", _F64), ("extra_json", _STR), ("committed_at", _TS),
            ("stage", _STR), ("auprc_smiyc", _F64), ("fpr95_smiyc", _F64), ("auroc_smiyc", _F64),
            ("siou_smiyc", _F64), ("ppv_smiyc", _F64), ("mean_f1_smiyc", _F64),
            ("s2m_iou", _F64), ("s2m_auiou", _F64), ("s2m_mean_f1", _F64), ("s2m_threshold", _F64),
            ("fpr95_interp", _F64),
        ]
    ),
    "per_image": pa.schema(
        [
            ("run_id", _STR), ("model", _STR), ("dataset", _STR), ("image_id", _STR), ("image_path", _STR),
            ("height", _I64), ("width", _I64), ("scorer", _STR), ("placement", _STR), ("temperature", _F64),
            ("n_valid", _I64), ("n_anomaly", _I64), ("score_mean_inlier", _F64), ("score_mean_anomaly", _F64),
            ("score_max", _F64), ("pixel_acc", _F64), ("stage", _STR),
        ]
    ),
    "failures": pa.schema(
        [
            ("run_id", _STR), ("model", _STR), ("dataset", _STR), ("image_id", _STR), ("file", _STR),
            ("stage", _STR), ("error", _STR),
        ]
    ),
    "curves": pa.schema(
        [
            ("run_id", _STR), ("model", _STR), ("dataset", _STR), ("scorer", _STR), ("placement", _STR),
            ("temperature", _F64), ("curve", _STR), ("x", pa.list_(pa.float32())), ("y", pa.list_(pa.float32())),
            ("stage", _STR),
        ]
    ),
    "trials": pa.schema(
        [
            ("run_id", _STR), ("study", _STR), ("trial_id", _STR), ("model", _STR), ("dataset", _STR),
            ("params_json", _STR), ("objective", _STR), ("value", _F64), ("metrics_json", _STR),
            ("status", _STR), ("finished_at", _TS), ("mode", _STR),
        ]
    ),
}

TABLES = tuple(SCHEMAS)
_SAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")


def safe_key(*parts: str) -> str:
    """File-name-safe, deterministic unit key: ``("run1", "erfnet", "fs_static")`` → ``run1__erfnet__fs_static``."""
    return "__".join(_SAFE.sub("-", str(p)) for p in parts)


def resolve_fs(root: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local directory or a URI understood by ``pyarrow.fs``."""
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(root)


def to_table(table: str, rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pa.Table:
    """Rows (dicts or a DataFrame) → an Arrow table with the fixed schema; unknown columns are an error."""
    schema = SCHEMAS[table]
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    unknown = set(df.columns) - set(schema.names)
    if unknown:
        raise KeyError(f"table {table!r} has no column(s) {sorted(unknown)}; columns: {schema.names}")
    arrays = []
    for f in schema:
        if f.name in df.columns:
            col = df[f.name]
            if pa.types.is_timestamp(f.type):
                col = pd.to_datetime(col, utc=True)
            arrays.append(pa.array(col.tolist() if not pa.types.is_timestamp(f.type) else col, type=f.type,
                                   from_pandas=True))
        else:
            arrays.append(pa.nulls(len(df), type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class ResultsStore:
    """Append-only Parquet tables under ``root``, one ``part-<key>.parquet`` per unit of work and table, each
    written under a temporary name and renamed; a unit counts as done once its ``metrics`` part exists."""

    def __init__(self, root: str, create: bool = True) -> None:
        self.fs, self.base = resolve_fs(str(root))
        # absolute, so Ray workers with another working directory resolve the same location
        self.root = str(root) if "://" in str(root) else self.base
        if create:
            self.fs.create_dir(self.base, recursive=True)

    def table_dir(self, table: str) -> str:
        if table not in SCHEMAS:
            raise KeyError(f"unknown table {table!r}; tables: {list(TABLES)}")
        return f"{self.base}/{table}"

    def part_path(self, table: str, key: str) -> str:
        return f"{self.table_dir(table)}/part-{key}.parquet"

    def uri(self, *parts: str) -> str:
        """A path/URI under the root for other artefacts (plots, cache) on the same filesystem."""
        return "/".join([self.root.rstrip("/"), *parts])

    # -- writing -------------------------------------------------------------------------------------------------
    def write_part(self, table: str, key: str, rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> str:
        """Atomically write (or replace) the part ``key`` of ``table``; returns its path."""
        data = to_table(table, rows)
        directory = self.table_dir(table)
        self.fs.create_dir(directory, recursive=True)
        final = self.part_path(table, key)
        tmp = f"{directory}/.tmp-{uuid.uuid4().hex}.partial"
        try:
            with self.fs.open_output_stream(tmp) as sink:
                pq.write_table(data, sink, compression="zstd")
            if isinstance(self.fs, pafs.LocalFileSystem):
                os.replace(tmp, final)  # atomic on POSIX, also when `final` exists
            else:
                self.fs.move(tmp, final)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (OSError, FileNotFoundError):
                pass
            raise
        return final

    def commit_tables(self, key: str, tables: Mapping[str, Any]) -> None:
        """Write every table of one unit under part ``key``; ``metrics`` goes last and marks the unit done."""
        for table in sorted(tables, key=lambda t: t == "metrics"):
            self.write_part(table, key, tables[table])

    # -- reading -------------------------------------------------------------------------------------------------
    def parts(self, table: str) -> list[str]:
        selector = pafs.FileSelector(self.table_dir(table), allow_not_found=True)
        return sorted(
            i.path for i in self.fs.get_file_info(selector)
            if i.type == pafs.FileType.File and i.base_name.startswith("part-") and i.base_name.endswith(".parquet")
        )

    def arrow(self, table: str) -> pa.Table:
        """The committed rows of ``table`` (empty table with the schema when nothing is committed)."""
        files = self.parts(table)
        schema = SCHEMAS[table]
        if not files:
            return schema.empty_table()
        dataset = pds.dataset(files, schema=schema, filesystem=self.fs, format="parquet")
        return dataset.to_table()

    def read(self, table: str) -> pd.DataFrame:
        return self.arrow(table).to_pandas()

    def completed_units(self, run_id: str) -> set[tuple[str, str, str]]:
        """``{(model, dataset, stage)}`` already committed for ``run_id`` (their ``metrics`` part exists)."""
        df = self.read("metrics")
        df = df[df["run_id"] == run_id]
        return {(m, d, s if isinstance(s, str) and s else "score") for m, d, s in
                zip(df["model"], df["dataset"], df["stage"])}

    def duckdb(self):
        """A DuckDB connection with one view per table (``SELECT … FROM metrics JOIN runs USING (run_id)``)."""
        import duckdb

        con = duckdb.connect()
        for table in TABLES:
            arrow_table = self.arrow(table)
            con.register(f"_{table}_arrow", arrow_table)
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM _{table}_arrow")
        return con

    # -- small JSON/bytes artefacts next to the tables ---------------------------------------------------------------
    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Atomically write an artefact (plot, marker) under the root; returns its path/URI."""
        path = f"{self.base}/{relpath}"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as sink:
            sink.write(data)
        self.fs.move(tmp, path)
        return self.uri(relpath)
