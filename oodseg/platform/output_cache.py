"""Finding, loading and scoring the benchmark's output cache (fp16 model outputs per image) for searches that never
run the model (the temperature search).

:func:`find_source_run` picks the benchmark run whose cache covers the needed sets for a model spec (a given
``source_run``, else the newest finished ``benchmark`` run with the same model name, arch, checkpoint and cfg);
:func:`load_cached_set` reads one set's records and labels into a :class:`CachedSet`; :func:`score_cached_set` and
:func:`evaluate_temperature` score it with one scorer (a temperature-search trial's work), consecutive images of one
size in batches (:func:`cached_batches`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from oodseg.outputs import ModelOutputs, PixelLogits
from oodseg.platform.benchmark.config import ModelSpec
from oodseg.platform.cache import ShardCache, record_ood_channels, record_outputs
from oodseg.platform.results import ResultsStore
from oodseg.scoring import create_scorer
from oodseg.scoring.metrics import PixelMetrics


@dataclass(frozen=True)
class CachedSet:
    """One set's cached fp16 model outputs (one record of arrays per image) and uint8 labels, in id order."""

    name: str
    ids: tuple[str, ...]
    records: tuple[dict[str, np.ndarray], ...]
    labels: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for r in self.records for a in r.values()) + sum(lab.nbytes for lab in self.labels)


def load_cached_set(store: ResultsStore, run_id: str, model: str, dataset: str, max_images: int = 0) -> CachedSet:
    """Read every shard of one (run, model, dataset) output cache; ``max_images`` keeps the first ids (sorted)."""
    cache = ShardCache(store.root, run_id, model, dataset, "outputs")
    shards = cache.shards()
    if not shards:
        raise FileNotFoundError(f"{cache.dir}: no cached outputs of run {run_id!r}, model {model!r}, dataset "
                                f"{dataset!r}")
    items = sorted((i for p in shards for i in cache.read_shard(p)), key=lambda x: x[0])[: max_images or None]
    records, labels = [], []
    for _, rec in items:
        rec = dict(rec)
        labels.append(np.ascontiguousarray(rec.pop("label"), dtype=np.uint8))
        records.append(rec)
    return CachedSet(dataset, tuple(i for i, _ in items), tuple(records), tuple(labels))


def cached_sets(store: ResultsStore, run_id: str, model: str) -> set[str]:
    """Datasets of ``run_id`` whose score unit is committed and whose output cache has shards."""
    done = {d for m, d, s in store.completed_units(run_id) if m == model and s == "score"}
    return {d for d in done if ShardCache(store.root, run_id, model, d, "outputs").shards()}


def _same_spec(a: dict[str, Any], b: ModelSpec) -> bool:
    return {**asdict(ModelSpec()), **a} == asdict(b)


def find_source_run(store: ResultsStore, spec: ModelSpec, datasets: tuple[str, ...], source_run: str = "") -> str:
    """The benchmark run whose output cache covers ``datasets`` for ``spec`` ("" when there is none; a given
    ``source_run`` that does not cover them is a ``ValueError`` naming the missing sets)."""
    if source_run:
        missing = set(datasets) - cached_sets(store, source_run, spec.name)
        if missing:
            raise ValueError(f"run {source_run!r} has no committed output cache of model {spec.name!r} for "
                             f"{sorted(missing)} under {store.root}/cache (benchmark it with --cache-outputs true)")
        return source_run
    runs = store.read("runs")
    runs = runs[(runs["job"] == "benchmark") & (runs["status"] == "finished")].sort_values("started_at",
                                                                                           ascending=False)
    for row in runs.itertuples():
        try:
            models = json.loads(row.config_json).get("models", [])
        except (TypeError, ValueError):
            continue
        if any(_same_spec(m, spec) for m in models if isinstance(m, dict)) and \
                set(datasets) <= cached_sets(store, row.run_id, spec.name):
            return str(row.run_id)
    return ""


#: Pixels per :func:`cached_batches` batch: on 8 images of 128×256 (fp16 logits ~ N(0, 3²)) a trial's scorer and
#: histogram calls per batch instead of per image take msp 24 → 16 ms and maxlogit 11 → 6.5 ms (on a random ERFNet's
#: near-constant logits the histogram is cheap either way and the gain within noise); the bound caps the stacked copy
#: (≤ 40 MiB of 20-channel fp16 logits).
BATCH_PIXELS = 1 << 20


def _stack_key(data: CachedSet, i: int) -> tuple | None:
    """What cached images must share to be scored as one batch (per-pixel logits only; None: scored alone)."""
    rec = data.records[i]
    if "logits" not in rec:
        return None
    return rec["logits"].shape, rec["logits"].dtype, record_ood_channels(rec), data.labels[i].shape


def cached_batches(data: CachedSet, max_pixels: int = BATCH_PIXELS) -> Iterator[tuple[ModelOutputs, np.ndarray]]:
    """``(outputs, labels [B, H, W])`` over a cached set in order: runs of consecutive per-pixel-logit images of one
    shape stacked into one :class:`PixelLogits` (up to ``max_pixels`` label pixels a batch), every other image (mask
    outputs) alone. Pixel histograms add up, so the metrics equal those of one image at a time."""
    i, n = 0, len(data.records)
    while i < n:
        key, j = _stack_key(data, i), i + 1
        if key is not None:
            while j < n and (j - i + 1) * data.labels[i].size <= max_pixels and _stack_key(data, j) == key:
                j += 1
        labels = np.stack(data.labels[i:j])
        if j - i == 1:
            yield record_outputs(data.records[i], size=labels.shape[1:]), labels
        else:
            logits = torch.from_numpy(np.stack([r["logits"] for r in data.records[i:j]]))
            yield PixelLogits(logits, size=labels.shape[1:], ood_channels=key[2]), labels
        i = j


def score_cached_set(data: CachedSet, scorer: str, temperature: float, placement: str = "cl",
                     params: dict[str, Any] | None = None, bits: int = 24) -> tuple[PixelMetrics, float]:
    """The pixel metrics of ``create_scorer(scorer, temperature, placement, **params)`` over a cached set
    (:func:`cached_batches`) and the wall seconds of this scoring pass."""
    t0 = time.perf_counter()
    score = create_scorer(scorer, temperature=temperature, placement=placement, **(params or {}))
    pm = PixelMetrics(bits=bits, smiyc=False, validate=False)
    for outputs, labels in cached_batches(data):
        pm.update(score(outputs, size=labels.shape[1:]).numpy(), labels)
    return pm, time.perf_counter() - t0


def evaluate_temperature(data: CachedSet, scorer: str, temperature: float, placement: str = "cl",
                         params: dict[str, Any] | None = None, bits: int = 24) -> dict[str, float]:
    """:func:`score_cached_set`'s metric values (what a trial reports), plus ``n_images`` and ``eval_s``."""
    pm, seconds = score_cached_set(data, scorer, temperature, placement, params, bits)
    return {**pm.compute(warn=False), "n_images": len(data.labels), "eval_s": seconds}
