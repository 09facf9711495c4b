"""Heatmap overlays of a committed unit (the first ``heatmaps`` images with anomalies), from the stage's score maps.

The plain score stage draws the first ``msp`` key (else the first key); a refine stage draws each refined map with
its object masks (map > 0) outlined. Files: ``<results>/plots/<run>/heatmaps/<model>__<dataset>__<id>[__stage].png``.
"""

from __future__ import annotations

import numpy as np

from oodseg.platform.benchmark.read import course_resize
from oodseg.platform.benchmark.stage import ModelRun, Stage
from oodseg.platform.benchmark.units import UnitResult
from oodseg.report.plots import heatmap_png


def write_heatmaps(run: ModelRun, unit: UnitResult, stage: Stage) -> list[str]:
    keys = unit.scored_keys()
    if not keys:
        return []
    key = next((k for k in keys if k.scorer == "msp"), keys[0])
    index = unit.keys.index(key)
    ds = run.datasets[unit.info.key]
    refs = {ref.id: ref for ref in ds.samples}
    written: list[str] = []
    for item in run.cache(unit.info.key, stage.cache_kind).items():
        if len(written) >= run.cfg.heatmaps:
            break
        rows = np.flatnonzero(item.keys == index)
        if not rows.size or not (item.label == 1).any():
            continue
        score = item.scores[rows[0]].astype(np.float32)
        image = ds.load(refs[item.id])["image"]
        if image.shape[:2] != score.shape:  # course protocol: maps at 512×1024
            image, _ = course_resize(image, item.label)
        masks = score > 0 if stage.refined else None
        png = heatmap_png(image, score, item.label, title=f"{run.spec.name} · {unit.info.title} {item.id} · "
                          f"{key.label}", masks=masks)
        suffix = "" if stage.name == "score" else f"__{stage.name}"
        name = f"plots/{run.run_id}/heatmaps/{run.spec.name}__{unit.info.key}__{item.id}{suffix}.png"
        written.append(run.store.write_bytes(name, png))
    return written
