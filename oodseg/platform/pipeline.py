"""The benchmark job on Ray Data: every (model × dataset × scorer × temperature) → Parquet results.

Per model, one streaming Ray Data pipeline covers all its pending datasets (the model loads once per actor):

1. **List** (driver): each dataset's ``SampleRef`` list → ``ray.data.from_items`` rows of paths only.
2. **Read** (CPU tasks, ``TaskPoolStrategy(size=read_concurrency)``, fractional ``num_cpus``): decode image + label
   (``Dataset.load``); a ``DataError`` (corrupt file, label of the wrong size) becomes a *failure row*, never a crash.
3. **Score** (``map_batches`` with the stateful :class:`ScoreActor` on ``ActorPoolStrategy(min_size, max_size)``,
   ``num_gpus=1`` per actor when the cluster has GPUs): loads the model once, runs ``model.predict`` under the
   ``Runtime`` (bf16 autocast on CUDA), applies every requested scorer/temperature with ``score_many`` (class scores
   computed once per class temperature) and emits, per call, the *merged* metric states of that batch
   (``PixelMetrics`` per scorer for anomaly sets, ``ConfusionMatrix`` for semantic sets; exact merges by
   addition) plus one small summary per image. No pixel array goes back through the object store: score maps
   (fp16) and, optionally, raw model outputs (fp16, the Tune output cache) are written by the actor to shards in
   ``<results>/cache/<run>/<model>/<dataset>/`` (see :mod:`oodseg.platform.cache`).
4. **Reduce** (driver): stream the small state rows and merge them per (dataset, scorer).
5. **Components** (second, cheap pass; CPU tasks): SMIYC component metrics (sIoU, PPV, mean F1) need a pixel
   threshold, chosen as the pixel-level best-F1 threshold of step 4. The tasks read the fp16 score maps back from
   the per-run cache, threshold them (``score > t``) and return ``ComponentMetrics`` states; so components are
   computed on fp16-rounded score maps (a documented part of the metric definition). The model never runs twice.
6. **Commit** (driver): per (run, model, dataset) unit the ``per_image``, ``failures``, ``curves`` parts and last
   ``metrics`` are written atomically (:mod:`oodseg.platform.results`); the scratch score maps are deleted.
   Rerunning with the same ``run_id`` skips committed units and clears the caches of unfinished ones.

CPU budget (2-core machines): actors and read tasks take fractional CPUs (``actor_num_cpus`` + ``read_num_cpus`` ×
``read_concurrency`` ≤ cluster CPUs is checked), so reads always find a CPU slot and the pipeline cannot deadlock
with the actor pool holding every CPU.
"""

from __future__ import annotations

import json
import os
import pickle
import platform as _platform
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from oodseg.config import to_json
from oodseg.platform.cache import ShardCache, split_outputs
from oodseg.platform.results import ResultsStore, safe_key

ANOMALY_DATASETS = ("road_anomaly_21", "road_obstacle_21", "fs_lost_found", "fs_static", "road_anomaly")
DEFAULT_DATASETS = (*ANOMALY_DATASETS, "cityscapes")


