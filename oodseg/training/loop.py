"""The one training loop (:func:`fit`), shared by the demo models, ``train_local`` and the Ray
Train workers; what differs between them is the :class:`~oodseg.training.task.Task` (what is trained), the
:class:`~oodseg.training.strategy.Strategy` (how it is distributed) and the ``report`` callback. Built from named
steps in the style of Ray's DeepSpeed example:

``task.build_model`` → ``task.parameters`` → ``strategy.setup`` → (resume) → ``StepBatches`` of ``task.samples`` →
per step ``strategy.step(micro_batches, task.loss)`` → every ``log_every`` / ``val_every`` / checkpoint step a
``report(row, checkpoint_dir)``.

A checkpoint directory holds the strategy's state, ``history.json`` (every reported row so far), ``run.json`` (the
fingerprint a resume must match, :func:`run_fingerprint`) and, at the last step, the exported model
(``model.safetensors``, ``task.export``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodseg.training.config import TrainConfig
from oodseg.training.data import StepBatches
from oodseg.training.strategy import LocalStrategy, Strategy
from oodseg.training.task import Task
from oodseg.training.tasks import create_task

HISTORY, RUN, MODEL = "history.json", "run.json", "model.safetensors"
Report = Callable[[dict[str, Any], "Path | None"], None]


#: what a resume may change: ``steps`` (train on, to a new total; the schedule follows it) and ``log_every`` (which
#: rows are reported). Anything else in the fingerprint changes the weights or what a row means.
RESUMABLE = ("steps", "log_every")


def run_fingerprint(cfg: TrainConfig, strategy: str) -> dict[str, Any]:
    """The run a checkpoint belongs to (its ``run.json``): the strategy and every ``TrainConfig`` field. A resume must
    match all of it but :data:`RESUMABLE` (``oodseg.platform.trainer.check_resume``)."""
    return {"strategy": strategy, **asdict(cfg)}


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Run:
    """The pieces one ``fit`` call holds while it loops."""

    task: Task
    strategy: Strategy
    eval_data: Any
    fingerprint: dict[str, Any]
    export: dict[str, Any] | None
    start: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def validate(self) -> dict[str, float]:
        s = self.strategy
        state = self.task.evaluate(s.model, self.eval_data, rank=s.rank, world=s.world)
        self.task.train_mode(s.model)
        return self.task.summarize(s.gather(state))

    def save(self, directory: Path, step: int, last: bool) -> None:
        self.strategy.save(directory, step)
        if self.strategy.rank == 0:
            (directory / HISTORY).write_text(json.dumps(self.history))
            (directory / RUN).write_text(json.dumps(self.fingerprint, default=list))
            if last and self.export is not None:
                self.task.export(self.strategy.model, directory / MODEL, {
                    **self.export, "oodseg.train.metrics": json.dumps(self.history[-1], default=float)})


def _setup(cfg: TrainConfig, strategy: Strategy, model: nn.Module | None, resume: Path | None,
           export: dict[str, Any] | None, validate: bool) -> tuple[_Run, torch.utils.data.DataLoader]:
    task = create_task(cfg)
    model = task.build_model() if model is None else model
    samples = task.samples()
    strategy.setup(model, task.parameters(model), cfg, epoch_len=len(samples))
    task.setup(strategy.device)
    run = _Run(task, strategy, task.eval_data() if validate else None, run_fingerprint(cfg, strategy.name), export)
    if resume is not None:
        run.start = strategy.load(resume)
        run.history = [r for r in json.loads((Path(resume) / HISTORY).read_text()) if r["step"] <= run.start]
    batches = StepBatches(samples, start=run.start, stop=cfg.steps, global_batch=cfg.global_batch,
                          seed=cfg.seed, rank=strategy.rank, world=strategy.world, accum=cfg.accum)
    # collate_fn: the micro-batches are already collated by the task; the default would turn numpy arrays into tensors
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=cfg.data_workers,
                                         collate_fn=_as_is)
    return run, loader


def _as_is(item: Any) -> Any:
    return item


def fit(cfg: TrainConfig, strategy: Strategy | None = None, *, model: nn.Module | None = None,
        resume: Path | None = None, report: Report | None = None, checkpoint_every: int = 0,
        export: dict[str, Any] | None = None, step_hook: Callable[[int, int], None] | None = None) -> FitResult:
    """Train ``cfg`` with ``strategy`` (default: one local process), resuming from ``resume`` when given.

    ``report(row, checkpoint_dir)`` receives every logged row (``step``, ``loss``, ``lr``, ``steps_per_s``, the
    validation metrics on validation steps) and, every ``checkpoint_every`` steps and at the end, a temporary
    directory holding a checkpoint (with the exported model at the end when ``export`` metadata is given).
    ``step_hook(step, rank)`` runs before each step (tests inject worker faults with it).

    Args:
        model: the network to train; None: ``task.build_model()``.
        resume: a checkpoint directory of an earlier run of this config; training continues after its step and its
            history is kept up to that step.
        checkpoint_every: steps between checkpoints; 0: none (``report`` always gets ``checkpoint_dir=None``).
        export: metadata (str → str) written into the exported ``model.safetensors`` of the last checkpoint.

    Returns:
        :class:`FitResult`: the trained model (in eval mode), every logged row, the last row's ``val_*`` metrics.
    """
    strategy = strategy or LocalStrategy()
    run, loader = _setup(cfg, strategy, model, resume, export, bool(cfg.val_every or checkpoint_every))
    run.task.train_mode(strategy.model)
    t0 = time.perf_counter()
    for k, micro in enumerate(loader):
        step = run.start + k + 1
        if step_hook is not None:
            step_hook(step, strategy.rank)
        loss = strategy.step(micro, run.task.loss)
        last = step == cfg.steps
        validate = run.eval_data is not None and (last or bool(cfg.val_every and step % cfg.val_every == 0))
        save = bool(checkpoint_every) and (last or step % checkpoint_every == 0)
        if not (validate or save or step % cfg.log_every == 0 or last):
            continue
        row = {"step": step, "start_step": run.start, "loss": strategy.mean(loss), "lr": strategy.lr,
               "elapsed_s": time.perf_counter() - t0, "steps_per_s": (k + 1) / (time.perf_counter() - t0)}
        row.update(run.validate() if validate else {})
        run.history.append(row)
        if not save:
            if report is not None:
                report(row, None)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run.save(Path(tmp), step, last)
            if report is not None:
                report(row, Path(tmp))
    strategy.model.eval()
    metrics = {k: v for k, v in run.history[-1].items() if k.startswith("val_")} if run.history else {}
    return FitResult(strategy.model, run.history, metrics)


def train_local(cfg: TrainConfig, *, model: nn.Module | None = None,
                progress: Callable[[dict[str, Any]], None] | None = None, evaluate_at_end: bool = True) -> FitResult:
    """Train ``cfg`` in this process (CPU or one GPU) and validate at the end; ``progress`` gets every row."""
    result = fit(cfg, LocalStrategy(), model=model, report=None if progress is None else (lambda row, _: progress(row)))
    if evaluate_at_end and not result.metrics:
        task = create_task(cfg)
        data = task.eval_data()
        if data is not None:
            result.metrics = task.summarize(task.evaluate(result.model, data))
    return result
