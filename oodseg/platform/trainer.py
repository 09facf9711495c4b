"""Fine-tuning on Ray Train (``TorchTrainer``, Train V2) with DeepSpeed ZeRO 0/1/2 or plain DDP.

Every worker runs :func:`train_loop_per_worker`, built from the pure-torch pieces of ``oodseg.training``
(``build_model`` → ``select_parameters`` → ``torch_step`` / ``deepspeed_step`` → ``evaluate``):

* **Strategies.** ``deepspeed``: ``deepspeed.initialize`` (imported inside the worker) with our own
  ``torch.optim.AdamW`` and ``LambdaLR`` (so DeepSpeed never JIT-compiles FusedAdam), ZeRO ``zero_stage``
  (0/1/2), bf16 on CUDA, fp32 on CPU over the gloo process group Ray sets up. ``ddp``: ``DistributedDataParallel``
  with bf16 autocast on CUDA (``Runtime``), the plain comparison. On CPU DeepSpeed's shared-memory all-reduce
  (a C++ op JIT-compiled on first use, ~40 s) is switched off unless ``shm_comm=True``: gloo is used instead and
  nothing is compiled. ``TORCH_EXTENSIONS_DIR`` points at ``extensions_dir`` so any op that *is* compiled is
  cached across runs.
* **Data.** Each rank reads its own slice of a deterministic global batch (``oodseg.training.data.step_items``):
  the global batch of a step is the same for any worker count, and a resumed run continues the exact data stream.
* **Validation** every ``val_every`` steps and at the end: each rank scores every ``world``-th image, the
  ``ConfusionMatrix`` / ``PixelMetrics`` states are all-gathered and merged; metrics go out via ``ray.train.report``.
* **Checkpoints** every ``checkpoint_every`` steps: DeepSpeed ``save_checkpoint`` on every rank (model states on
  rank 0, one ZeRO optimizer partition per rank) reported by all ranks, which Ray merges into one directory;
  for DDP rank 0 reports model/optimizer/scheduler state. Rank 0 adds ``history.json`` (all reported rows) and,
  at the end, ``model.safetensors`` (``save_safetensors``; LoRA merged) that ``jobs/benchmark.py`` loads with
  ``--model-checkpoint``. On start, ``ray.train.get_checkpoint()`` (a retry after a worker failure, or a rerun
  with the same ``name`` + ``storage_path``) restores the step, weights, optimizer and scheduler.
  DeepSpeed's own loader uses ``torch.load(weights_only=False)``; we swap in a checkpoint engine that loads with
  ``weights_only=True`` (allow-listing DeepSpeed's ``LossScaler``, ``ZeroStageEnum``, ``fragment_address``).
* **Fault injection** (tests): ``fault_step`` makes rank ``fault_rank`` ``os._exit(1)`` at that step unless the
  ``fault_marker`` file exists (it is created first), i.e. only on the first attempt; it waits until the checkpoints
  reported before are committed, so the recovery point is deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from oodseg.training.config import TrainConfig

CKPT_STATE = "train_state.pt"  # DDP strategy: model/optimizer/scheduler/step (torch.save, loaded weights_only)
CKPT_HISTORY = "history.json"
CKPT_MODEL = "model.safetensors"
DS_TAG = "state"


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class FinetuneConfig:
    """A Ray Train fine-tuning run: the pure-torch ``train`` settings plus distribution / storage settings."""

    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = field(default="finetune", metadata=_h("run name (same name + storage path resumes)"))
    storage_path: str = field(default="results/finetune", metadata=_h("Ray Train storage path (runs, checkpoints)"))
    strategy: Literal["deepspeed", "ddp"] = field(default="deepspeed", metadata=_h("deepspeed | ddp"))
    zero_stage: int = field(default=1, metadata=_h("DeepSpeed ZeRO stage 0/1/2"))
    num_workers: int = field(default=2, metadata=_h("Ray Train workers"))
    use_gpu: bool = field(default=False, metadata=_h("one GPU per worker"))
    cpus_per_worker: int = field(default=1, metadata=_h("CPUs (and torch threads) per worker"))
    max_failures: int = field(default=1, metadata=_h("worker failures to recover from (FailureConfig)"))
    checkpoint_every: int = field(default=50, metadata=_h("checkpoint every N steps (and at the end)"))
    keep_checkpoints: int = field(default=2, metadata=_h("checkpoints kept (0: all)"))
    export: str | None = field(default=None, metadata=_h("copy the final model.safetensors here"))
    shm_comm: bool = field(default=False, metadata=_h("CPU: use DeepSpeed's compiled shm all-reduce"))
    extensions_dir: str = field(default=".cache/torch_extensions", metadata=_h("TORCH_EXTENSIONS_DIR"))
    fault_step: int = field(default=0, metadata=_h("testing: rank fault_rank exits at this step (0: off)"))
    fault_rank: int = field(default=1, metadata=_h("testing: which rank exits"))
    fault_marker: str | None = field(default=None, metadata=_h("testing: file marking the fault as done"))

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2 (ZeRO-3 shards weights; export needs them whole), "
                             f"got {self.zero_stage}")
        if self.train.global_batch % (self.num_workers * self.train.accum):
            raise ValueError(f"global_batch {self.train.global_batch} must be divisible by num_workers "
                             f"({self.num_workers}) x accum ({self.train.accum})")
        if self.fault_step and not self.fault_marker:
            raise ValueError("fault_step needs fault_marker (the file that stops the fault from repeating)")


def deepspeed_config(cfg: FinetuneConfig, world: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config: batch sizes from ``TrainConfig``, ZeRO stage, precision, clipping."""
    tc = cfg.train
    return {
        "train_batch_size": tc.global_batch,
        "train_micro_batch_size_per_gpu": tc.global_batch // (world * tc.accum),
        "gradient_accumulation_steps": tc.accum,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": float(tc.grad_clip or 0.0),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _weights_only_engine() -> Any:
    """A DeepSpeed checkpoint engine that reads with ``torch.load(weights_only=True)``, allowing only the three
    plain-data DeepSpeed classes its ZeRO optimizer states contain."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()


def _all_mean(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def _gather_eval(state: Any, world: int) -> Any:
    from oodseg.training.loop import EvalState

    if world == 1:
        return state
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, state.state_dict())
    merged = EvalState.from_state_dict(parts[0])
    for p in parts[1:]:
        merged.merge(EvalState.from_state_dict(p))
    return merged


def _export_model(model: torch.nn.Module, path: Path, cfg: FinetuneConfig, metrics: dict[str, Any]) -> None:
    """Write the fine-tuned weights as safetensors (fp32 copy; LoRA adapters merged into the base layers)."""
    import copy

    from oodseg.config import to_json
    from oodseg.models import save_safetensors
    from oodseg.training.params import merge_lora

    plain = copy.deepcopy(model).float().cpu()
    if cfg.train.params == "lora":
        merge_lora(plain)
    meta = {"oodseg.finetune.config": to_json(cfg),
            "oodseg.finetune.metrics": json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))})}
    save_safetensors(plain, path, meta)


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train worker entry point; ``config`` is ``oodseg.config.to_dict(FinetuneConfig)``. Returns (rank 0)
    the reported metric rows of the whole run, including rows from before a resume."""
    import ray.train
    import ray.train.torch

    from oodseg.config import from_dict
    from oodseg.models.runtime import Runtime
    from oodseg.training.data import StepBatches
    from oodseg.training.loop import build_loss, build_model, build_optimizer, build_samples, eval_datasets, evaluate
    from oodseg.training.params import select_parameters, train_mode
    from oodseg.training.schedule import build_scheduler
    from oodseg.training.step import deepspeed_step, torch_step

    cfg: FinetuneConfig = from_dict(FinetuneConfig, config)
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.cpus_per_worker))
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"

    model = build_model(tc)
    params = select_parameters(model, tc.params, lora_rank=tc.lora_rank, lora_alpha=tc.lora_alpha)
    model.to(device)
    optimizer = build_optimizer(params, tc)
    scheduler = build_scheduler(optimizer, total=tc.steps, warmup=tc.warmup, kind=tc.schedule)
    loss_fn = build_loss(tc).to(device)
    checkpoint = ray.train.get_checkpoint()
    start, history = 0, []

    if cfg.strategy == "deepspeed":
        import deepspeed
        import deepspeed.ops

        if not cuda and not cfg.shm_comm:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo all-reduce, nothing to compile
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(cfg, world, bf16=cuda),
                                               dist_init_required=False)
        engine.checkpoint_engine = _weights_only_engine()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                _, client = engine.load_checkpoint(d, tag=DS_TAG)
                start = int(client["step"])
                history = json.loads((Path(d) / CKPT_HISTORY).read_text())
        scheduler = engine.lr_scheduler
    else:
        forward = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
                   if world > 1 else model)
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = torch.load(Path(d) / CKPT_STATE, map_location=device, weights_only=True)
                history = json.loads((Path(d) / CKPT_HISTORY).read_text())
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = int(state["step"])
        rt = Runtime(device=str(device))
        autocast = rt.dtype if rt.dtype != torch.float32 else None

    samples = build_samples(tc)
    batches = StepBatches(samples, start=start, stop=tc.steps, global_batch=tc.global_batch, seed=tc.seed,
                          rank=rank, world=world, accum=tc.accum)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=tc.data_workers)
    datasets = eval_datasets(tc)
    train_mode(model, frozen_stats=tc.frozen_stats)
    history = [row for row in history if row["step"] <= start]
    t0 = time.perf_counter()

    for k, micro in enumerate(loader):
        step = start + k + 1
        if cfg.fault_step == step and rank == cfg.fault_rank and cfg.fault_marker:
            marker = Path(cfg.fault_marker)
            if not marker.exists():
                # die only once the controller has committed every checkpoint reported so far: a report still in
                # flight when the worker group fails is dropped by Ray Train, which would make the test's
                # "resume from the step-k checkpoint" depend on the controller's polling race
                ray.train.get_all_reported_checkpoints(
                    consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"rank {rank} exited at step {step}\n")
                os._exit(1)
        if cfg.strategy == "deepspeed":
            loss = deepspeed_step(engine, model, micro, loss_fn)
        else:
            loss = torch_step(model, optimizer, scheduler, micro, loss_fn, forward=forward, autocast_dtype=autocast,
                              grad_clip=tc.grad_clip)
        last = step == tc.steps
        do_val = last or bool(tc.val_every and step % tc.val_every == 0)
        do_ckpt = last or step % cfg.checkpoint_every == 0
        if not (do_val or do_ckpt or step % tc.log_every == 0):
            continue
        row: dict[str, Any] = {"step": step, "start_step": start, "loss": _all_mean(loss, world),
                               "lr": float(scheduler.get_last_lr()[0]),
                               "elapsed_s": time.perf_counter() - t0,
                               "steps_per_s": (k + 1) / (time.perf_counter() - t0)}
        if do_val:
            row.update(_gather_eval(evaluate(model, tc, rank=rank, world=world, datasets=datasets), world).compute())
            train_mode(model, frozen_stats=tc.frozen_stats)
        history.append(row)
        if not do_ckpt:
            ray.train.report(row)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            if cfg.strategy == "deepspeed":
                engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": step})
            elif rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "step": step}, Path(tmp) / CKPT_STATE)
            if rank == 0:
                (Path(tmp) / CKPT_HISTORY).write_text(json.dumps(history))
                if last:
                    _export_model(model, Path(tmp) / CKPT_MODEL, cfg, row)
            has_files = any(Path(tmp).iterdir())
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return history


