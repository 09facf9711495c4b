"""Fine-tuning on Ray Train (``TorchTrainer``, Train V2) with DeepSpeed ZeRO 0/1/2 or plain DDP.

The loop itself is :func:`oodseg.training.loop.fit`, written once; here only what Ray adds (Ray's DeepSpeed example
shape): each worker builds its :class:`~oodseg.training.strategy.Strategy` from its rank and device, restores from
``ray.train.get_checkpoint()`` (a retry after a worker failure, or a rerun with the same ``name`` + ``storage_path``)
and reports validation rows and checkpoint directories with ``ray.train.report`` (DeepSpeed: every rank saves its
ZeRO partition and Ray merges the directories; rank 0 adds ``history.json``, ``run.json`` and, at the end,
``model.safetensors``). Rank 0 also puts each row on a queue the driver prints from (one progress line per
``log_every`` steps); the rows in between are not Train reports: a worker's report waits for the controller's next
poll of the workers, so progress lines closer together than its interval throttled training (``oodseg/process.py``).

Before Ray starts, :func:`check_resume` compares the newest checkpoint of ``<storage_path>/<name>`` with this run:
any difference in its fingerprint (:func:`oodseg.training.loop.run_fingerprint`: the strategy and every
``TrainConfig`` field) other than ``steps`` and ``log_every`` is an error naming every differing key, not a silent
resume; so is asking for fewer steps than the checkpoint has trained.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs

from oodseg.config import ConfigError, from_dict, to_dict, to_json
from oodseg.config import help_meta as _h
from oodseg.models import resolve_checkpoint, setup_worker
from oodseg.paths import default_cache_dir, synthetic_suite
from oodseg.platform.results import resolve_fs
from oodseg.training.config import TrainConfig
from oodseg.training.loop import HISTORY, MODEL, RESUMABLE, RUN, fit, run_fingerprint
from oodseg.training.strategy import create_strategy
from oodseg.training.tasks import TASKS


@dataclass(frozen=True)
class FinetuneConfig:
    """A Ray Train fine-tuning run: the pure-torch ``train`` settings plus distribution / storage settings."""

    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = field(default="finetune", metadata=_h("run name; rerunning the same name + storage path resumes"))
    storage_path: str = field(default="results/finetune", metadata=_h("Ray Train storage (runs, checkpoints)"))
    strategy: Literal["deepspeed", "ddp"] = field(default="deepspeed", metadata=_h("distribution strategy",
                                                                                   choices=("deepspeed", "ddp")))
    zero_stage: int = field(default=1, metadata=_h("DeepSpeed ZeRO stage", choices=(0, 1, 2)))
    num_workers: int = field(default=2, metadata=_h("Ray Train workers"))
    use_gpu: bool = field(default=False, metadata=_h("one GPU per worker"))
    cpus_per_worker: int = field(default=1, metadata=_h("CPUs (and torch threads) per worker"))
    max_failures: int = field(default=1, metadata=_h("worker failures to recover from (FailureConfig)"))
    checkpoint_every: int = field(default=50, metadata=_h("checkpoint every N steps (and at the end)"))
    keep_checkpoints: int = field(default=2, metadata=_h("checkpoints kept (0: all)"))
    export: str = field(default="", metadata=_h("copy the final model.safetensors here (empty: <storage>/<name>"
                                                ".safetensors)"))
    shm_comm: bool = field(default=False, metadata=_h("CPU: use DeepSpeed's compiled shm all-reduce"))
    extensions_dir: str = field(default=".cache/torch_extensions", metadata=_h("TORCH_EXTENSIONS_DIR"))
    results: str = field(default="./results", metadata=_h("results store for the runs table"))
    ray_address: str = field(default="", metadata=_h("Ray address (empty: $RAY_ADDRESS, else a local Ray)"))
    num_cpus: int = field(default=0, metadata=_h("CPUs of a locally started Ray (0: all)"))
    verbose: bool = field(default=False, metadata=_h("show Ray's own log output"))

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2 (ZeRO-3 shards weights; export needs them whole), "
                             f"got {self.zero_stage}")
        if self.num_workers < 1 or self.checkpoint_every < 1:
            raise ValueError("num_workers and checkpoint_every must be ≥ 1")
        if self.train.global_batch % (self.num_workers * self.train.accum):
            raise ValueError(f"train.global_batch {self.train.global_batch} must be divisible by num_workers "
                             f"({self.num_workers}) x train.accum ({self.train.accum})")

    @property
    def storage(self) -> str:
        """``storage_path`` as Ray Train and the checkpoint lookup take it: a URI as given, a local path absolute."""
        if "://" in self.storage_path:
            return self.storage_path.rstrip("/")
        return str(Path(self.storage_path).expanduser().resolve())

    @property
    def export_path(self) -> str:
        """``export``, else ``<storage_path>/<name>.safetensors`` (a path or a URI, as ``storage_path``)."""
        return self.export or f"{self.storage}/{self.name}.safetensors"


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train worker entry point (``config`` = ``{"finetune": to_dict(FinetuneConfig), "step_hook": …,
    "progress": queue}``); returns (rank 0) every reported row, including those from before a resume."""
    import ray.train
    import ray.train.torch

    cfg: FinetuneConfig = from_dict(FinetuneConfig, config["finetune"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    setup_worker(cfg.cpus_per_worker, "cuda" if cfg.use_gpu else "cpu")
    strategy = create_strategy(cfg.strategy, zero_stage=cfg.zero_stage, shm_comm=cfg.shm_comm,
                               device=ray.train.torch.get_device(), rank=rank, world=ctx.get_world_size())
    report = functools.partial(report_row, rank=rank, progress=config.get("progress"))
    checkpoint = ray.train.get_checkpoint()
    export = {"oodseg.finetune.config": to_json(cfg)}
    if checkpoint is None:
        result = fit(cfg.train, strategy, report=report, checkpoint_every=cfg.checkpoint_every, export=export,
                     step_hook=config.get("step_hook"))
    else:
        with checkpoint.as_directory() as resume:
            result = fit(cfg.train, strategy, resume=Path(resume), report=report,
                         checkpoint_every=cfg.checkpoint_every, export=export, step_hook=config.get("step_hook"))
    strategy.close()
    return result.history


def report_row(row: dict[str, Any], directory: Path | None, rank: int, progress: Any = None) -> None:
    """A worker's ``fit`` report: rank 0 puts ``row`` on the driver's ``progress`` queue (if any); a row with
    validation metrics (``val_*``: all-gathered, so every rank decides alike) or a checkpoint ``directory`` is also a
    ``ray.train.report``, a progress row is not (the module docstring)."""
    import ray.train

    if progress is not None and rank == 0:
        progress.put_nowait(row)
    if directory is None and not any(k.startswith("val_") for k in row):
        return
    has_files = directory is not None and any(directory.iterdir())
    ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(str(directory)) if has_files else None)


def resolve_data(cfg: FinetuneConfig, cache_dir: str | os.PathLike[str] | None = None) -> FinetuneConfig:
    """Fill in the synthetic defaults and named checkpoints before Ray starts: no ``train.data_root`` → the
    synthetic suite (built once under the cache, the one the benchmark job uses) with its ``coco/`` folder as the OE
    source and, for the segmentation task, the demo model as the default ``init``; ``train.init`` a named source
    (``demo``: the demo model of that suite, ``scratch``: random init) → its file (or None)."""
    tc = cfg.train
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if not tc.data_root:
        suite = synthetic_suite(cache, tc.seed)
        init = tc.init or ("demo" if tc.task == "segmentation" else None)  # the other tasks build their own models
        tc = replace(tc, data_root=str(suite), coco_root=tc.coco_root or str(suite / "coco"), init=init)
    init = resolve_checkpoint(tc.init, cache_dir=cache, data_root=tc.data_root, seed=tc.seed)
    return replace(cfg, train=TASKS.get(tc.task).resolve(replace(tc, init=init), cache))


@dataclass(frozen=True)
class StoredCheckpoint:
    """A ``checkpoint_*`` directory of a run where Ray Train stored it: a local or shared directory, or any URI
    ``pyarrow.fs`` opens (``s3://bucket/prefix``, ``gs://…``), which is also what Ray Train writes through."""

    fs: pafs.FileSystem
    path: str

    def read_json(self, name: str) -> Any:
        with self.fs.open_input_stream(f"{self.path}/{name}") as f:
            return json.loads(f.read())

    def has(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{name}").type == pafs.FileType.File

    def __str__(self) -> str:
        return self.path if isinstance(self.fs, pafs.LocalFileSystem) else f"{self.fs.type_name}://{self.path}"


def run_location(cfg: FinetuneConfig) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path of ``<storage_path>/<name>`` inside it)."""
    fs, base = resolve_fs(cfg.storage)
    return fs, f"{base}/{cfg.name}"


def latest_checkpoint(cfg: FinetuneConfig) -> StoredCheckpoint | None:
    """The newest ``checkpoint_*`` directory of the run that has our ``run.json`` (None: a fresh run)."""
    fs, run = run_location(cfg)
    infos = fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
    found = [StoredCheckpoint(fs, i.path) for i in sorted(infos, key=lambda i: i.path)
             if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    found = [c for c in found if c.has(RUN)]
    return found[-1] if found else None


def checkpoint_step(checkpoint: StoredCheckpoint) -> int:
    """The step a checkpoint directory was saved at (its last ``history.json`` row)."""
    rows = checkpoint.read_json(HISTORY)
    return int(rows[-1]["step"]) if rows else 0


def check_resume(cfg: FinetuneConfig) -> StoredCheckpoint | None:
    """Raise ``ConfigError`` when ``cfg`` would resume a checkpoint of a different run (any fingerprint key other
    than ``steps`` / ``log_every`` differs; a key the checkpoint did not record, written by an older oodseg, is not
    compared) or one already trained past ``train.steps``; returns the checkpoint a rerun resumes from, or None."""
    last = latest_checkpoint(cfg)
    if last is None:
        return None
    stored = last.read_json(RUN)
    wanted = json.loads(json.dumps(run_fingerprint(cfg.train, cfg.strategy), default=list))
    diff = [k for k in wanted if k in stored and k not in RESUMABLE and stored[k] != wanted[k]]
    where = run_location(cfg)[1]
    if diff:
        what = ", ".join(f"{'' if k == 'strategy' else 'train.'}{k} {stored[k]!r} (this run: {wanted[k]!r})"
                         for k in diff)
        raise ConfigError(f"{where}: a run named {cfg.name!r} exists with {what}; pick another --name (or "
                          f"delete that directory) instead of resuming it")
    done = checkpoint_step(last)
    if done > cfg.train.steps:
        raise ConfigError(f"{where}: the run named {cfg.name!r} has trained {done} steps; --steps "
                          f"{cfg.train.steps} cannot resume it (give --steps {done} or more, or another --name)")
    return last


def export_model(checkpoint: StoredCheckpoint, dst: str) -> str:
    """Copy the checkpoint's ``model.safetensors`` to ``dst`` (a path or a URI); a local copy is atomic (written
    beside it, then renamed). Returns ``dst``."""
    fs, path = resolve_fs(dst)
    target = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp" if isinstance(fs, pafs.LocalFileSystem) else path
    fs.create_dir(os.path.dirname(path), recursive=True)
    pafs.copy_files(f"{checkpoint.path}/{MODEL}", target, source_filesystem=checkpoint.fs, destination_filesystem=fs)
    if target != path:
        os.replace(target, path)
    return dst


@dataclass(frozen=True)
class FinetuneResult:
    """What a run produced: final metrics, all reported rows, the checkpoint dir, the exported model path."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    checkpoint_path: str | None
    model_path: str | None


