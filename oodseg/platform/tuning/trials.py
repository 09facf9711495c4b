"""Tune results → the ``trials`` table, and how to look at a search afterwards.

One ``trials`` row per trial: ``params_json``, the ``objective`` and its direction ``mode`` (``max`` / ``min``), its
last reported ``value``, ``metrics_json`` (every scalar of the last result, ``iterations``, the objective's history)
and ``status``. :func:`best_trial_sql` is the one DuckDB query for the best trial of a search, right for both
directions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from oodseg.platform.results import ResultsStore, safe_key


def _finite(x: Any) -> Any:
    """JSON-safe scalar: numpy → Python, NaN/inf → None."""
    if hasattr(x, "item"):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def json_metrics(metrics: Mapping[str, Any]) -> str:
    """Scalars of a Tune result (no ``config``, no nested dicts) as sorted JSON."""
    plain = {k: _finite(v) for k, v in metrics.items() if k != "config" and not isinstance(v, (dict, list))}
    return json.dumps(plain, sort_keys=True, default=str)


def _flat_get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _trial_id_from_dir(path: str) -> str:
    """``<trainable>_<exp>_<index>_<i>_<params>_<date>`` → ``<exp>_<index>`` (Tune's trial directory name)."""
    parts = str(path).rstrip("/").rsplit("/", 1)[-1].split("_")
    for i in range(len(parts) - 1):
        if len(parts[i]) == 5 and parts[i + 1].isdigit() and len(parts[i + 1]) == 5:
            return f"{parts[i]}_{parts[i + 1]}"
    return ""


def trial_rows(result_grid: Any, *, run_id: str, study: str, model: str, dataset: str, objective: str, mode: str,
               params: Iterable[str], extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One ``trials`` row per Tune trial of ``result_grid``."""
    names = list(params)
    rows = []
    now = datetime.now(timezone.utc)
    for result in result_grid:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        scalars = json.loads(json_metrics(metrics))
        scalars["iterations"] = int(metrics.get("training_iteration", 0) or 0)
        history = result.metrics_dataframe
        if history is not None and objective in history:
            scalars[f"history_{objective}"] = [float(v) for v in history[objective].dropna()]
        scalars.update(extra or {})
        if result.error is not None:
            scalars["error"] = str(result.error)[-2000:]
        trial_id = metrics.get("trial_id") or (_trial_id_from_dir(result.path) if result.path else "")
        rows.append({
            "run_id": run_id, "study": study, "trial_id": str(trial_id), "model": model, "dataset": dataset,
            "params_json": json.dumps({k: _finite(_flat_get(config, k)) for k in names}, sort_keys=True),
            "objective": objective, "mode": mode, "value": _finite(metrics.get(objective)),
            "metrics_json": json.dumps(scalars, sort_keys=True, default=str),
            "status": "error" if result.error is not None else "ok", "finished_at": now,
        })
    return rows


def write_trials(store: ResultsStore, run_id: str, study: str, rows: list[dict[str, Any]]) -> str:
    """Atomically write one study's ``trials`` part (rewritten, not duplicated, when a study is resumed)."""
    return store.write_part("trials", safe_key(run_id, study), rows)


def best_trial_sql(root: str, run_id: str, study: str, where: str = "") -> str:
    """DuckDB query of the best trial of one study, whatever the objective's direction (``mode``)."""
    extra = f" AND {where}" if where else ""
    return (f"SELECT t.trial_id, t.objective, t.value, t.params_json FROM '{root}/trials/*.parquet' t "
            f"WHERE t.run_id = '{run_id}' AND t.study = '{study}' AND t.status = 'ok'{extra} "
            "ORDER BY CASE WHEN t.mode = 'min' THEN t.value ELSE -t.value END LIMIT 1")


def hints(store: ResultsStore, tensorboard_dir: str, run_id: str, study: str, where: str = "") -> str:
    """How to look at a search: one TensorBoard command and the best-trial DuckDB query."""
    query = best_trial_sql(store.base, run_id, study, where)
    return "\n".join([f"TensorBoard: tensorboard --logdir {tensorboard_dir}",
                      f'best trial : python -c "import duckdb; print(duckdb.sql(\\"{query}\\"))"'])
