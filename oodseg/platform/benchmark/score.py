"""Stage "score": read → the stateful Ray Data actor that runs a model and its scorers (Ray's batch-inference
pattern), one actor per GPU on a cluster.

Input: decoded image rows (:mod:`oodseg.platform.benchmark.read`), up to ``batch_size`` per call.
Output (:mod:`oodseg.platform.benchmark.rows`): per image a summary row, per dataset per call the merged metric states
(``pixel`` per scorer key on anomaly sets, ``confusion`` on semantic sets) and how many images they cover, and a
failure row for any image whose batch failed. The model is built once per actor (``create_model`` with the resolved
checkpoint) and run under the ``Runtime`` (bf16 autocast on CUDA); the scorers of all keys share one
``pixel_class_scores`` per class temperature (``score_many``); on a GPU the maps stay on the device: the
histogram binning and the per-image summaries run there, and the score shards cross to the host as fp16.

Side outputs, never through the object store: fp16 score maps (for the component pass and the refine stage) and,
with ``cache_outputs``, fp16 model outputs (the temperature search's output cache) go to per-run shards
(:mod:`oodseg.platform.cache`). The course protocol keeps ERFNet's void channel (all 20 channels are scored) and
leaves out frames without anomaly pixels, as the course evaluation code does.
"""

from __future__ import annotations

import errno
import math
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from oodseg.labels import ANOMALY, IGNORE_ID, INLIER
from oodseg.models import ImageSource, Runtime, SegModel, SourceError, create_model, setup_worker
from oodseg.platform.benchmark.commit import calibration
from oodseg.platform.benchmark.config import BenchmarkConfig, ModelSpec, ScorerKey
from oodseg.platform.benchmark.fit import load_fit
from oodseg.platform.benchmark.read import image_items, read_batch
from oodseg.platform.benchmark.rows import Rows
from oodseg.platform.benchmark.stage import ActorContext, ScoredUnit, Stage, row_batches
from oodseg.platform.benchmark.units import UnitInfo, UnitResult
from oodseg.platform.cache import ShardCache, split_outputs
from oodseg.registry import import_plugins
from oodseg.scoring import SCORERS, create_scorer, score_many, semantic_prediction
from oodseg.scoring.metrics import ConfusionMatrix, PixelMetrics
from oodseg.scoring.metrics.base import check_anomaly_labels, check_scores

F16_MAX = float(np.finfo(np.float16).max)  # score maps are clipped to it before the fp16 cast (no inf)


def build_model(spec: ModelSpec, checkpoint: str | None, protocol: str = "field") -> SegModel:
    """The benchmarked model in eval mode (its keywords: ``ModelSpec.model_kwargs``)."""
    return create_model(spec.arch or None, checkpoint=checkpoint, **spec.model_kwargs(protocol)).eval()


def image_summaries(scores: Sequence[torch.Tensor], labels: torch.Tensor, keys: Sequence[ScorerKey],
                    groups: Sequence[Sequence[int]] | None = None) -> list[list[dict]]:
    """Per image of a ``[B, H, W]`` batch, per scorer key: the mean inlier and mean anomaly score (float64
    accumulation) and the max score, from :func:`summary_sums` (host maps) or :func:`summary_sums_torch`.
    ``groups``: the maps' :func:`identical_groups`, whose sums are computed once per group (None: per map)."""
    groups = [[i] for i in range(len(scores))] if groups is None else groups
    host = labels.device.type == "cpu"
    lab = labels.numpy() if host else labels
    inl, ano = lab == INLIER, lab == ANOMALY
    n_inl, n_ano = inl.sum((1, 2)).tolist(), ano.sum((1, 2)).tolist()
    sums = (summary_sums if host else summary_sums_torch)([scores[g[0]] for g in groups], inl, ano)
    group_of = {i: k for k, group in enumerate(groups) for i in group}
    return [[{"scorer": key.method, "placement": key.placement, "temperature": key.temperature,
              "n_valid": n_inl[j] + n_ano[j], "n_anomaly": n_ano[j],
              "score_mean_inlier": float(si) / n_inl[j] if n_inl[j] else None,
              "score_mean_anomaly": float(sa) / n_ano[j] if n_ano[j] else None, "score_max": float(mx)}
             for key, (si, sa, mx) in zip(keys, (sums[j][group_of[i]] for i in range(len(keys))))]
            for j in range(len(n_inl))]


