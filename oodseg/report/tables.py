"""The standard tables, read from the Parquet results store with DuckDB.

Which rows: ``runs=None`` takes, for every (model, dataset, stage, method), the latest committed row of any
``benchmark`` run in the store, so a fine-tuned model benchmarked later sits next to the demo model; ``runs=[a, b]``
restricts that to those runs. ``info["sources"]`` says which run each model's numbers come from, and
``info["mixed"]`` flags sources whose data root, protocol or image limit differ.

Tables (values in %):

* :func:`standard_table` — rows model × method; per anomaly set (the dataset registry's titles, in registration
  order) AuPRC and FPR95 (for ``protocol: course`` runs the interpolated ``fpr95_interp`` of the course code's
  ``ood_metrics.fpr_at_95_tpr``); per semantic set its mIoU;
* :func:`component_table` — SMIYC sIoU / PPV / mean F1 (and the leaderboard-rule variants when present);
* :func:`object_table` — S2M's IoU / mean F1 next to the component metrics, plain vs refined maps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from oodseg.data.base import DATASETS, dataset_info


def dataset_title(name: str) -> str:
    return dataset_info(name).title if name in DATASETS else name


def method_label(scorer: str, placement: str | None, temperature: float | None, plain: bool) -> str:
    if plain or temperature is None or (isinstance(temperature, float) and math.isnan(temperature)):
        return scorer
    return f"{scorer} ({placement}, T={temperature:g})"


def select_rows(store: Any, runs: Sequence[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The metric rows a report shows and ``info`` about their sources."""
    con = store.duckdb()
    where = "r.job = 'benchmark'" if runs is None else "m.run_id IN (SELECT unnest(?))"
    params = [] if runs is None else [list(runs)]
    df = con.execute(
        f"""
        SELECT * EXCLUDE (rn) FROM (
            SELECT m.*, row_number() OVER (
                PARTITION BY m.model, m.dataset, coalesce(m.stage, 'score'), m.kind, coalesce(m.scorer, ''),
                             coalesce(m.placement, ''), coalesce(m.temperature, 0)
                ORDER BY m.committed_at DESC) AS rn
            FROM metrics m LEFT JOIN (SELECT DISTINCT run_id, job FROM runs) r USING (run_id)
            WHERE {where}
        ) WHERE rn = 1
        """, params).df()
    info: dict[str, Any] = {"runs": sorted(set(df.run_id)) if len(df) else [], "sources": {}, "mixed": False}
    for model, group in df.groupby("model"):
        info["sources"][model] = sorted(set(group.run_id))
    configs = {}
    for run_id in info["runs"]:
        row = con.execute("SELECT config_json FROM runs WHERE run_id = ? AND config_json IS NOT NULL "
                          "ORDER BY started_at DESC LIMIT 1", [run_id]).fetchone()
        cfg = json.loads(row[0]) if row else {}
        configs[run_id] = (cfg.get("data_root"), cfg.get("protocol", "field"), cfg.get("max_images"))
    df["protocol"] = [configs[r][1] for r in df.run_id] if len(df) else []
    info["mixed"] = len(set(configs.values())) > 1
    info["synthetic"] = any(not c[0] for c in configs.values())
    return df, info


def _plain(df: pd.DataFrame) -> bool:
    return bool(((df["temperature"].fillna(1.0) == 1.0) & (df["placement"].fillna("cl") == "cl")).all())


def _ordered(names: Sequence[str]) -> list[str]:
    order = DATASETS.names()
    return sorted(set(names), key=lambda n: (order.index(n) if n in order else len(order), n))


