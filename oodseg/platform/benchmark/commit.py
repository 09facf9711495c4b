"""Stage "commit": one reduced unit → its rows in the ``metrics``, ``per_image``, ``failures`` and ``curves`` tables,
written atomically (``metrics`` last, which marks the unit done; :mod:`oodseg.platform.results`).

Every metric row is built here, in one place: a row holds the unit's identity (run, model, dataset, stage), the scorer
key (``scorer`` = method name, placement, temperature) and, for each metric slot the unit holds for that key, the
metric's own columns (``metric.row()``: ``pixel`` → AuPRC, FPR95, … and their ``_smiyc`` twins; ``components`` →
sIoU, PPV, mean F1, or ``siou_smiyc`` … at the leaderboard's threshold rule; ``s2m`` → S2M's IoU, AuIoU, mean F1).
Lists (F1 per τ, …) go to ``extra_json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from oodseg.platform.benchmark.units import UnitResult
from oodseg.platform.results import ResultsStore, safe_key
from oodseg.scoring.calibration import ScoreCalibration

EXTRA = {"components": ("f1", "n_gt", "n_pred"), "confusion": ("iou_per_class",)}


def unit_key(run_id: str, model: str, dataset: str, stage: str) -> str:
    """The part name of a unit; the score stage keeps the historical three-part key."""
    return safe_key(run_id, model, dataset) if stage == "score" else safe_key(run_id, model, dataset, stage)


def slot_values(unit: UnitResult, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(table columns, extra_json entries) of every metric slot the unit holds for key ``index``."""
    row: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for (i, slot), metric in sorted(unit.metrics.items()):
        if i != index:
            continue
        values = metric.compute(warn=False)
        row.update(metric.row(values))
        extra.update({f"{slot}.{k}": values[k] for k in EXTRA.get(slot, ()) if k in values})
    return row, extra


def calibration(pixel: Any) -> dict[str, float] | None:
    """The scorer's calibration statistics on this set (best-F1 threshold, inlier median and IQR scale), which the
    refine stage's ``components`` prompter reads back; None when undefined (no anomaly pixel, a constant score)."""
    try:
        return asdict(ScoreCalibration.from_pixel_metrics(pixel))
    except ValueError:
        return None


def metric_rows(unit: UnitResult, base: dict[str, Any]) -> list[dict[str, Any]]:
    """The unit's ``metrics`` rows (one per scored key; one semantic row; one empty row if nothing was scored)."""
    info = unit.info
    common = {**base, "kind": info.kind, "track": info.track, "n_images": unit.n_images,
              "n_failures": len(unit.failures), "wall_s": unit.wall_s}
    rows = []
    if info.kind == "semantic" and (0, "confusion") in unit.metrics:
        values, extra = slot_values(unit, 0)
        n_pixels = int(unit.metrics[(0, "confusion")].matrix.sum())
        rows.append({**common, **values, "n_pixels": n_pixels, "extra_json": json.dumps(extra)})
    elif info.kind == "anomaly":
        for key in unit.scored_keys():
            values, extra = slot_values(unit, unit.keys.index(key))
            extra.update(params=dict(key.params), calibration=calibration(unit.metric(key, "pixel")))
            rows.append({**common, **values, "scorer": key.method, "placement": key.placement,
                         "temperature": key.temperature, "extra_json": json.dumps(extra, default=str)})
    return rows or [common]  # every image failed: the unit is still marked done


def curve_rows(unit: UnitResult, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Downsampled PR and ROC curves of every key whose pixel metrics have both classes."""
    out = []
    for key in unit.scored_keys():
        pm = unit.metric(key, "pixel")
        values = pm.compute(warn=False)
        if not values["n_anomaly"] or values["n_pixels"] <= values["n_anomaly"]:
            continue
        cv = pm.curves(max_points=256)
        common = {**base, "scorer": key.method, "placement": key.placement, "temperature": key.temperature}
        out.append({**common, "curve": "pr", "x": cv["recall"], "y": cv["precision"]})
        out.append({**common, "curve": "roc", "x": cv["fpr"], "y": cv["tpr"]})
    return out


def commit_unit(store: ResultsStore, run_id: str, model: str, stage: str, unit: UnitResult) -> dict[str, Any]:
    """Write the unit's tables (``metrics`` last); returns its metric rows."""
    base = {"run_id": run_id, "model": model, "dataset": unit.info.key, "stage": stage}
    rows = metric_rows(unit, base)
    now = datetime.now(timezone.utc)
    for r in rows:
        r["committed_at"] = now
    tables: dict[str, Any] = {"metrics": rows}
    if unit.summaries:
        tables["per_image"] = [{**base, **s} for s in unit.summaries]
    if unit.failures:
        tables["failures"] = [{**base, **f} for f in unit.failures]
    curves = curve_rows(unit, base) if unit.info.kind == "anomaly" else []
    if curves:
        tables["curves"] = curves
    store.commit_tables(unit_key(run_id, model, unit.info.key, stage), tables)
    return rows