def resolve_data(cfg: FinetuneConfig, cache_dir: str | os.PathLike[str] | None = None) -> FinetuneConfig:
    """Fill in the synthetic defaults: no ``data_root`` → the synthetic suite (built once under the cache, the
    same one the benchmark job uses) with its COCO folder as the OE source, and ``init`` None → ``"demo"``;
    ``init="demo"`` → the demo checkpoint trained on that suite (``oodseg.training.demo.get_demo_checkpoint``);
    ``init="scratch"`` → random initialisation."""
    from dataclasses import replace

    from oodseg.platform.pipeline import default_cache_dir, synthetic_suite

    tc = cfg.train
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if not tc.data_root:
        suite = synthetic_suite(cache, tc.seed)
        tc = replace(tc, data_root=str(suite), coco_root=tc.coco_root or str(suite / "coco"), init=tc.init or "demo")
    if tc.init == "scratch":
        tc = replace(tc, init=None)
    if tc.init == "demo":
        from oodseg.training.demo import get_demo_checkpoint

        tc = replace(tc, init=str(get_demo_checkpoint(Path(tc.data_root), cache, seed=tc.seed)))
    return replace(cfg, train=tc)


@dataclass(frozen=True)
class FinetuneResult:
    """What a run produced: final metrics, all reported rows, the checkpoint dir, the exported model path."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    checkpoint_path: str | None
    model_path: str | None


def build_trainer(cfg: FinetuneConfig, callbacks: Sequence[Any] = ()) -> Any:
    """The ``TorchTrainer`` (Train V2) for ``cfg``, with optional Train ``callbacks`` (the Tune loss search adds
    its reporting callback). The workers' ``env_vars`` runtime env (``TORCH_EXTENSIONS_DIR`` for DeepSpeed's
    compiled ops, ``OMP_NUM_THREADS``) is only set for DeepSpeed: a distinct runtime env forces a freshly started
    worker process, while DDP workers can reuse Ray's pre-started idle workers (the loop sets its torch threads)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from oodseg.config import to_dict

    ext_dir = str(Path(cfg.extensions_dir).expanduser().resolve())
    env = {"TORCH_EXTENSIONS_DIR": ext_dir, "OMP_NUM_THREADS": str(max(1, cfg.cpus_per_worker))}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(Path(cfg.storage_path).expanduser().resolve()) if "://" not in cfg.storage_path
            else cfg.storage_path,
            callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None),
            worker_runtime_env={"env_vars": env} if cfg.strategy == "deepspeed" else None,
        ),
    )


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Run (or resume) ``cfg`` on the connected / a local Ray cluster and export the final model."""
    import ray

    if not ray.is_initialized():
        ray.init()
    trainer = build_trainer(cfg)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    history = list(result.return_value or [])
    ckpt_path, model_path = None, None
    if result.checkpoint is not None:
        ckpt_path = result.checkpoint.path
        src = Path(ckpt_path) / CKPT_MODEL
        if src.is_file():
            model_path = str(src)
            if cfg.export:
                dst = Path(cfg.export)
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
                model_path = str(dst)
    return FinetuneResult(dict(result.metrics or {}), history, ckpt_path, model_path)