def standard_table(store: Any, runs: Sequence[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The standard table (values in %) and ``info`` (sources, anomaly fraction and images per dataset)."""
    df, info = select_rows(store, runs)
    info.update(anomaly_fraction={}, n_images={})
    anomaly = df[(df.kind == "anomaly") & df.scorer.notna()]
    semantic = df[df.kind == "semantic"]
    if anomaly.empty and semantic.empty:
        return pd.DataFrame(), info
    plain = _plain(anomaly) if len(anomaly) else True
    cells: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    for r in anomaly.itertuples(index=False):
        cell = cells.setdefault((r.model, method_label(r.scorer, r.placement, r.temperature, plain)), {})
        title = dataset_title(r.dataset)
        cell[(title, "AuPRC")] = 100 * r.auprc if pd.notna(r.auprc) else math.nan
        fpr95 = r.fpr95_interp if r.protocol == "course" else r.fpr95  # the course code's ood_metrics definition
        cell[(title, "FPR95")] = 100 * fpr95 if pd.notna(fpr95) else math.nan
        info["anomaly_fraction"][title] = r.anomaly_fraction
        info["n_images"][title] = r.n_images
    columns = [(dataset_title(d), m) for d in _ordered(anomaly.dataset) for m in ("AuPRC", "FPR95")]
    for d in _ordered(semantic.dataset):
        title = f"{dataset_title(d)} mIoU"
        columns.append((title, "mIoU"))
        for r in semantic[semantic.dataset == d].itertuples(index=False):
            info["n_images"][title] = r.n_images
            keys = [k for k in cells if k[0] == r.model] or [(r.model, "-")]
            for k in keys:
                cells.setdefault(k, {})[(title, "mIoU")] = 100 * r.miou if pd.notna(r.miou) else math.nan
    table = pd.DataFrame([[c.get(col, math.nan) for col in columns] for c in cells.values()],
                         index=pd.MultiIndex.from_tuples(list(cells), names=["model", "method"]),
                         columns=pd.MultiIndex.from_tuples(columns))
    return table.sort_index(), info


def _wide(df: pd.DataFrame, metrics: dict[str, str]) -> pd.DataFrame:
    df = df[(df.kind == "anomaly") & df.scorer.notna()].copy()
    if df.empty:
        return pd.DataFrame()
    plain = _plain(df)
    df["method"] = [method_label(s, p, t, plain) for s, p, t in zip(df.scorer, df.placement, df.temperature)]
    for col in metrics:
        df[col] = 100 * df[col].astype(float)
    order = [dataset_title(d) for d in _ordered(df.dataset)]
    df["dataset"] = [dataset_title(d) for d in df.dataset]
    wide = df.pivot_table(index=["model", "method"], columns="dataset", values=list(metrics), dropna=False)
    wide = wide.rename(columns=metrics, level=0).swaplevel(0, 1, axis=1)
    return wide.reindex(columns=[(d, m) for d in order for m in metrics.values()])


def component_table(store: Any, runs: Sequence[str] | None = None) -> pd.DataFrame:
    """SMIYC component metrics (%, at each method's pixel best-F1 threshold) per dataset."""
    df, _ = select_rows(store, runs)
    return _wide(df, {"siou": "sIoU", "ppv": "PPV", "mean_f1": "mF1"})


def object_table(store: Any, runs: Sequence[str] | None = None) -> pd.DataFrame:
    """Object-level view (%): SMIYC sIoU / PPV / mean F1 and S2M's IoU / mean F1, plain and refined maps."""
    df, _ = select_rows(store, runs)
    if "s2m_iou" not in df or df["s2m_iou"].isna().all():
        return pd.DataFrame()
    return _wide(df, {"siou": "sIoU", "ppv": "PPV", "mean_f1": "mF1", "s2m_iou": "IoU", "s2m_mean_f1": "S2M F1"})


def failure_summary(store: Any, runs: Sequence[str]) -> tuple[int, str]:
    """(count, a one-line hint) of the input failures recorded for ``runs``."""
    con = store.duckdb()
    n = con.execute("SELECT count(*) FROM failures WHERE run_id IN (SELECT unnest(?))", [list(runs)]).fetchone()[0]
    if not n:
        return 0, ""
    hint = (f'{n} input failure(s) recorded; see them with: python -m oodseg report --results {store.root} --sql '
            f'"SELECT dataset, file, stage, error FROM failures WHERE run_id IN ({", ".join(map(repr, runs))})"')
    return int(n), hint


def _render(table: pd.DataFrame) -> str:
    return table.to_string(float_format=lambda v: f"{v:5.1f}", na_rep="  -  ", sparsify=True)


def format_table(table: pd.DataFrame, info: dict[str, Any]) -> str:
    """Plain-text rendering (one decimal) with the sources and each dataset's anomaly pixel fraction."""
    if table.empty:
        return "no results"
    sources = "; ".join(f"{m} ← {', '.join(r)}" for m, r in info["sources"].items())
    lines = [f"runs: {sources}   (AuPRC / FPR95 / mIoU in %; higher AuPRC, lower FPR95 is better)"]
    if info.get("synthetic"):
        lines.append("data: the synthetic road suite (the real benchmarks' formats, not their images)")
    if info.get("mixed"):
        lines.append("WARNING: these runs used different data roots, protocols or image limits")
    lines.append(_render(table))
    if info["anomaly_fraction"]:
        titles = list(dict.fromkeys(c[0] for c in table.columns))
        frac = ", ".join(f"{k} {100 * info['anomaly_fraction'][k]:.2f}%" for k in titles
                         if pd.notna(info["anomaly_fraction"].get(k)))
        lines.append(f"anomaly pixel fraction (AuPRC of a random scorer): {frac}")
    if info["n_images"]:
        titles = list(dict.fromkeys(c[0] for c in table.columns))
        lines.append("images: " + ", ".join(f"{k} {info['n_images'][k]}" for k in titles if k in info["n_images"]))
    return "\n".join(lines)


def format_components(table: pd.DataFrame, title: str = "component level (SMIYC; %, at the pixel best-F1 "
                                                          "threshold)") -> str:
    if table.empty or table.isna().all().all():
        return ""
    return f"{title}:\n{_render(table)}"
