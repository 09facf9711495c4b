"""A resumed benchmark run is the run it resumes: reusing ``--run-id`` with another checkpoint, data, scorer set or
temperature would put two configurations into one run's rows, so such a resume is refused before any scoring.

The *fingerprint* of a run is its config without the options a resume may change (:data:`RESUMABLE`: where results
and caches live, resources, console and side outputs) plus the content digest of every model's resolved checkpoint
file (the same ``demo`` name or path can hold other weights). It is recorded in the ``runs`` row of each attempt
(``fingerprint_json``); a later attempt compares its own with the first attempt's and names every difference in one
line. Rows written before fingerprints existed are compared on their ``config_json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from oodseg.config import ConfigError, to_json
from oodseg.platform.benchmark.config import BenchmarkConfig
from oodseg.platform.results import ResultsStore

#: options a resume may change: they do not change any result
RESUMABLE = frozenset({
    "results", "run_id", "cache_dir", "plugins", "batch_size", "num_actors", "actor_num_cpus", "actor_memory_gb",
    "read_num_cpus", "read_concurrency", "torch_threads", "cache_outputs", "keep_score_cache", "heatmaps", "plots",
    "ray_address", "num_cpus", "progress", "verbose", "fit",
})
CHECKPOINT = "checkpoint of model "


def file_digest(path: str | None) -> str | None:
    """``sha256:<hex>`` of a checkpoint file (None: random init; a hub id or directory: its name)."""
    if path is None or not os.path.isfile(path):
        return path
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Read once per file version (size and mtime are part of the cache key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def fingerprint(cfg: BenchmarkConfig, checkpoints: Mapping[str, str | None]) -> dict[str, Any]:
    """The run's fingerprint; ``checkpoints``: model name → resolved file, for those resolved."""
    out = {k: v for k, v in json.loads(to_json(cfg)).items() if k not in RESUMABLE}
    out.update({f"{CHECKPOINT}{name!r}": file_digest(path) for name, path in checkpoints.items()})
    return out


def recorded(store: ResultsStore, run_id: str) -> dict[str, Any] | None:
    """The fingerprint of the first attempt of benchmark run ``run_id`` in ``store`` (None: a new run)."""
    runs = store.read("runs")
    runs = runs[(runs["run_id"] == run_id) & (runs["job"] == "benchmark")].sort_values("started_at")
    if runs.empty:
        return None
    first = runs.iloc[0]
    stored = first.get("fingerprint_json")
    if isinstance(stored, str) and stored:
        return json.loads(stored)
    return {k: v for k, v in json.loads(first["config_json"]).items() if k not in RESUMABLE}


def short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(store: ResultsStore, run_id: str, current: Mapping[str, Any]) -> None:
    """Refuse (one-line ``ConfigError``) a resume of ``run_id`` whose fingerprint differs from the recorded one; a key
    missing on either side (a checkpoint not resolved yet, an older row) is not compared."""
    if not run_id:
        return
    before = recorded(store, run_id)
    if before is None:
        return
    diffs = [f"{k}: {short(before[k])} → {short(current[k])}" for k in sorted(current)
             if k in before and before[k] != current[k]]
    if diffs:
        raise ConfigError(f"--run-id {run_id}: that run was recorded with another configuration ({'; '.join(diffs)});"
                          " rerun it with the same options to resume it, or give a new --run-id")
