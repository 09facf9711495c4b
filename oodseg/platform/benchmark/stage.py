"""A pass of the benchmark over one model's datasets (:class:`Stage`), and the context its stages share.

A stage turns pending (model, dataset) units into a stream of rows (:mod:`oodseg.platform.benchmark.rows`): images
in, per-image summaries and mergeable metric states out. The driver treats every stage alike — stream → reduce per
unit → component pass → commit — so a new stage is one class (in its own module) plus its entry in
``oodseg.platform.benchmark.driver.STAGES``:

* ``score`` (:class:`~oodseg.platform.benchmark.score.ScoreStage`): read → score actors;
* ``s2m`` (:class:`~oodseg.platform.benchmark.refine.RefineStage`): the score stage's maps → box prompts → SAM masks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image

from oodseg.data import dataset_info
from oodseg.platform.benchmark.config import BenchmarkConfig, ModelSpec, ScorerKey
from oodseg.platform.benchmark.read import COURSE_SIZE
from oodseg.platform.benchmark.units import UnitInfo, UnitResult
from oodseg.platform.cache import ShardCache
from oodseg.platform.results import ResultsStore

#: what a CPU actor holds (:meth:`ModelRun.actor_memory`): its runtime (Python, torch, a model) and, per pixel of a
#: batch, float32 outputs, maps, metric keys and temporaries at its peak. Measured: a ScoreActor call on 8 images of
#: 512x1024 (ERFNet, 8 scorers, their metric states and fp16 score shards) peaked 1.3 GiB above the 0.6 GiB of a
#: process that imported it (~310 B/pixel).
ACTOR_BASE_BYTES = 0.75 * 2**30
ACTOR_BYTES_PER_PIXEL = 320
DEFAULT_PIXELS = 1024 * 2048  # an image size that cannot be read: Cityscapes' full frame


def first_image_pixels(dataset: Any) -> int:
    """Pixels of a dataset's first image from its file header (no decode): 0 without images, :data:`DEFAULT_PIXELS`
    if the header cannot be read."""
    if not dataset.samples:
        return 0
    try:
        with Image.open(dataset.samples[0].image_path) as im:
            return im.width * im.height
    except (OSError, ValueError):  # missing, unreadable, not an image (UnidentifiedImageError is an OSError)
        return DEFAULT_PIXELS


@dataclass
class ModelRun:
    """Everything the stages of one model share."""

    cfg: BenchmarkConfig
    store: ResultsStore
    run_id: str
    spec: ModelSpec
    checkpoint: str | None
    keys: list[ScorerKey]  # the score stage's keys (config.model_keys, decided in prepare)
    datasets: dict[str, Any]  # result key → opened dataset
    infos: dict[str, UnitInfo]
    done: set[tuple[str, str, str]] = field(default_factory=set)  # committed (model, dataset, stage)
    refine: dict[str, Any] = field(default_factory=dict)  # resolved refine inputs: "sam", "prompters" per scorer
    scored: dict[str, ScoredUnit] = field(default_factory=dict)  # dataset → its committed score unit's facts
    fits: dict[str, str] = field(default_factory=dict)  # fit state → artefact path (fit.ensure_fits)

    def scored_unit(self, dataset: str) -> ScoredUnit:
        """What later stages need of a committed score unit: recorded at its commit in this attempt, or read once
        from its committed rows when an earlier attempt committed it."""
        if dataset not in self.scored:
            self.scored[dataset] = ScoredUnit.from_rows(self.store, self.run_id, self.spec.name, dataset)
        return self.scored[dataset]

    def cache(self, dataset: str, kind: str) -> ShardCache:
        return ShardCache(self.store.root, self.run_id, self.spec.name, dataset, kind)

    def actor_context(self, keys: list[ScorerKey]) -> ActorContext:
        return ActorContext(self.cfg, self.spec, self.checkpoint, tuple(keys), self.infos, self.store.root,
                            self.run_id, dict(self.fits))

    def pending(self, stage: str) -> list[str]:
        return [k for k in self.infos if (self.spec.name, k, stage) not in self.done]

    def resources(self, ray: Any) -> tuple[dict[str, Any], int]:
        """Actor resources + pool size. GPU: one actor per GPU (or ``num_actors``). CPU: as many actors as fit the
        CPUs left beside the read tasks' slots (reads must always find a CPU) and the cluster's memory (Ray's
        ``memory`` resource over :meth:`actor_memory`), at most ``num_actors`` when set."""
        cfg = self.cfg
        cluster = ray.cluster_resources()
        n_gpu, n_cpu = int(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
        if n_gpu > 0 and cfg.device in ("auto", "cuda"):
            return {"num_cpus": cfg.actor_num_cpus, "num_gpus": 1}, cfg.num_actors or n_gpu
        if cfg.actor_num_cpus + cfg.read_num_cpus > n_cpu:
            raise ValueError(f"actor_num_cpus={cfg.actor_num_cpus} + read_num_cpus={cfg.read_num_cpus} exceed the "
                             f"cluster's {n_cpu} CPUs: the reads would starve")
        budget = n_cpu - cfg.read_num_cpus * cfg.read_concurrency  # keep the read slots free
        by_cpu = int(budget // max(cfg.actor_num_cpus, 1e-3))
        memory = cluster.get("memory")
        by_memory = int(memory // self.actor_memory()) if memory else by_cpu
        return {"num_cpus": cfg.actor_num_cpus, "num_gpus": 0}, max(1, min(cfg.num_actors or by_cpu, by_cpu,
                                                                             by_memory))

    def actor_memory(self) -> float:
        """Bytes a CPU actor may need: ``actor_memory_gb``, else :data:`ACTOR_BASE_BYTES` + ``batch_size`` × the
        largest image's pixels (course protocol: its input size) × :data:`ACTOR_BYTES_PER_PIXEL`."""
        if self.cfg.actor_memory_gb:
            return self.cfg.actor_memory_gb * 2**30
        if self.cfg.protocol == "course":
            pixels = COURSE_SIZE[0] * COURSE_SIZE[1]
        else:
            pixels = max((first_image_pixels(ds) for ds in self.datasets.values()), default=DEFAULT_PIXELS)
        return ACTOR_BASE_BYTES + self.cfg.batch_size * pixels * ACTOR_BYTES_PER_PIXEL