def summary_sums(scores: Sequence[torch.Tensor], inl: np.ndarray, ano: np.ndarray) -> list[list[tuple]]:
    """Per image, per map: (Σ inlier scores, Σ anomaly scores) in float64 and the max score, by numpy on host maps,
    image by image (a compress and a float64 sum: several times faster than the same torch ops on one CPU thread)."""
    maps = [s.numpy() for s in scores]
    return [[(s[j][inl[j]].astype(np.float64).sum(), s[j][ano[j]].astype(np.float64).sum(), s[j].max())
             for s in maps] for j in range(inl.shape[0])]


def summary_sums_torch(scores: Sequence[torch.Tensor], inl: torch.Tensor, ano: torch.Tensor) -> list[list[list]]:
    """:func:`summary_sums` by torch ops on the maps' device: only ``B × K × 3`` numbers cross to the host."""
    if not scores:
        return [[] for _ in range(inl.shape[0])]
    return torch.stack([torch.stack([torch.where(inl, s, 0.0).sum((1, 2), dtype=torch.float64),
                                     torch.where(ano, s, 0.0).sum((1, 2), dtype=torch.float64),
                                     s.amax((1, 2)).double()], 1) for s in scores], 1).cpu().tolist()


def fp16_maps(maps: Sequence[torch.Tensor]) -> np.ndarray:
    """One image's ``[H, W]`` maps as a host ``[S, H, W]`` float16 array, clipped to the fp16 range (no inf). On an
    accelerator the clip and the cast run there, so half the bytes cross; on the CPU torch's cast is ~2× numpy's."""
    return torch.stack(list(maps)).clamp_(-F16_MAX, F16_MAX).to("cpu", torch.float16).numpy()


def scores_shard(cache: ShardCache, scores: Sequence[torch.Tensor], labels: np.ndarray, ids: list[str],
                 stream: torch.cuda.Stream | None = None) -> str:
    """Write one shard of the chunk's ``[B, H, W]`` score maps: per image ``[S, H, W]`` fp16 (:func:`fp16_maps`);
    ``stream``: the CUDA stream the maps were made on (this runs in the writer thread), None elsewhere."""
    with torch.cuda.stream(stream):  # a no-op for None
        records = [{"label": labels[j], "scores": fp16_maps([s[j] for s in scores]), "keys": np.arange(len(scores))}
                   for j in range(len(ids))]
    return cache.write(records, ids)


def identical_groups(maps: Sequence[torch.Tensor]) -> list[list[int]]:
    """The maps' indices grouped by bit-identical content, each group in order and led by its first map. A strided
    sample of every 4099th value is compared before the whole maps, so distinct maps cost next to nothing."""
    groups: list[list[int]] = []
    for i, s in enumerate(maps):
        flat = s.reshape(-1)
        for g in groups:
            ref = maps[g[0]].reshape(-1)
            if maps[g[0]].shape == s.shape and torch.equal(ref[::4099], flat[::4099]) and torch.equal(ref, flat):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def writes_scores(cfg: BenchmarkConfig) -> bool:
    """Whether the score maps are needed after the pass: the component pass, a refine stage or heatmaps read them."""
    return cfg.component_metrics or bool(cfg.refine) or (cfg.plots and cfg.heatmaps > 0)