# ------------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One model to benchmark: a results ``name``, and how to build it.

    ``checkpoint="demo"`` uses the demo model trained on the synthetic suite (``oodseg.training.demo``). With an empty
    ``arch`` the checkpoint must be a ``save_safetensors`` file (it records architecture + cfg); otherwise
    ``create_model(arch, **cfg)`` is built and ``checkpoint`` (``.pth``/``.safetensors``, optional) loaded into it.
    """

    name: str = "demo"
    arch: str = ""
    checkpoint: str = "demo"
    cfg: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchmarkConfig:
    """Benchmark anomaly-segmentation models on road-scene datasets with Ray Data; results go to Parquet."""

    results: str = field(default="./results", metadata={"help": "results root: directory or s3://… URI"})
    run_id: str = field(default="", metadata={"help": "run id; reuse one to resume (empty: new id)"})
    data_root: str = field(default="", metadata={"help": "dataset root (empty: build/reuse the synthetic suite)"})
    cache_dir: str = field(
        default="", metadata={"help": "cache for suite + demo model ($OODSEG_CACHE or ./.cache/oodseg)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the synthetic suite and demo model"})
    models: tuple[ModelSpec, ...] = field(default=(ModelSpec(),), metadata={"help": "models (YAML list of ModelSpec)"})
    datasets: tuple[str, ...] = field(default=DEFAULT_DATASETS, metadata={"help": "registered dataset names"})
    max_images: int = field(default=0, metadata={"help": "at most this many images per dataset (0: all)"})
    scorers: tuple[str, ...] = field(default=(), metadata={"help": "scorer names (empty: every registered scorer)"})
    temperatures: tuple[float, ...] = field(default=(1.0,), metadata={"help": "temperatures applied to each scorer"})
    placements: tuple[str, ...] = field(default=("cl",), metadata={"help": "temperature placements for mask models"})
    component_metrics: bool = field(default=True, metadata={"help": "compute SMIYC sIoU/PPV/mean F1 (second pass)"})
    batch_size: int = field(default=8, metadata={"help": "images per actor call (model batch)"})
    num_actors: int = field(default=0, metadata={"help": "max scoring actors (0: #GPUs, or 1 on CPU)"})
    actor_num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per scoring actor"})
    read_num_cpus: float = field(default=0.5, metadata={"help": "CPUs per read/decode task"})
    read_concurrency: int = field(default=2, metadata={"help": "max concurrent read tasks"})
    torch_threads: int = field(default=0, metadata={"help": "torch CPU threads per actor (0: ceil(actor_num_cpus))"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    precision: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 | fp16"})
    cache_outputs: bool = field(default=True, metadata={"help": "keep fp16 model outputs (Tune output cache)"})
    keep_score_cache: bool = field(default=False, metadata={"help": "keep the scratch fp16 score maps"})
    heatmaps: int = field(default=2, metadata={"help": "heatmap overlays per anomaly dataset (first scorer)"})
    plots: bool = field(default=True, metadata={"help": "write PR/ROC plots and heatmaps under <results>/plots"})
    ray_address: str = field(default="", metadata={"help": "Ray address (empty: $RAY_ADDRESS, else a local Ray)"})
    num_cpus: int = field(default=0, metadata={"help": "CPUs of a locally started Ray (0: all)"})
    progress: bool = field(default=True, metadata={"help": "show Ray Data progress bars"})


@dataclass(frozen=True)
class ScorerKey:
    """One scoring method: scorer name, temperature placement and temperature."""

    scorer: str
    placement: str
    temperature: float

    @property
    def label(self) -> str:
        return f"{self.scorer}[{self.placement},T={self.temperature:g}]"


def scorer_names(cfg: BenchmarkConfig) -> list[str]:
    """The configured scorers (all registered ones by default); unknown names fail here, before any work."""
    from oodseg.scoring import list_scorers

    known = list_scorers()
    unknown = [n for n in cfg.scorers if n not in known]
    if unknown:
        raise ValueError(f"unknown scorer(s) {unknown}; registered: {known}")
    return list(cfg.scorers) or known


def scorer_keys(
    names: Sequence[str], placements: Sequence[str], temperatures: Sequence[float], output_kind: str
) -> list[ScorerKey]:
    """Scorer × placement × temperature; per-pixel models get only the first placement (both mean ``logits / T``)."""
    placements = list(placements) if output_kind == "mask" else list(placements)[:1]
    return [ScorerKey(n, p, float(t)) for n in names for p in placements for t in temperatures]


# ------------------------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    """Compact bytes for metric states crossing Ray (pickle of plain numpy dicts, zlib level 1)."""
    return zlib.compress(pickle.dumps(obj, protocol=5), 1)


def unpack(data: bytes) -> Any:
    return pickle.loads(zlib.decompress(data))


def in_submitted_job() -> bool:
    """True inside a ``ray job submit`` driver (its working directory is a throw-away copy of ``--working-dir``)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ


def default_cache_dir() -> Path:
    """``$OODSEG_CACHE``, else ``./.cache/oodseg``; in a submitted Ray job ``~/.cache/oodseg`` (the job's working
    directory is a fresh copy per submission, so a cache there would be rebuilt every time)."""
    if os.environ.get("OODSEG_CACHE"):
        return Path(os.environ["OODSEG_CACHE"]).resolve()
    if in_submitted_job():
        return Path.home() / ".cache" / "oodseg"
    return Path("./.cache/oodseg").resolve()


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": _platform.python_version()}
    for pkg in ("oodseg", "ray", "torch", "numpy", "pyarrow", "timm", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def load_model(spec: ModelSpec, cache_dir: Path | None = None, data_root: str | None = None, seed: int = 0):
    """Build the ``SegModel`` for ``spec`` (see :class:`ModelSpec`), weights loaded, in eval mode."""
    from oodseg.models import create_model, load_checkpoint, model_from_safetensors

    path = resolve_checkpoint(spec, cache_dir, data_root, seed)
    if not spec.arch:
        if not path:
            raise ValueError(f"model {spec.name!r}: give an arch or a save_safetensors checkpoint")
        model = model_from_safetensors(path, **spec.cfg)
    else:
        model = create_model(spec.arch, **spec.cfg)
        if path:
            load_checkpoint(model, path, strict=True)
    return model.eval()


def resolve_checkpoint(spec: ModelSpec, cache_dir: Path | None, data_root: str | None, seed: int) -> str:
    """The checkpoint file of ``spec``; ``"demo"`` trains (or reuses) the demo model on the synthetic suite."""
    if spec.checkpoint != "demo":
        return spec.checkpoint
    from oodseg.data.synthetic import MARKER
    from oodseg.training.demo import get_demo_checkpoint

    cache_dir = cache_dir or default_cache_dir()
    given = Path(data_root) if data_root else None
    suite = given if given is not None and (given / MARKER).is_file() else synthetic_suite(cache_dir, seed)
    return str(get_demo_checkpoint(suite, cache_dir, seed))


def synthetic_suite(cache_dir: Path, seed: int) -> Path:
    """Build (once) and return the synthetic road suite under ``cache_dir``."""
    from oodseg.data.synthetic import ensure_suite

    return Path(ensure_suite(Path(cache_dir) / f"suite-seed{seed}", seed=seed))


# ------------------------------------------------------------------------------------------------------------------
# Stage 2: read + decode (CPU tasks)
# ------------------------------------------------------------------------------------------------------------------

_READ_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()), ("idx", pa.int64()), ("id", pa.string()), ("image_path", pa.string()),
        ("height", pa.int64()), ("width", pa.int64()), ("image", pa.large_binary()), ("label", pa.large_binary()),
        ("stage", pa.string()), ("error", pa.string()),
    ]
)


