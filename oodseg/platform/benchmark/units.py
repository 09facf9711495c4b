"""Stage "reduce": the rows of a pass stream in; each (model, dataset) *unit* is merged as its rows arrive and handed
on the moment its last image is accounted for, so it is committed while later datasets are still being scored.

Input: the row stream of :mod:`oodseg.platform.benchmark.rows` (any order, any number of actor calls).
Output: :class:`UnitResult` objects, one per dataset, in completion order (:meth:`Reducer.consume`).

Exactly once: Ray re-runs the task of an actor that died (OOM, a lost node), so the rows of a call can arrive twice
and the dead actor's cache shards stay on disk. The reducer groups rows by call and takes a call only if none of the
images it covers was taken before (a re-run covers the same images: it is dropped whole); a call that overlaps
earlier ones only in part cannot be merged exactly and fails the unit. A unit's ``shards`` are the shards of the
calls it took; :meth:`UnitResult.prune` deletes every other shard, so the component pass, the refine stage,
heatmaps and the temperature search read each image once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from oodseg.platform.benchmark.config import ScorerKey
from oodseg.platform.benchmark.rows import unpack
from oodseg.platform.cache import ShardCache
from oodseg.scoring.metrics import MergeableMetric, metric_from_state


@dataclass(frozen=True)
class UnitInfo:
    """What actors and the reducer know about one dataset of a run (its registered facts, under its result key)."""

    key: str
    name: str
    title: str
    kind: str  # "anomaly" | "semantic"
    track: str | None
    num_classes: int


@dataclass
class UnitResult:
    """The reduced results of one (model, dataset) unit of one pass before commit."""

    info: UnitInfo
    keys: list[ScorerKey]
    expected: int
    metrics: dict[tuple[int, str], MergeableMetric] = field(default_factory=dict)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    n_images: int = 0
    seen: set[str] = field(default_factory=set)  # ids of the images (scored or failed) taken, each once
    shards: dict[str, list[str]] = field(default_factory=dict)  # cache kind → shards of the calls taken
    started: float | None = None  # when the batch holding its first row was requested (Reducer)

    @property
    def covered(self) -> int:
        return len(self.seen)

    @property
    def done(self) -> bool:
        return self.covered >= self.expected

    def prune(self, cache: Callable[[str], ShardCache], kinds: Iterable[str]) -> None:
        """Delete the shards of each ``cache(kind)`` that no taken call wrote (those of a dead actor's lost call)."""
        for kind in kinds:
            cache(kind).keep_only(self.shards.get(kind, []))

    @property
    def wall_s(self) -> float:
        """Seconds from the request of the batch with its first row to now (commit): its own share of the stream,
        not the units streamed before it (the first unit of a pass includes the actors' start-up)."""
        return time.time() - self.started if self.started is not None else 0.0

    def merge_states(self, states: Mapping[tuple[int, str], Any]) -> None:
        """Merge packed ``{(key index, slot): state}`` (see :func:`~oodseg.platform.benchmark.rows.metric_states`)."""
        for slot, sd in states.items():
            metric = metric_from_state(sd["metric"], sd)
            if slot in self.metrics:
                self.metrics[slot].merge(metric)
            else:
                self.metrics[slot] = metric

    def metric(self, key: ScorerKey, slot: str) -> MergeableMetric | None:
        return self.metrics.get((self.keys.index(key), slot)) if key in self.keys else None

    def scored_keys(self) -> list[ScorerKey]:
        """The keys that received pixel states (those that apply to the model)."""
        present = {i for i, name in self.metrics if name == "pixel"}
        return [k for i, k in enumerate(self.keys) if i in present]


class Reducer:
    """Merge a pass's rows into units and yield each unit once all its images arrived."""

    def __init__(self, units: Mapping[str, UnitResult], on_image: Callable[[str], None] | None = None,
                 on_info: Callable[[str], None] | None = None) -> None:
        self.units = dict(units)
        self.on_image, self.on_info = on_image, on_info
        self.pending = [k for k, u in self.units.items() if not u.done]
        self.buffer: dict[tuple[str, str], list[Mapping[str, Any]]] = {}  # (call, dataset) → rows before its state

    def _take(self, r: Mapping[str, Any], requested: float) -> None:
        """Buffer a row until its call's state row for that dataset arrives, then take or drop the call."""
        unit = self.units[r["dataset"]]
        if unit.started is None:
            unit.started = requested
        if r["row"] == "info":
            if self.on_info:
                self.on_info(json.loads(r["summary"]))
            return
        rows = self.buffer.setdefault((r["call"], r["dataset"]), [])
        if r["row"] != "state":
            rows.append(r)
            return
        del self.buffer[(r["call"], r["dataset"])]
        summary = json.loads(r["summary"])
        ids = set(summary["covered"])
        if ids and ids <= unit.seen:
            return  # a re-run of a call already taken (its actor died after its rows had arrived)
        if ids & unit.seen:
            raise RuntimeError(f"unit {unit.info.key}: a re-run call covers {len(ids & unit.seen)} image(s) taken "
                               f"before and {len(ids - unit.seen)} new one(s); its states cannot be merged exactly")
        unit.seen |= ids
        unit.merge_states(unpack(r["state"]))
        for kind, paths in summary.get("shards", {}).items():
            unit.shards.setdefault(kind, []).extend(paths)
        for row in rows:
            self._image(unit, row)

    def _image(self, unit: UnitResult, r: Mapping[str, Any]) -> None:
        if r["row"] == "failure":
            unit.failures.append({"image_id": r["id"], "file": r["file"], "stage": r["stage"],
                                  "error": r["error"]})
        else:
            unit.n_images += 1
            for s in json.loads(r["summary"]):
                unit.summaries.append({"image_id": r["id"], "image_path": r["image_path"], **s})
        if self.on_image:
            self.on_image(r["dataset"])

    def consume(self, batches: Iterable[Any]) -> Iterator[UnitResult]:
        """Yield units as they complete (units with no image to process first), then any that remain."""
        for key in [k for k, u in self.units.items() if u.done]:
            yield self.units[key]
        requested = time.time()
        for batch in batches:
            for r in batch.to_pylist():
                self._take(r, requested)
            requested = time.time()
            # a call's state row comes after its image rows and says how many images it covers
            for key in [k for k in self.pending if self.units[k].done]:
                self.pending.remove(key)
                yield self.units[key]
        for key in list(self.pending):
            self.pending.remove(key)
            yield self.units[key]