class ScoreActor:
    """Stateful Ray Data UDF: model loaded once; per call → rows."""

    def __init__(self, ctx: ActorContext) -> None:
        cfg = ctx.cfg
        import_plugins(cfg.plugins)
        self.runtime = Runtime(device=cfg.device, precision=cfg.precision)
        self.threads, self.device = ctx.torch_threads, self.runtime.torch_device
        setup_worker(self.threads, self.device)
        self.model = self.runtime.prepare(build_model(ctx.spec, ctx.checkpoint, cfg.protocol))
        self.ctx, self.cfg, self.keys = ctx, cfg, list(ctx.keys)  # states are keyed by the key's index
        fits = {name: load_fit(ctx.results_root, path, name) for name, path in ctx.fits.items()}
        self.scorers = [create_scorer(k.scorer, k.temperature, k.placement, fit=fits.get(SCORERS.meta(k.scorer)["fit"]),
                                      **dict(k.params)) for k in self.keys]
        needs = {n for k in self.keys for n in SCORERS.meta(k.scorer)["needs"]}
        self.features, self.network = "features" in needs, "network" in needs
        self.write_scores = writes_scores(cfg)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score-shards")
        self.network_lock = threading.Lock()  # concurrent calls (actor_concurrency): one network pass at a time
        self.announced = False

    @contextmanager
    def network_pass(self) -> Iterator[None]:
        """Hold the actor's one network pass (the forward, or a scorer that runs the network: ODIN, ReAct): with
        concurrent calls the other call waits, and the lock is released once this pass's kernels are done, so one
        pass's activations are alive at a time."""
        with self.network_lock:
            yield
            self.runtime.synchronize()

    def __call__(self, batch: pa.Table) -> pa.Table:
        """One call's rows. Calls may run concurrently (``actor_concurrency``): what a call builds lives in it, and
        on CUDA it runs on a stream of its own (``Runtime.stream``)."""
        setup_worker(self.threads, self.device)  # this call's thread (setup_worker)
        with self.runtime.stream():
            return self._call(batch)

    def _call(self, batch: pa.Table) -> pa.Table:
        rows = Rows()
        groups: dict[tuple[str, int, int], list[dict]] = defaultdict(list)
        covered: dict[str, list[str]] = defaultdict(list)
        for r in batch.to_pylist():
            covered[r["dataset"]].append(r["id"])
            if r["error"]:
                rows.failure(r, r["stage"], r["error"])
            else:
                groups[(r["dataset"], r["height"], r["width"])].append(r)
        states: dict[str, dict[tuple[int, str], Any]] = defaultdict(dict)
        for (dataset, h, w), group in groups.items():
            for start in range(0, len(group), self.cfg.batch_size):
                chunk = group[start : start + self.cfg.batch_size]
                try:
                    self._score_chunk(dataset, chunk, h, w, states[dataset], rows)
                except Exception as e:  # noqa: BLE001 - one bad batch must not kill the job; recorded per image
                    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                        raise  # a full disk is the run's problem, not the images' (the driver says so)
                    for r in chunk:
                        rows.failure(r, "predict", f"{r['image_path']}: {type(e).__name__}: {e}")
        for dataset, ids in covered.items():
            rows.state(dataset, states[dataset], ids)
        return rows.table()

    def _score_chunk(self, dataset: str, chunk: list[dict], h: int, w: int, states: dict, rows: Rows) -> None:
        images = np.stack([np.frombuffer(r["image"], np.uint8).reshape(h, w, 3) for r in chunk])
        outputs, keep = self._predict(chunk, images, rows)
        if not keep:
            return
        if len(keep) < len(chunk):
            chunk, images = [chunk[i] for i in keep], images[keep]
        labels = np.stack([np.frombuffer(r["label"], np.uint8).reshape(h, w) for r in chunk])
        info = self.ctx.units[dataset]
        if info.kind == "semantic":
            self._score_semantic(outputs, labels, chunk, info, states, rows)
        else:
            self._score_anomaly(dataset, outputs, labels, chunk, states, rows, images)
        if self.cfg.cache_outputs:
            self._cache_outputs(dataset, outputs, labels, chunk, rows)

    def _predict(self, chunk: list[dict], images: np.ndarray, rows: Rows) -> tuple[Any, list[int]]:
        """``model.predict`` on the chunk's images → (outputs, the chunk indices they cover). A model reading
        per-image files of its own (``reads_sources``: precomputed maps) names the images whose file is unusable
        (``SourceError``): each becomes a ``failures`` row naming that file, and the others are predicted again."""
        kw: dict[str, Any] = {"features": True} if self.features else {}
        if self.model.reads_sources:
            kw["sources"] = [ImageSource(r["dataset"], r["id"], r["image_path"]) for r in chunk]
        try:
            with self.network_pass(), torch.inference_mode(), self.runtime.autocast():
                outputs = self.model.predict(torch.from_numpy(images), **kw)
            return outputs, list(range(len(chunk)))
        except SourceError as e:
            for i, (file, error) in e.failed.items():
                rows.failure({**chunk[i], "file": file}, "predict", error)
            keep = [i for i in range(len(chunk)) if i not in e.failed]
            if not keep:
                return None, []
            outputs, sub = self._predict([chunk[i] for i in keep], images[keep], rows)
            return outputs, [keep[j] for j in sub]

    def _score_semantic(self, outputs: Any, labels: np.ndarray, chunk: list[dict], info: UnitInfo, states: dict,
                        rows: Rows) -> None:
        pred = semantic_prediction(outputs, info.num_classes, labels.shape[1:]).to("cpu", torch.uint8).numpy()
        cm = states.setdefault((0, "confusion"), ConfusionMatrix(info.num_classes))
        for b, r in enumerate(chunk):
            cm.update(pred[b], labels[b])
            valid = labels[b] != IGNORE_ID
            acc = float((pred[b][valid] == labels[b][valid]).mean()) if valid.any() else None
            rows.image(r, [{"pixel_acc": acc, "n_valid": int(valid.sum())}])

    def _score_anomaly(self, dataset: str, outputs: Any, labels: np.ndarray, chunk: list[dict], states: dict,
                       rows: Rows, images: np.ndarray) -> None:
        keep = [b for b in range(len(chunk)) if self.cfg.protocol != "course" or (labels[b] == ANOMALY).any()]
        for b in set(range(len(chunk))) - set(keep):  # the course code skips frames without anomaly pixels
            rows.image(chunk[b], [])
        if not keep:
            return
        net = {"model": self.model, "images": torch.from_numpy(images)} if self.network else {}
        with self.network_pass() if self.network else nullcontext():  # ODIN / ReAct run the network again
            scores = score_many(outputs, self.scorers, labels.shape[1:], **net)  # one model pass serves all
        if len(keep) < len(chunk):  # no copy when every frame is kept
            scores, labels = [s[keep] for s in scores], labels[keep]
        label_t = torch.from_numpy(labels).to(scores[0].device if scores else "cpu")  # maps, labels: one device
        ids = [chunk[b]["id"] for b in keep]
        stream = torch.cuda.current_stream(label_t.device) if label_t.is_cuda else None  # this call's (Runtime.stream)
        shard = self.writer.submit(scores_shard, self.ctx.cache(dataset, "scores"), scores, labels, ids, stream) \
            if self.write_scores else None  # fp16 maps written while the metrics update
        try:
            groups = identical_groups(scores)  # eim and maxlogit of a model without an IsoMax+ head: one map
            self._update_pixel(scores, label_t, states, groups)
            for b, summary in zip(keep, image_summaries(scores, label_t, self.keys, groups)):
                rows.image(chunk[b], summary)
        finally:  # the write ends within the call either way; its shard is recorded only if the chunk is
            path = shard.result() if shard is not None else None
        if path is not None:
            rows.shard(dataset, "scores", path)

    def _update_pixel(self, scores: list[torch.Tensor], label_t: torch.Tensor, states: dict,
                      groups: list[list[int]]) -> None:
        """Every key's ``PixelMetrics`` over the whole chunk, on the scores' device; the labels are checked once.
        Keys with bit-identical maps (``groups``: :func:`identical_groups`) are binned once and the counts added to
        each."""
        if scores:
            check_anomaly_labels(label_t, tuple(scores[0].shape))
        for group in groups:
            check_scores(scores[group[0]])
            if len(group) == 1:
                states.setdefault((group[0], "pixel"), self._pixel_metrics()).update(scores[group[0]], label_t)
                continue
            counts = self._pixel_metrics().update(scores[group[0]], label_t)
            for i in group:
                states.setdefault((i, "pixel"), self._pixel_metrics()).merge(counts)

    def _pixel_metrics(self) -> PixelMetrics:
        return PixelMetrics(smiyc=self.cfg.smiyc, validate=False)

    def _cache_outputs(self, dataset: str, outputs: Any, labels: np.ndarray, chunk: list[dict], rows: Rows) -> None:
        records = split_outputs(outputs)
        for rec, lab in zip(records, labels):
            rec["label"] = lab
        if not self.announced:
            per_image = sum(a.nbytes for a in records[0].values())
            rows.info(dataset, f"output cache: {per_image / 2**20:.1f} MiB per image (fp16 model outputs)")
            self.announced = True
        rows.shard(dataset, "outputs", self.ctx.cache(dataset, "outputs").write(records, [r["id"] for r in chunk]))