def read_batch(batch: pa.Table, datasets: dict[str, Any]) -> pa.Table:
    """Decode each row's image + label; a ``DataError`` (or any decode error) becomes a failure row."""
    from oodseg.data import DataError, SampleRef

    cols: dict[str, list[Any]] = {f.name: [] for f in _READ_SCHEMA}
    for row in batch.to_pylist():
        ds = datasets[row["dataset"]]
        ref = SampleRef(row["id"], row["image_path"], row["label_path"] or None)
        image = label = None
        error = stage = ""
        try:
            sample = ds.load(ref)
            image, label = np.ascontiguousarray(sample["image"]), np.ascontiguousarray(sample["label"], dtype=np.uint8)
        except DataError as e:
            stage, error = "read", str(e)
        except Exception as e:  # noqa: BLE001 - any unexpected decoder failure is recorded, not fatal
            stage, error = "read", f"{row['image_path']}: {type(e).__name__}: {e}"
        cols["dataset"].append(row["dataset"])
        cols["idx"].append(row["idx"])
        cols["id"].append(row["id"])
        cols["image_path"].append(row["image_path"])
        cols["height"].append(0 if image is None else image.shape[0])
        cols["width"].append(0 if image is None else image.shape[1])
        cols["image"].append(b"" if image is None else image.tobytes())
        cols["label"].append(b"" if label is None else label.tobytes())
        cols["stage"].append(stage)
        cols["error"].append(error)
    return pa.Table.from_pydict(cols, schema=_READ_SCHEMA)


# ------------------------------------------------------------------------------------------------------------------
# Stage 3: the scoring actor
# ------------------------------------------------------------------------------------------------------------------

_OUT_SCHEMA = pa.schema(
    [
        ("row", pa.string()),  # "image" | "state" | "failure"
        ("dataset", pa.string()), ("idx", pa.int64()), ("id", pa.string()), ("image_path", pa.string()),
        ("summary", pa.string()), ("state", pa.large_binary()), ("stage", pa.string()), ("error", pa.string()),
    ]
)


_F16_MAX = float(np.finfo(np.float16).max)  # score maps are clipped to it before the fp16 cast (no inf)


@dataclass(frozen=True)
class DatasetInfo:
    """What the actor and the reducer need to know about a dataset."""

    name: str
    kind: str  # "anomaly" | "semantic"
    track: str | None
    num_classes: int


def _image_summary(scores: Sequence[np.ndarray], label: np.ndarray, keys: Sequence[ScorerKey]) -> list[dict]:
    """Per-scorer mean inlier / anomaly score and max score of one image (float64 accumulation)."""
    inl, ano = label == 0, label == 1
    out = []
    for key, s in zip(keys, scores):
        s = s.astype(np.float64, copy=False)
        out.append(
            {
                "scorer": key.scorer, "placement": key.placement, "temperature": key.temperature,
                "n_valid": int(inl.sum() + ano.sum()), "n_anomaly": int(ano.sum()),
                "score_mean_inlier": float(s[inl].mean()) if inl.any() else None,
                "score_mean_anomaly": float(s[ano].mean()) if ano.any() else None,
                "score_max": float(s.max()),
            }
        )
    return out


