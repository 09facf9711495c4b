"""Stage "components": metrics that need a pixel threshold, computed in a second, cheap pass
(:class:`ComponentPass`: in the driver, or on long-lived Ray actors for large units).

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

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np

from oodseg.platform.benchmark.rows import metric_states, pack, unpack
from oodseg.platform.benchmark.units import UnitResult
from oodseg.platform.cache import ShardCache
from oodseg.scoring.metrics import ComponentMetrics, S2MMetrics
from oodseg.scoring.metrics.components import GroundTruth

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
                  refined: bool, gt: dict[int, GroundTruth] | None = None) -> dict[str, Any]:
    """The post metrics of one image's map for one key. ``gt``: the image's :class:`GroundTruth` by minimum GT size,
    filled on first use, so the keys and rules of one image label its GT components once."""
    gt = {} if gt is None else gt
    out: dict[str, Any] = {}
    for slot, cfg in configs.items():
        metric = ComponentMetrics(**cfg)
        if metric.min_gt not in gt:
            gt[metric.min_gt] = metric.ground_truth(label)
        out[slot] = metric.update_image(scores, label, gt[metric.min_gt])
    s2m_map = scores if refined else scores > np.float32(configs["components"]["threshold"])
    out["s2m"] = S2MMetrics().update(s2m_map, label)  # a refined fp16 map is read as float32 there
    return out


def component_shard(path: str, cache: Mapping[str, str], configs: Mapping[int, Mapping[str, Any]],
                    refined: bool) -> bytes:
    """The post metrics of every image × key of one score shard, merged per key and packed. A key whose map and
    configs equal an earlier key's in the same image (``eim`` and ``maxlogit`` of a model without an IsoMax+ head)
    takes a copy of that key's metrics instead of computing them again."""
    merged: dict[tuple[int, str], Any] = {}
    for item in ShardCache(**cache).items([path]):
        gt: dict[int, GroundTruth] = {}
        done: list[tuple[int, Mapping[str, Any], dict[str, Any]]] = []  # (row, configs, metrics) of this image
        for j, i in enumerate(item.keys.tolist()):
            if i not in configs:
                continue
            same = next((out for k, cfg, out in done
                         if cfg == configs[i] and np.array_equal(item.scores[k], item.scores[j])), None)
            out = copy.deepcopy(same) if same is not None else shard_metrics(item.scores[j], item.label, configs[i],
                                                                             refined, gt)
            done.append((j, configs[i], out))
            for slot, metric in out.items():
                merged[(i, slot)] = merged[(i, slot)].merge(metric) if (i, slot) in merged else metric
    return pack(metric_states(merged))


class ComponentWorker:
    """Ray actor running :func:`component_shard`; one process for the whole run, so the imports (torch, the
    package) are paid once instead of once per short-lived task worker."""

    def shard(self, path: str, cache: Mapping[str, str], configs: Mapping[int, Mapping[str, Any]],
              refined: bool) -> bytes:
        return component_shard(path, cache, configs, refined)


class ComponentPass:
    """The component pass of a run: a unit whose cached maps are small (≤ ``local_bytes``) is computed in the driver;
    larger ones go to ``n_actors`` :class:`ComponentWorker` actors, started on first need and fed round-robin.

    Why: a Ray task per shard pays for new worker processes importing torch and the package on every unit (Ray keeps
    only ~num_cpus idle workers); a long-lived actor pays its start-up once, which is more than a small set's whole
    pass in the driver. ``local_bytes`` (64 MiB of stored shards: 64–100 MiB of fp16 maps, by how well they
    compress) bounds the driver's share to a few seconds per unit; real-size sets go to the actors (the measurements:
    ``benchmarks/README.md``). The actors reserve no CPU: their work is short, the driver waits on it, and a
    reserved CPU would queue them behind the streaming reads."""

    def __init__(self, ray: Any, n_actors: int | None = None, local_bytes: int = 64 << 20) -> None:
        self.ray = ray
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.n_actors = n_actors or max(1, min(4, cpus // 8))
        self.local_bytes = local_bytes
        self.actors: list[Any] = []

    def run(self, unit: UnitResult, cache: ShardCache, refined: bool = False) -> None:
        """Compute the unit's component metrics from ``cache``'s shards and merge them into ``unit``."""
        track = unit.info.track if unit.info.track in ("anomaly", "obstacle") else "anomaly"
        configs = unit_components(unit, track) if unit.info.kind == "anomaly" else {}
        if not configs:
            return
        sizes = cache.shard_sizes()
        if sum(sizes.values()) <= self.local_bytes:
            results = [component_shard(p, cache.spec, configs, refined) for p in sorted(sizes)]
        else:
            actors = self._actors()
            results = self.ray.get([actors[k % len(actors)].shard.remote(p, cache.spec, configs, refined)
                                    for k, p in enumerate(sorted(sizes))])
        for packed in results:
            unit.merge_states(unpack(packed))

    def _actors(self) -> list[Any]:
        if not self.actors:
            cls = self.ray.remote(num_cpus=0)(ComponentWorker)
            self.actors = [cls.remote() for _ in range(self.n_actors)]
        return self.actors

    def stop(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