@dataclass(frozen=True)
class ScoredUnit:
    """A committed score unit's facts for the refine stage: its scored images and, per scorer key, the calibration
    statistics of its map on that set (best-F1 threshold, inlier median / IQR; None where undefined)."""

    n_images: int
    calibration: Mapping[ScorerKey, dict[str, float] | None]

    @classmethod
    def from_rows(cls, store: ResultsStore, run_id: str, model: str, dataset: str) -> ScoredUnit:
        m = store.read("metrics")
        m = m[(m.run_id == run_id) & (m.model == model) & (m.dataset == dataset) & (m.stage.fillna("score") ==
                                                                                       "score")]
        cal = {ScorerKey(r.scorer, r.placement, float(r.temperature),
                         tuple(sorted(json.loads(r.extra_json or "{}").get("params", {}).items()))):
               json.loads(r.extra_json or "{}").get("calibration") for r in m.itertuples() if isinstance(r.scorer, str)}
        return cls(int(m.n_images.iloc[0]) if len(m) else 0, cal)


@dataclass(frozen=True)
class ActorContext:
    """What the actors of one pass need of the run: one object, built by the stage and pickled to every actor."""

    cfg: BenchmarkConfig
    spec: ModelSpec
    checkpoint: str | None
    keys: tuple[ScorerKey, ...]
    units: Mapping[str, UnitInfo]
    results_root: str
    run_id: str
    fits: Mapping[str, str] = field(default_factory=dict)  # fit state → artefact path under results_root

    @property
    def torch_threads(self) -> int:
        """Intra-op threads per actor: ``torch_threads``, else the CPUs it reserves (rounded up)."""
        return self.cfg.torch_threads or max(1, math.ceil(self.cfg.actor_num_cpus))

    def cache(self, dataset: str, kind: str) -> ShardCache:
        return ShardCache(self.results_root, self.run_id, self.spec.name, dataset, kind)


def row_batches(ds: Any) -> Any:
    """A stage's output rows without Ray Data's prefetch window. With its default (``prefetch_batches=1``) every
    call's table reached the driver only when the next call ended (a unit committed one call late); without it, on an
    idle machine, each arrived within 0.2 s of its call's end. Not a bound: in 2 of 4 CI runs under full load a
    table was still held until the next call ended."""
    return ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)


class Stage:
    """One pass over a model's pending units: ``stream`` yields their rows, which the driver reduces per unit and
    commits. ``name`` keys its units in the results store."""

    name: ClassVar[str] = ""
    cache_kind: ClassVar[str] = "scores"  # the maps its units' component pass reads
    shard_kinds: ClassVar[tuple[str, ...]] = ("scores", "outputs")  # the caches its actors write
    refined: ClassVar[bool] = False

    def __init__(self, run: ModelRun) -> None:
        self.run = run

    def enabled(self) -> bool:
        return True

    def keys(self) -> list[ScorerKey]:
        raise NotImplementedError

    def units(self, pending: list[str]) -> dict[str, UnitResult]:
        raise NotImplementedError

    def stream(self, ray: Any, pending: list[str]) -> Any:
        """The output rows for the ``pending`` units: an iterable of Arrow tables (a Ray Dataset's batches)."""
        raise NotImplementedError

    def after_commit(self, unit: UnitResult) -> None:
        """Clean up after a committed unit (scratch caches no later stage needs)."""


def unit_infos(datasets: Mapping[str, Any], specs: Mapping[str, Any]) -> dict[str, UnitInfo]:
    """Result key → :class:`UnitInfo` from the registered facts (a spec's ``title`` overrides the registered one)."""
    out = {}
    for key, ds in datasets.items():
        spec = specs[key]
        info = dataset_info(spec.name)
        out[key] = UnitInfo(key, spec.name, spec.title or (key if spec.name == "folder" else info.title), info.kind,
                            getattr(ds, "track", info.track), int(getattr(ds, "num_classes", info.num_classes)))
    return out