class ScoreActor:
    """Stateful Ray Data UDF: model loaded once; per call → merged metric states + per-image summaries.

    Also writes fp16 score maps (for the component pass) and, with ``cache_outputs``, fp16 model outputs (the
    Tune output cache) to the per-run shard cache, one shard per dataset per call.
    """

    def __init__(
        self,
        spec: ModelSpec,
        checkpoint: str,
        keys: Sequence[ScorerKey],
        infos: dict[str, DatasetInfo],
        results_root: str,
        run_id: str,
        device: str = "auto",
        precision: str = "auto",
        torch_threads: int = 1,
        cache_outputs: bool = True,
        write_scores: bool = True,
        model_batch: int = 8,
    ) -> None:
        import torch

        from oodseg.models import Runtime
        from oodseg.scoring import create_scorer

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.runtime = Runtime(device=device, precision=precision)
        self.model = self.runtime.prepare(load_model(ModelSpec(spec.name, spec.arch, checkpoint, spec.cfg)))
        # per-pixel models: one placement (the driver passes every placement of the config)
        first = keys[0].placement if keys else "cl"
        self.keys = [k for k in keys if self.model.output_kind == "mask" or k.placement == first]
        self.scorers = [create_scorer(k.scorer, temperature=k.temperature, placement=k.placement) for k in self.keys]
        self.infos = infos
        self.results_root = results_root
        self.run_id = run_id
        self.model_name = spec.name
        self.cache_outputs = cache_outputs
        self.write_scores = write_scores
        self.model_batch = max(1, int(model_batch))
        self.writer = f"{socket.gethostname()}-{os.getpid()}"
        self.calls = 0

    def _cache(self, dataset: str, kind: str) -> ShardCache:
        return ShardCache(self.results_root, self.run_id, self.model_name, dataset, kind)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from oodseg.scoring import pixel_class_scores, score_many
        from oodseg.scoring.metrics import ConfusionMatrix, PixelMetrics

        self.calls += 1
        out: dict[str, list[Any]] = {f.name: [] for f in _OUT_SCHEMA}

        def emit(row: str, r: dict, summary: Any = None, state: bytes = b"", stage: str = "", error: str = "") -> None:
            out["row"].append(row)
            for k in ("dataset", "idx", "id", "image_path"):
                out[k].append(r.get(k, "" if k != "idx" else -1))
            out["summary"].append(json.dumps(summary) if summary is not None else "")
            out["state"].append(state)
            out["stage"].append(stage)
            out["error"].append(error)

        groups: dict[tuple[str, int, int], list[dict]] = defaultdict(list)
        for r in batch.to_pylist():
            if r["error"]:
                emit("failure", r, stage=r["stage"], error=r["error"])
                continue
            groups[(r["dataset"], r["height"], r["width"])].append(r)

        states: dict[str, dict[Any, Any]] = {}
        for (dataset, h, w), rows in groups.items():
            info = self.infos[dataset]
            st = states.setdefault(dataset, {})
            for start in range(0, len(rows), self.model_batch):
                chunk = rows[start : start + self.model_batch]
                images = np.stack([np.frombuffer(r["image"], np.uint8).reshape(h, w, 3) for r in chunk])
                labels = np.stack([np.frombuffer(r["label"], np.uint8).reshape(h, w) for r in chunk])
                try:
                    with torch.inference_mode(), self.runtime.autocast():
                        outputs = self.model.predict(torch.from_numpy(images))
                    records: list[dict[str, np.ndarray]] = []
                    if info.kind == "semantic":
                        pred = pixel_class_scores(outputs, 1.0, (h, w)).argmax(dim=1).to("cpu", torch.uint8).numpy()
                        cm = st.setdefault("confusion", ConfusionMatrix(info.num_classes))
                        for b, r in enumerate(chunk):
                            cm.update(pred[b], labels[b])
                            valid = labels[b] != 255
                            acc = float((pred[b][valid] == labels[b][valid]).mean()) if valid.any() else None
                            emit("image", r, summary=[{"pixel_acc": acc, "n_valid": int(valid.sum())}])
                    else:
                        on_device = score_many(outputs, self.scorers, (h, w))
                        label_t = torch.from_numpy(labels).to(on_device[0].device) if on_device else None
                        for key, s in zip(self.keys, on_device):  # binned on the actor's device, whole chunk
                            st.setdefault(key, PixelMetrics()).update(s, label_t)
                        scores = [s.cpu().numpy() for s in on_device]
                        for b, r in enumerate(chunk):
                            per = [s[b] for s in scores]
                            emit("image", r, summary=_image_summary(per, labels[b], self.keys))
                            if self.write_scores:
                                maps = np.clip(np.stack(per), -_F16_MAX, _F16_MAX).astype(np.float16)
                                records.append({"label": labels[b], "scores": maps})
                        if self.write_scores:
                            self._cache(dataset, "scores").write(
                                f"{self.writer}-{self.calls}-{start}", records, [r["id"] for r in chunk]
                            )
                    if self.cache_outputs:
                        recs = split_outputs(outputs)
                        for rec, lab in zip(recs, labels):
                            rec["label"] = lab
                        self._cache(dataset, "outputs").write(
                            f"{self.writer}-{self.calls}-{start}", recs, [r["id"] for r in chunk]
                        )
                except Exception as e:  # noqa: BLE001 - one bad batch must not kill the job; recorded per image
                    for r in chunk:
                        emit("failure", r, stage="predict", error=f"{r['image_path']}: {type(e).__name__}: {e}")
        for dataset, st in states.items():
            plain = {k: v.state_dict() for k, v in st.items()}
            emit("state", {"dataset": dataset}, state=pack(plain))
        return pa.Table.from_pydict(out, schema=_OUT_SCHEMA)


# ------------------------------------------------------------------------------------------------------------------
# Stage 5: components from the cached fp16 score maps
# ------------------------------------------------------------------------------------------------------------------


