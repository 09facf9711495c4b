"""How a training step is distributed: one small interface, three strategies (no Ray here).

The training loop (:func:`oodseg.training.loop.fit`) is written once against :class:`Strategy`; a strategy owns the
optimizer step, the cross-rank reductions and the checkpoint format:

* :class:`LocalStrategy` — one process (CPU or one GPU; ``TrainConfig.precision`` through ``Runtime``: bf16 autocast
  on CUDA by default, fp16 autocast with a ``GradScaler``);
* :class:`DDPStrategy` — ``torch.nn.parallel.DistributedDataParallel`` over an initialised process group (Ray Train
  sets it up); checkpoints hold model/optimizer/scheduler state written by rank 0 (``train_state.pt``, loaded with
  ``weights_only=True``);
* :class:`DeepSpeedStrategy` — ``deepspeed.initialize`` with our own ``AdamW`` + ``LambdaLR`` (DeepSpeed never
  JIT-compiles FusedAdam), ZeRO stage 0/1/2, bf16 (or fp16 with its own loss scaling) on CUDA, fp32 on CPU over
  gloo; on CPU the compiled shared-memory all-reduce is switched off unless ``shm_comm``. Its own checkpoint loader
  unpickles; we swap in an engine that loads with ``weights_only=True`` (allow-listing only DeepSpeed's
  ``LossScaler``, ``ZeroStageEnum``, ``fragment_address``). Every rank saves its ZeRO partition.

A step consumes ``accum`` micro-batches and makes one optimizer update on their mean loss
(:mod:`oodseg.training.step`); all strategies follow the same learning-rate curve (:mod:`oodseg.training.schedule`).
Distribution and precision stay here: a task's ``loss(module, batch)`` gets :attr:`Strategy.module` (the model, the
DDP wrapper or the DeepSpeed engine) and runs inside the strategy's autocast (:meth:`Strategy.compute`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodseg.models.runtime import Runtime
from oodseg.training.config import TrainConfig
from oodseg.training.schedule import build_scheduler
from oodseg.training.step import deepspeed_step, torch_step

TRAIN_STATE = "train_state.pt"
DS_TAG = "state"


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, ICLR 2019) with epsilon ``cfg.adam_eps``; weight decay on ≥ 2-d weights only (not
    on norm scales and biases), or with ``cfg.decay_1d`` on every parameter (SAOM's release: torch's AdamW over all
    parameters)."""
    decay = [p for p in params if cfg.decay_1d or p.ndim > 1]
    no_decay = [p for p in params if not cfg.decay_1d and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, eps=cfg.adam_eps)


def steps_per_epoch(cfg: TrainConfig, epoch_len: int) -> Fraction | None:
    """Optimizer steps per epoch of ``epoch_len`` training samples when the LR moves per epoch (else None)."""
    if cfg.lr_per == "step":
        return None
    if epoch_len < 1:
        raise ValueError("lr_per: epoch needs the number of training samples per epoch")
    return Fraction(epoch_len, cfg.global_batch)


class Strategy:
    """Base: single-process bookkeeping; subclasses override what distribution changes."""

    name = "local"

    def __init__(self, device: torch.device | str | None = None, rank: int = 0, world: int = 1) -> None:
        self.runtime = Runtime(device=str(device) if device is not None else "auto")
        self.device = self.runtime.torch_device
        self.rank, self.world = rank, world
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None

    def setup(self, model: nn.Module, params: list[nn.Parameter], cfg: TrainConfig, epoch_len: int = 0) -> None:
        """Move the model to the device and build the optimizer and LR schedule for ``params`` (``epoch_len``: the
        training samples of an epoch, for ``cfg.lr_per = "epoch"``); fp16 autocast gets a ``GradScaler`` (loss
        scaling keeps small fp16 gradients from flushing to zero; bf16 has fp32's range and needs none)."""
        self.runtime = replace(self.runtime, precision=cfg.precision)
        self.model = self.runtime.prepare(model)
        self.optimizer = build_optimizer(params, cfg)
        self.scheduler = build_scheduler(self.optimizer, total=cfg.steps, warmup=cfg.warmup, kind=cfg.schedule,
                                         steps_per_epoch=steps_per_epoch(cfg, epoch_len))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.runtime.dtype == torch.float16 else None
        self.grad_clip = cfg.grad_clip

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @property
    def module(self) -> nn.Module:
        """What a task's loss runs: the model itself here; its DDP wrapper or DeepSpeed engine in subclasses."""
        return self.model

    def compute(self, loss: Callable[[nn.Module, Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
        """``loss(module, micro_batch)`` (a task's) on :attr:`module` under this strategy's autocast: the one place
        precision enters a step (CPU: fp32; CUDA: bf16 by default, ``TrainConfig.precision``)."""

        def run(micro_batch: Any) -> torch.Tensor:
            with self.runtime.autocast():
                return loss(self.module, micro_batch)

        return run

    def step(self, micro_batches: list[Any], loss: Callable[[nn.Module, Any], torch.Tensor]) -> float:
        """One optimizer step over ``micro_batches``; ``loss(module, micro_batch)`` is the task's micro-batch loss."""
        return torch_step(self.model, self.optimizer, self.scheduler, micro_batches, self.compute(loss),
                          no_sync=getattr(self.module, "no_sync", None), grad_clip=self.grad_clip,
                          scaler=self.scaler)

    def mean(self, value: float) -> float:
        """Mean of a per-rank scalar over all ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, state: Any) -> Any:
        """Merge a per-rank mergeable state (``state_dict`` / ``from_state_dict`` / ``merge``) over all ranks."""
        if self.world == 1:
            return state
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, state.state_dict())
        merged = type(state).from_state_dict(parts[0])
        for part in parts[1:]:
            merged.merge(type(state).from_state_dict(part))
        return merged

    def save(self, directory: Path, step: int) -> None:
        """Write this rank's share of the training state into ``directory``."""
        if self.rank == 0:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "step": step}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, Path(directory) / TRAIN_STATE)

    def load(self, directory: Path) -> int:
        """Restore from ``directory``; returns the step it was saved at."""
        path = Path(directory) / TRAIN_STATE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a {self.name} checkpoint (written by another strategy?)")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        return int(state["step"])

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class LocalStrategy(Strategy):
    """One process: plain torch steps, checkpoints as :data:`TRAIN_STATE`."""


class DDPStrategy(Strategy):
    """``DistributedDataParallel`` (gradients all-reduced on the last micro-batch); same checkpoint as local."""

    name = "ddp"

    def setup(self, model: nn.Module, params: list[nn.Parameter], cfg: TrainConfig, epoch_len: int = 0) -> None:
        super().setup(model, params, cfg, epoch_len)
        cuda = self.device.type == "cuda"
        # find_unused_parameters: a task may leave trainable parameters out of a step's graph (SAOM's grid prompts
        # never reach SAM's box / mask prompt embeddings), which plain DDP refuses ("did not receive grad")
        self.ddp = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if cuda else None,
                                                        find_unused_parameters=True) if self.world > 1 else None)

    @property
    def module(self) -> nn.Module:
        return self.model if self.ddp is None else self.ddp