def build_trainer(cfg: FinetuneConfig, callbacks: Sequence[Any] = (), step_hook: Callable[[int, int], None] | None
                  = None, progress: Any = None) -> Any:
    """The ``TorchTrainer`` (Train V2) for ``cfg`` with optional Train ``callbacks`` (the loss search adds its
    reporting callback) and a test-only ``step_hook(step, rank)`` run inside every worker before each step. The
    workers' ``env_vars`` (``TORCH_EXTENSIONS_DIR`` for DeepSpeed's compiled ops, ``OMP_NUM_THREADS``) are only set
    for DeepSpeed: a distinct runtime env forces fresh worker processes, while DDP reuses Ray's idle workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ext_dir = str(Path(cfg.extensions_dir).expanduser().resolve())
    env = {"TORCH_EXTENSIONS_DIR": ext_dir, "OMP_NUM_THREADS": str(max(1, cfg.cpus_per_worker))}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"finetune": to_dict(cfg), "step_hook": step_hook, "progress": progress},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name, storage_path=cfg.storage, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None),
            worker_runtime_env={"env_vars": env} if cfg.strategy == "deepspeed" else None,
        ),
    )


def _print_rows(queue: Any, printer: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
    """Driver thread: print the rows rank 0 puts on ``queue`` until ``stop`` is set and the queue is drained."""
    from ray.util.queue import Empty

    while not (stop.is_set() and queue.empty()):
        try:
            printer(queue.get(timeout=0.5))
        except Empty:
            continue


def run_finetune(cfg: FinetuneConfig, printer: Callable[[dict[str, Any]], None] | None = None,
                 step_hook: Callable[[int, int], None] | None = None) -> FinetuneResult:
    """Run (or resume) ``cfg`` on the connected Ray cluster and export the final model to ``cfg.export_path``;
    ``printer`` receives every row rank 0 reports, in the driver."""
    from ray.util.queue import Queue

    queue = Queue() if printer is not None else None
    stop = threading.Event()
    # ``is not None``: a Ray queue defines ``__len__``, so an empty one is falsy
    thread = None if queue is None else threading.Thread(target=_print_rows, args=(queue, printer, stop), daemon=True)
    if thread:
        thread.start()
    try:
        result = build_trainer(cfg, step_hook=step_hook, progress=queue).fit()
    except SystemExit as e:  # Ray Train's own Ctrl-C handler aborts the run, then calls sys.exit: an interrupt
        raise KeyboardInterrupt from e
    finally:
        stop.set()
        if thread:
            thread.join(timeout=10)
    if result.error is not None:
        raise result.error
    history = list(result.return_value or [])
    last = None if result.checkpoint is None else StoredCheckpoint(result.checkpoint.filesystem,
                                                                    result.checkpoint.path)
    model_path = export_model(last, cfg.export_path) if last is not None and last.has(MODEL) else None
    return FinetuneResult(dict(result.metrics or {}), history, None if last is None else str(last), model_path)