def component_batch(
    batch: pa.Table, results_root: str, run_id: str, model: str, thresholds: dict[str, dict[int, float]],
    tracks: dict[str, str],
) -> pa.Table:
    """For each score shard: ``ComponentMetrics`` per scorer index at that dataset's best-F1 threshold."""
    from oodseg.scoring.metrics import ComponentMetrics

    datasets, states = [], []
    for row in batch.to_pylist():
        dataset = row["dataset"]
        cache = ShardCache(results_root, run_id, model, dataset, "scores")
        metrics = {
            i: ComponentMetrics(t, track=tracks[dataset]) for i, t in thresholds[dataset].items()
        }
        for item in cache.items([row["path"]]):
            for i, m in metrics.items():
                m.update(item.scores[i], item.label)
        datasets.append(dataset)
        states.append(pack({i: m.state_dict() for i, m in metrics.items()}))
    return pa.table({"dataset": datasets, "state": pa.array(states, pa.large_binary())})


# ------------------------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------------------------


def init_ray(cfg: BenchmarkConfig):
    """Connect to the cluster in ``cfg.ray_address`` / ``$RAY_ADDRESS`` or start a local Ray."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if address is None:
        kwargs.update(include_dashboard=False)
        if cfg.num_cpus:
            kwargs["num_cpus"] = cfg.num_cpus
    ray.init(address=address, **kwargs)
    return ray


def _log(msg: str) -> None:
    print(f"[oodseg {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class UnitResult:
    """The reduced results of one (model, dataset) unit before commit."""

    info: DatasetInfo
    pixel: dict[ScorerKey, Any] = field(default_factory=dict)
    confusion: Any = None
    components: dict[ScorerKey, Any] = field(default_factory=dict)
    summaries: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    n_images: int = 0
    wall_s: float = 0.0


class BenchmarkRunner:
    """Runs :class:`BenchmarkConfig` on Ray and commits each (model, dataset) unit to the results store."""

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.cfg = cfg
        self.run_id = cfg.run_id or new_run_id()
        self.store = ResultsStore(cfg.results)
        self.cache_dir = Path(cfg.cache_dir).resolve() if cfg.cache_dir else default_cache_dir()
        #: wall seconds per stage, summed over models (``score_pass``, ``component_pass``, ``commit``)
        self.timings: dict[str, float] = defaultdict(float)
        self.n_images = 0

    # -- setup ---------------------------------------------------------------------------------------------------
    def data_root(self) -> str:
        if self.cfg.data_root:
            return self.cfg.data_root
        return str(synthetic_suite(self.cache_dir, self.cfg.seed))

    def open_datasets(self, root: str) -> dict[str, Any]:
        """Every configured dataset that can be listed; one that cannot (missing folder, …) is recorded in
        ``failures`` (stage ``open``) and left out, so the rest of the benchmark still runs."""
        from oodseg.data import DataError, create_dataset

        out = {}
        for name in self.cfg.datasets:
            try:
                ds = create_dataset(name, root=root, strict=False)
            except DataError as e:
                _log(f"dataset {name} cannot be opened: {e}")
                self.store.write_part("failures", safe_key(self.run_id, "open", name), [
                    {"run_id": self.run_id, "model": "", "dataset": name, "image_id": "", "file": e.path,
                     "stage": "open", "error": str(e)}
                ])
                continue
            if self.cfg.max_images and len(ds.samples) > self.cfg.max_images:
                ds.samples = ds.samples[: self.cfg.max_images]
            out[name] = ds
        return out

    def _resources(self, ray) -> tuple[dict[str, Any], int]:
        """Actor resources + pool size; checks the CPU budget leaves room for the read tasks."""
        cluster = ray.cluster_resources()
        n_gpu = int(cluster.get("GPU", 0))
        n_cpu = float(cluster.get("CPU", 1))
        use_gpu = n_gpu > 0 and self.cfg.device in ("auto", "cuda")
        max_actors = self.cfg.num_actors or (n_gpu if use_gpu else 1)
        if not use_gpu:
            # keep ≥ one read slot free: actors × cpus + reads × cpus must fit the cluster
            budget = n_cpu - self.cfg.read_num_cpus * max(1, self.cfg.read_concurrency)
            max_actors = max(1, min(max_actors, int(budget // max(self.cfg.actor_num_cpus, 1e-3))))
            if self.cfg.actor_num_cpus + self.cfg.read_num_cpus > n_cpu:
                raise ValueError(
                    f"actor_num_cpus={self.cfg.actor_num_cpus} + read_num_cpus={self.cfg.read_num_cpus} exceed the "
                    f"cluster's {n_cpu} CPUs: the reads would starve"
                )
        res = {"num_cpus": self.cfg.actor_num_cpus, "num_gpus": 1 if use_gpu else 0}
        return res, max_actors

    # -- main ------------------------------------------------------------------------------------------------------
    def run(self) -> str:
        """Run every pending unit; returns the run id."""
        t_start = time.time()
        ray = init_ray(self.cfg)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = self.cfg.progress
        ctx.enable_operator_progress_bars = self.cfg.progress
        root = self.data_root()
        _log(f"run {self.run_id}: results → {self.store.root}, data ← {root}")
        attempt = uuid.uuid4().hex[:8]
        run_row = {
            "run_id": self.run_id, "attempt": attempt, "job": "benchmark", "status": "running",
            "started_at": datetime.now(timezone.utc), "config_json": to_json(self.cfg), "git_sha": git_sha(),
            "versions_json": json.dumps(package_versions()), "seed": self.cfg.seed, "host": socket.gethostname(),
            "gpu": _gpu_names(ray),
        }
        run_key = f"{self.run_id}__{attempt}"
        self.store.write_part("runs", run_key, [run_row])
        datasets = self.open_datasets(root)
        done = self.store.completed_units(self.run_id)
        status = "finished"
        try:
            for spec in self.cfg.models:
                pending = [d for d in datasets if (spec.name, d) not in done]
                if not pending:
                    _log(f"{spec.name}: all units already committed, skipping")
                    continue
                if len(pending) < len(datasets):
                    _log(f"{spec.name}: resuming, {len(datasets) - len(pending)} unit(s) already committed")
                self.run_model(ray, spec, {d: datasets[d] for d in pending}, root)
        except BaseException:
            status = "failed"
            raise
        finally:
            run_row.update(status=status, finished_at=datetime.now(timezone.utc), wall_s=time.time() - t_start)
            self.store.write_part("runs", run_key, [run_row])
        return self.run_id

    def run_model(self, ray, spec: ModelSpec, datasets: dict[str, Any], root: str) -> None:
        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        t0 = time.time()
        checkpoint = resolve_checkpoint(spec, self.cache_dir, self.cfg.data_root or root, self.cfg.seed)
        # every placement goes to the actors; which ones apply depends on the model's output kind, known there
        all_keys = scorer_keys(scorer_names(self.cfg), self.cfg.placements, self.cfg.temperatures, "mask")
        infos = {
            n: DatasetInfo(n, ds.kind, ds.track, int(getattr(ds, "num_classes", 19))) for n, ds in datasets.items()
        }
        for n in datasets:  # a unit redone after a crash starts from empty caches
            for kind in ("outputs", "scores"):
                ShardCache(self.store.root, self.run_id, spec.name, n, kind).delete()
        results = {n: UnitResult(infos[n]) for n in datasets}
        for n, ds in datasets.items():
            for err in getattr(ds, "errors", []):
                results[n].failures.append({"image_id": "", "file": err.path, "stage": "list", "error": str(err)})
        items = [
            {"dataset": n, "idx": i, "id": ref.id, "image_path": ref.image_path, "label_path": ref.label_path or ""}
            for n, ds in datasets.items()
            for i, ref in enumerate(ds.samples)
        ]
        _log(f"{spec.name}: {len(items)} images in {len(datasets)} dataset(s)")
        if items:
            res, max_actors = self._resources(ray)
            threads = self.cfg.torch_threads or max(1, int(np.ceil(self.cfg.actor_num_cpus)))
            rows_per_block = max(1, self.cfg.batch_size)
            ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // rows_per_block)))
            ds = ds.map_batches(
                read_batch,
                fn_kwargs={"datasets": datasets},
                batch_size=rows_per_block,
                batch_format="pyarrow",
                num_cpus=self.cfg.read_num_cpus,
                compute=TaskPoolStrategy(size=max(1, self.cfg.read_concurrency)),
            )
            ds = ds.map_batches(
                ScoreActor,
                fn_constructor_kwargs=dict(
                    spec=spec, checkpoint=checkpoint, keys=all_keys, infos=infos, results_root=self.store.root,
                    run_id=self.run_id, device=self.cfg.device, precision=self.cfg.precision, torch_threads=threads,
                    cache_outputs=self.cfg.cache_outputs,
                    write_scores=self.cfg.component_metrics or (self.cfg.plots and self.cfg.heatmaps > 0),
                    model_batch=self.cfg.batch_size,
                ),
                batch_size=self.cfg.batch_size,
                batch_format="pyarrow",
                compute=ActorPoolStrategy(min_size=1, max_size=max_actors),
                **res,
            )
            t_pass = time.time()
            self._reduce(ds, results, len(items))
            self.timings["score_pass"] += time.time() - t_pass
            self.n_images += len(items)
        keys = [k for k in all_keys if any(k in unit.pixel for unit in results.values())]
        t_pass = time.time()
        self._components(ray, spec, results, keys)
        self.timings["component_pass"] += time.time() - t_pass
        t_pass = time.time()
        for n, unit in results.items():
            unit.wall_s = time.time() - t0
            self._commit(spec, n, unit, keys)
            if self.cfg.plots and self.cfg.heatmaps > 0 and unit.info.kind == "anomaly" and keys:
                self._heatmaps(spec, n, datasets[n], keys)
            if not self.cfg.keep_score_cache:
                ShardCache(self.store.root, self.run_id, spec.name, n, "scores").delete()
        self.timings["commit"] += time.time() - t_pass
        _log(f"{spec.name}: done in {time.time() - t0:.1f} s")

    def _reduce(self, ds, results: dict[str, UnitResult], total: int) -> None:
        """Stream the actor outputs, merging metric states per dataset; logs progress every ~10 %."""
        from oodseg.scoring.metrics import ConfusionMatrix, PixelMetrics

        seen, next_report, t0 = 0, max(1, total // 10), time.time()
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for r in batch.to_pylist():
                unit = results[r["dataset"]]
                if r["row"] != "state":
                    seen += 1
                    if seen >= next_report or seen == total:
                        _log(f"scored {seen}/{total} images ({seen / max(time.time() - t0, 1e-9):.1f} images/s)")
                        next_report = seen + max(1, total // 10)
                if r["row"] == "failure":
                    unit.failures.append(
                        {"image_id": r["id"], "file": r["image_path"], "stage": r["stage"], "error": r["error"]}
                    )
                elif r["row"] == "image":
                    unit.n_images += 1
                    for s in json.loads(r["summary"]):
                        unit.summaries.append({"image_id": r["id"], "image_path": r["image_path"], **s})
                else:
                    for k, sd in unpack(r["state"]).items():
                        if k == "confusion":
                            cm = ConfusionMatrix.from_state_dict(sd)
                            unit.confusion = cm if unit.confusion is None else unit.confusion.merge(cm)
                        else:
                            pm = PixelMetrics.from_state_dict(sd)
                            unit.pixel[k] = pm if k not in unit.pixel else unit.pixel[k].merge(pm)

    def _components(self, ray, spec: ModelSpec, results: dict[str, UnitResult], keys: Sequence[ScorerKey]) -> None:
        """Second pass: component metrics at each scorer's pixel-level best-F1 threshold (see module docstring)."""
        from ray.data import TaskPoolStrategy

        from oodseg.scoring.metrics import ComponentMetrics

        if not self.cfg.component_metrics:
            return
        thresholds: dict[str, dict[int, float]] = {}
        tracks: dict[str, str] = {}
        rows = []
        for n, unit in results.items():
            if unit.info.kind != "anomaly":
                continue
            th = {}
            for i, k in enumerate(keys):
                pm = unit.pixel.get(k)
                if pm is None:
                    continue
                t = _quiet_compute(pm)["threshold"]
                if np.isfinite(t):
                    th[i] = float(t)
            if not th:
                continue
            thresholds[n] = th
            tracks[n] = unit.info.track if unit.info.track in ("anomaly", "obstacle") else "anomaly"
            cache = ShardCache(self.store.root, self.run_id, spec.name, n, "scores")
            rows += [{"dataset": n, "path": p} for p in cache.shards()]
        if not rows:
            return
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            component_batch,
            fn_kwargs=dict(
                results_root=self.store.root, run_id=self.run_id, model=spec.name, thresholds=thresholds,
                tracks=tracks,
            ),
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=self.cfg.read_num_cpus,
            compute=TaskPoolStrategy(size=max(1, self.cfg.read_concurrency)),
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for r in batch.to_pylist():
                unit = results[r["dataset"]]
                for i, sd in unpack(r["state"]).items():
                    cm = ComponentMetrics.from_state_dict(sd)
                    k = keys[i]
                    unit.components[k] = cm if k not in unit.components else unit.components[k].merge(cm)

    def _commit(self, spec: ModelSpec, dataset: str, unit: UnitResult, keys: Sequence[ScorerKey]) -> None:
        base = {"run_id": self.run_id, "model": spec.name, "dataset": dataset}
        metric_rows, curve_rows = [], []
        n_fail = len(unit.failures)
        if unit.info.kind == "semantic":
            cm = unit.confusion.compute() if unit.confusion is not None else {}
            metric_rows.append(
                {
                    **base, "kind": "semantic", "track": unit.info.track,
                    "miou": cm.get("miou"), "pixel_acc": cm.get("pixel_accuracy"),
                    "n_images": unit.n_images,
                    "n_pixels": int(unit.confusion.matrix.sum()) if unit.confusion is not None else 0,
                    "n_failures": n_fail, "wall_s": unit.wall_s,
                    "extra_json": json.dumps({"iou_per_class": cm.get("iou_per_class")}),
                }
            )
        for k in keys:
            pm = unit.pixel.get(k)
            if unit.info.kind != "anomaly":
                break
            px = _quiet_compute(pm) if pm is not None else {}
            comp = unit.components[k].compute() if k in unit.components else {}
            metric_rows.append(
                {
                    **base, "kind": "anomaly", "track": unit.info.track, "scorer": k.scorer,
                    "placement": k.placement, "temperature": k.temperature,
                    "auprc": px.get("auprc"), "fpr95": px.get("fpr95"), "auroc": px.get("auroc"),
                    "best_f1": px.get("best_f1"), "best_threshold": px.get("threshold"),
                    "siou": comp.get("siou"), "ppv": comp.get("ppv"), "mean_f1": comp.get("mean_f1"),
                    "n_images": unit.n_images, "n_pixels": px.get("n_pixels", 0),
                    "n_anomaly_pixels": px.get("n_anomaly", 0), "anomaly_fraction": px.get("anomaly_fraction"),
                    "n_failures": n_fail, "wall_s": unit.wall_s,
                    "extra_json": json.dumps(
                        {"f1_per_tau": comp.get("f1"), "n_gt_components": comp.get("n_gt"),
                         "n_pred_components": comp.get("n_pred")}
                    ),
                }
            )
            if pm is not None and px.get("n_anomaly", 0) and px.get("n_pixels", 0) > px.get("n_anomaly", 0):
                cv = pm.curves(max_points=256)
                common = {**base, "scorer": k.scorer, "placement": k.placement, "temperature": k.temperature}
                curve_rows.append({**common, "curve": "pr", "x": cv["recall"], "y": cv["precision"]})
                curve_rows.append({**common, "curve": "roc", "x": cv["fpr"], "y": cv["tpr"]})
        if not metric_rows:  # e.g. every image failed: still mark the unit done
            metric_rows.append({**base, "kind": unit.info.kind, "track": unit.info.track, "n_images": unit.n_images,
                                "n_failures": n_fail, "wall_s": unit.wall_s})
        now = datetime.now(timezone.utc)
        for r in metric_rows:
            r["committed_at"] = now
        tables: dict[str, Any] = {"metrics": metric_rows}
        per_image = [{**base, **s} for s in unit.summaries]
        if per_image:
            tables["per_image"] = per_image
        if unit.failures:
            tables["failures"] = [{**base, **f} for f in unit.failures]
        if curve_rows:
            tables["curves"] = curve_rows
        self.store.commit_unit(self.run_id, spec.name, dataset, tables)
        _log(
            f"{spec.name}/{dataset}: committed {unit.n_images} images, {len(metric_rows)} metric row(s), "
            f"{n_fail} failure(s)"
        )

    def _heatmaps(self, spec: ModelSpec, dataset: str, ds: Any, keys: Sequence[ScorerKey]) -> None:
        from oodseg.report import save_heatmap

        cache = ShardCache(self.store.root, self.run_id, spec.name, dataset, "scores")
        by_id = {ref.id: ref for ref in ds.samples}
        idx = next((i for i, k in enumerate(keys) if k.scorer == "msp"), 0)
        written = 0
        for item in cache.items():
            if written >= self.cfg.heatmaps:
                break
            if not (item.label == 1).any():
                continue
            image = ds.load(by_id[item.id])["image"]
            title = f"{dataset} {item.id} {keys[idx].label}"
            data = save_heatmap(image, item.scores[idx].astype(np.float32), item.label, title=title)
            self.store.write_bytes(f"plots/{self.run_id}/heatmaps/{spec.name}__{dataset}__{item.id}.png", data)
            written += 1