class ScoreStage(Stage):
    """read → score on an actor pool (one GPU per actor on a cluster)."""

    name = "score"

    def keys(self) -> list[ScorerKey]:
        return list(self.run.keys)

    def units(self, pending: list[str]) -> dict[str, UnitResult]:
        keys = self.keys()
        out = {}
        for k in pending:
            ds = self.run.datasets[k]
            unit = out[k] = UnitResult(self.run.infos[k], keys, expected=len(ds.samples))
            unit.failures += [{"image_id": "", "file": e.path, "stage": "list", "error": str(e)} for e in ds.errors]
        return out

    def stream(self, ray: Any, pending: list[str]) -> Any:
        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        cfg, run = self.run.cfg, self.run
        for k in pending:  # a unit redone after a crash starts from empty caches
            for kind in ("outputs", "scores", "refined"):
                run.cache(k, kind).delete()
        items = image_items({k: run.datasets[k] for k in pending})
        res, max_actors = run.resources(ray)
        calls = cfg.actor_concurrency or (2 if res["num_gpus"] else 1)  # a call's forward overlaps another's tail
        pool = ActorPoolStrategy(min_size=1, max_size=max_actors, max_concurrent_calls_per_actor=calls,
                                 enable_true_multi_threading=calls > 1)
        blocks = max(1, math.ceil(len(items) / cfg.batch_size))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(read_batch, fn_kwargs={"datasets": {k: run.datasets[k] for k in pending},
                                                   "protocol": cfg.protocol},
                            batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=cfg.read_num_cpus,
                            compute=TaskPoolStrategy(size=min(cfg.read_concurrency, blocks)))
        ds = ds.map_batches(ScoreActor, fn_constructor_args=(run.actor_context(self.keys()),),
                            batch_size=cfg.batch_size, batch_format="pyarrow", compute=pool, **res)
        return row_batches(ds)

    def after_commit(self, unit: UnitResult) -> None:
        self.run.scored[unit.info.key] = ScoredUnit(unit.n_images, {k: calibration(unit.metric(k, "pixel"))
                                                                    for k in unit.scored_keys()})
        cfg = self.run.cfg
        if not cfg.keep_score_cache and not cfg.refine:  # the refine stage still reads the score maps
            self.run.cache(unit.info.key, "scores").delete()
