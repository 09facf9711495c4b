"""Stage "components": metrics that need a pixel threshold, computed in a second, cheap pass (Ray CPU tasks).

Input: one reduced unit (its ``pixel`` states per scorer key) and its fp16 score-map shards in the per-run cache.
Output: per key, merged into the unit,

* ``components`` — SMIYC sIoU / PPV / mean F1 at the pixel-level best-F1 threshold (``score > t``);
* ``components_smiyc`` — the same at the SMIYC leaderboard's threshold rule (``ComponentMetrics`` ``rule="smiyc"``);
* ``s2m`` — S2M's IoU / AuIoU / mean F1: on the thresholded (binary) map for plain scorers, the "thresholded score
  map" baseline of the S2M paper; on the map itself for refined keys, whose values are box scores in [0, 1].

The model never runs twice: the tasks read back the score maps the score stage wrote, so components are computed
on fp16-rounded score maps (a documented part of the metric definition).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from oodseg.platform.benchmark.rows import metric_states, pack, unpack
from oodseg.platform.benchmark.units import UnitResult
from oodseg.platform.cache import ShardCache
from oodseg.scoring.metrics import ComponentMetrics, S2MMetrics

RULES = {"components": "exact", "components_smiyc": "smiyc"}


def unit_components(unit: UnitResult, track: str) -> dict[int, dict[str, dict[str, Any]]]:
    """Key index → ``{slot: ComponentMetrics config}`` at each rule's threshold (keys without a finite
    threshold, e.g. no anomaly pixel at all, are left out)."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for (i, slot), pixel in unit.metrics.items():
        if slot != "pixel":
            continue
        for name, rule in RULES.items():
            if rule == "smiyc" and not pixel.smiyc:
                continue
            try:
                out.setdefault(i, {})[name] = ComponentMetrics.at_threshold(pixel, track, rule).config()
            except ValueError:  # NaN threshold: a set without anomaly (or inlier) pixels
                continue
    return {i: slots for i, slots in out.items() if "components" in slots}


def shard_metrics(scores: np.ndarray, label: np.ndarray, configs: Mapping[str, Mapping[str, Any]],
                  refined: bool) -> dict[str, Any]:
    """The post metrics of one image's map for one key (module docstring)."""
    out: dict[str, Any] = {slot: ComponentMetrics(**cfg).update(scores, label) for slot, cfg in configs.items()}
    s2m_map = scores if refined else scores > np.float32(configs["components"]["threshold"])
    out["s2m"] = S2MMetrics().update(s2m_map.astype(np.float32), label)
    return out


def component_task(path: str, cache: Mapping[str, str], configs: Mapping[int, Mapping[str, Any]],
                   refined: bool) -> bytes:
    """Ray task: the post metrics of every image × key of one score shard, merged per key and packed."""
    merged: dict[tuple[int, str], Any] = {}
    for item in ShardCache(**cache).items([path]):
        for j, i in enumerate(item.keys.tolist()):
            if i not in configs:
                continue
            for slot, metric in shard_metrics(item.scores[j], item.label, configs[i], refined).items():
                merged[(i, slot)] = merged[(i, slot)].merge(metric) if (i, slot) in merged else metric
    return pack(metric_states(merged))


def run_components(ray: Any, unit: UnitResult, cache: ShardCache, refined: bool = False) -> None:
    """Submit one task per shard of ``cache`` and merge the results into ``unit``.

    The tasks reserve no CPU: they are short (milliseconds per image and key) and the driver waits on them, while the
    streaming reads of later units hold the CPUs that are not the actors'; a reserved fraction queued them behind every
    pending read (measured: the first unit's components waited 70 s of a 100 s run on 2 cores)."""
    track = unit.info.track if unit.info.track in ("anomaly", "obstacle") else "anomaly"
    configs = unit_components(unit, track) if unit.info.kind == "anomaly" else {}
    if not configs:
        return
    task = ray.remote(num_cpus=0)(component_task)
    refs = [task.remote(p, cache.spec, configs, refined) for p in cache.shards()]
    for packed in ray.get(refs):
        unit.merge_states(unpack(packed))