def _quiet_compute(pm: Any) -> dict[str, Any]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return pm.compute()


def _gpu_names(ray) -> str:
    n = int(ray.cluster_resources().get("GPU", 0))
    if not n:
        return ""
    try:
        import torch

        local = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "remote"
    except Exception:  # noqa: BLE001
        local = "unknown"
    return f"{n}x {local}"


def run_benchmark(cfg: BenchmarkConfig) -> str:
    """Run the benchmark described by ``cfg``; returns the run id (results under ``cfg.results``)."""
    return BenchmarkRunner(cfg).run()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI of the benchmark job: parse the config, run, print the standard table, draw the PR/ROC plots."""
    from oodseg.config import parse_config
    from oodseg.report import component_table, format_components, format_table, plot_curves, standard_table

    cfg = parse_config(BenchmarkConfig, argv, prog="python jobs/benchmark.py")
    if in_submitted_job() and "://" not in cfg.results and not os.path.isabs(cfg.results):
        _log(f"WARNING: results={cfg.results!r} is relative to this job's temporary working directory "
             f"({os.getcwd()}); pass --results with an absolute path or an s3:// URI to keep them")
    t0 = time.time()
    run_id = run_benchmark(cfg)
    store = ResultsStore(cfg.results)
    table, info = standard_table(store, run_id)
    print(format_table(table, info), flush=True)
    if not table.empty:
        print(format_components(component_table(store, run_id)), flush=True)
    if cfg.plots:
        for path in plot_curves(store, run_id):
            _log(f"plot: {path}")
    n_fail = len(store.duckdb().execute("SELECT 1 FROM failures WHERE run_id = ?", [run_id]).fetchall())
    if n_fail:
        print(f"{n_fail} input failure(s) recorded in the failures table", flush=True)
    print(f"run {run_id} finished in {time.time() - t0:.1f} s; results in {store.root}", flush=True)
    return 0