class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine (ZeRO ``zero_stage``) over our AdamW and LR schedule; the engine is the module a task's
    loss runs, and its checkpoints load with ``weights_only=True``."""

    name = "deepspeed"

    def __init__(self, zero_stage: int = 1, shm_comm: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.zero_stage, self.shm_comm = zero_stage, shm_comm

    def config(self, cfg: TrainConfig) -> dict[str, Any]:
        """The DeepSpeed JSON config: batch sizes from ``TrainConfig``, ZeRO stage, precision, clipping."""
        return {
            "train_batch_size": cfg.global_batch,
            "train_micro_batch_size_per_gpu": cfg.global_batch // (self.world * cfg.accum),
            "gradient_accumulation_steps": cfg.accum,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.device.type == "cuda" and self.runtime.dtype == torch.bfloat16},
            "fp16": {"enabled": self.device.type == "cuda" and self.runtime.dtype == torch.float16},
            "gradient_clipping": float(cfg.grad_clip or 0.0),
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }

    def setup(self, model: nn.Module, params: list[nn.Parameter], cfg: TrainConfig, epoch_len: int = 0) -> None:
        import deepspeed
        import deepspeed.ops

        scalars = [n for n, p in model.named_parameters() if p.ndim == 0]
        if scalars:  # deepspeed's initial broadcast views each parameter as bytes, which fails for 0-dim tensors
            raise ValueError(f"--strategy deepspeed: the model has 0-dim parameters {scalars[:5]}, which DeepSpeed "
                             "cannot broadcast; use --strategy ddp")
        super().setup(model, params, cfg, epoch_len)
        self.scaler = None  # DeepSpeed scales an fp16 loss itself (its "fp16" config)
        if self.device.type != "cuda" and not self.shm_comm:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo all-reduce, nothing to compile
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer,
                                                    lr_scheduler=self.scheduler, config=self.config(cfg),
                                                    dist_init_required=False)
        self.engine.checkpoint_engine = _weights_only_engine()
        self.scheduler = self.engine.lr_scheduler

    @property
    def module(self) -> nn.Module:
        return self.engine

    def step(self, micro_batches: list[Any], loss: Callable[[nn.Module, Any], torch.Tensor]) -> float:
        return deepspeed_step(self.engine, micro_batches, self.compute(loss))

    def save(self, directory: Path, step: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={"step": step})

    def load(self, directory: Path) -> int:
        if not (Path(directory) / DS_TAG).is_dir():
            raise FileNotFoundError(f"{directory}: not a deepspeed checkpoint (written by another strategy?)")
        _, client = self.engine.load_checkpoint(str(directory), tag=DS_TAG)
        return int(client["step"])


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


def create_strategy(name: str, **kw: Any) -> Strategy:
    """Strategy ``local`` | ``ddp`` | ``deepspeed`` for this process.

    Args:
        kw: ``device`` (None: auto), ``rank`` and ``world`` (this process in the process group, set up by the
            caller for ``ddp`` / ``deepspeed``); ``zero_stage`` (0/1/2) and ``shm_comm`` apply to DeepSpeed only
            and are dropped for the others.
    """
    classes = {"local": LocalStrategy, "ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy}
    if name not in classes:
        raise ValueError(f"unknown strategy {name!r}; use one of {sorted(classes)}")
    if name != "deepspeed":
        kw = {k: v for k, v in kw.items() if k not in ("zero_stage", "shm_comm")}
    return classes[name](**kw)
