"""The one training loop (:func:`fit`), shared by the demo model, the acceptance check, ``train_local`` and the Ray
Train workers; what differs between them is the :class:`~oodseg.training.strategy.Strategy` and the ``report``
callback. Built from named helpers in the style of Ray's DeepSpeed example:

``build_model`` → ``select_parameters`` → ``strategy.setup`` → (resume) → ``StepBatches`` data → per step
``strategy.step`` → every ``log_every`` / ``val_every`` / checkpoint step a ``report(row, checkpoint_dir)``.

A checkpoint directory holds the strategy's state, ``history.json`` (every reported row so far), ``run.json`` (the
fingerprint a resume must match, :func:`run_fingerprint`) and, at the last step, ``model.safetensors`` (LoRA
merged) from :func:`export_model`.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodseg.data import create_dataset
from oodseg.data.coco import CocoObjects
from oodseg.data.paste import OutlierPaste
from oodseg.losses import create_loss, loss_info
from oodseg.models import SegModel, create_model, save_safetensors
from oodseg.training.config import TrainConfig
from oodseg.training.data import SegAugment, StepBatches, TrainSamples
from oodseg.training.evaluate import eval_datasets, evaluate, summarize
from oodseg.training.params import merge_lora, select_parameters, train_mode
from oodseg.training.strategy import LocalStrategy, Strategy

HISTORY, RUN, MODEL = "history.json", "run.json", "model.safetensors"
Report = Callable[[dict[str, Any], "Path | None"], None]


def build_model(cfg: TrainConfig) -> SegModel:
    """``create_model(cfg.model, checkpoint=cfg.init, seed=cfg.seed, ...)`` with the model changes the loss's
    registration declares (``model_cfg`` unless ``cfg.model_cfg`` sets them; ``fresh`` parts start untrained)."""
    info = loss_info(cfg.loss)
    model_cfg = {**info.model_cfg, **cfg.model_cfg}
    fresh = info.fresh if any(model_cfg.get(k) == v for k, v in info.model_cfg.items()) else ()
    return create_model(cfg.model, checkpoint=cfg.init, fresh=fresh, seed=cfg.seed, **model_cfg)


def build_samples(cfg: TrainConfig) -> TrainSamples:
    """The training split with augmentation and, when ``cfg.coco_root`` is set, the OE outlier paste."""
    dataset = create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.train_split)
    paste = None
    if cfg.coco_root:
        objects = CocoObjects(cfg.coco_root, cfg.coco_ann)
        paste = OutlierPaste(objects, ood_prob=cfg.ood_prob, road_only=cfg.paste_road_only, seed=cfg.seed)
    aug = SegAugment(crop=tuple(cfg.crop), scale=tuple(cfg.scale), hflip=cfg.hflip)
    return TrainSamples(dataset, aug, seed=cfg.seed, paste=paste, cache=cfg.cache_data)


def run_fingerprint(cfg: TrainConfig, strategy: str) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint: model, loss, parameters, data, init and strategy."""
    keys = ("model", "model_cfg", "init", "loss", "loss_cfg", "params", "dataset", "train_split", "data_root",
            "coco_root", "global_batch", "accum", "crop", "seed", "steps")
    return {"strategy": strategy, **{k: v for k, v in asdict(cfg).items() if k in keys}}


def export_model(model: nn.Module, path: Path, metadata: dict[str, Any]) -> Path:
    """Write the trained weights as self-describing safetensors (fp32 copy; LoRA adapters merged)."""
    plain = copy.deepcopy(model).float().cpu()
    merge_lora(plain)
    return save_safetensors(plain, path, metadata)


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def _save(strategy: Strategy, directory: Path, step: int, history: list[dict[str, Any]], fingerprint: dict[str, Any],
          export: dict[str, Any] | None) -> None:
    strategy.save(directory, step)
    if strategy.rank == 0:
        (directory / HISTORY).write_text(json.dumps(history))
        (directory / RUN).write_text(json.dumps(fingerprint, default=list))
        if export is not None:
            export_model(strategy.model, directory / MODEL, export)


def fit(cfg: TrainConfig, strategy: Strategy | None = None, *, model: nn.Module | None = None,
        resume: Path | None = None, report: Report | None = None, checkpoint_every: int = 0,
        export: dict[str, Any] | None = None, step_hook: Callable[[int, int], None] | None = None) -> FitResult:
    """Train ``cfg`` with ``strategy`` (default: one local process), resuming from ``resume`` when given.

    ``report(row, checkpoint_dir)`` receives every logged row (``step``, ``loss``, ``lr``, ``steps_per_s``, the
    validation metrics on validation steps) and, every ``checkpoint_every`` steps and at the end, a temporary
    directory holding a checkpoint (with ``model.safetensors`` at the end when ``export`` metadata is given).
    ``step_hook(step, rank)`` runs before each step (tests inject worker faults with it)."""
    strategy = strategy or LocalStrategy()
    model = build_model(cfg) if model is None else model
    params = select_parameters(model, cfg.params, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    strategy.setup(model, params, cfg)
    loss_fn = create_loss(cfg.loss, **cfg.loss_cfg).to(strategy.device)
    start, history = 0, []
    if resume is not None:
        start = strategy.load(resume)
        history = [r for r in json.loads((Path(resume) / HISTORY).read_text()) if r["step"] <= start]
    batches = StepBatches(build_samples(cfg), start=start, stop=cfg.steps, global_batch=cfg.global_batch,
                          seed=cfg.seed, rank=strategy.rank, world=strategy.world, accum=cfg.accum)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=cfg.data_workers)
    datasets = eval_datasets(cfg) if cfg.val_every or checkpoint_every else None
    fingerprint = run_fingerprint(cfg, strategy.name)
    train_mode(strategy.model, frozen_stats=cfg.frozen_stats)
    t0 = time.perf_counter()
    for k, micro in enumerate(loader):
        step = start + k + 1
        if step_hook is not None:
            step_hook(step, strategy.rank)
        loss = strategy.step(micro, loss_fn)
        last = step == cfg.steps
        validate = bool(cfg.val_every and step % cfg.val_every == 0) or (last and datasets is not None)
        save = bool(checkpoint_every) and (last or step % checkpoint_every == 0)
        if not (validate or save or step % cfg.log_every == 0 or last):
            continue
        row = {"step": step, "start_step": start, "loss": strategy.mean(loss), "lr": strategy.lr,
               "elapsed_s": time.perf_counter() - t0, "steps_per_s": (k + 1) / (time.perf_counter() - t0)}
        if validate:
            state = evaluate(strategy.model, cfg, rank=strategy.rank, world=strategy.world, datasets=datasets)
            row.update(summarize(strategy.gather(state)))
            train_mode(strategy.model, frozen_stats=cfg.frozen_stats)
        history.append(row)
        if not save:
            if report is not None:
                report(row, None)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            _save(strategy, Path(tmp), step, history, fingerprint, export if last else None)
            if report is not None:
                report(row, Path(tmp))
    strategy.model.eval()
    return FitResult(strategy.model, history, {k: v for k, v in history[-1].items() if k.startswith("val_")}
                     if history else {})


def train_local(cfg: TrainConfig, *, model: nn.Module | None = None,
                progress: Callable[[dict[str, Any]], None] | None = None, evaluate_at_end: bool = True) -> FitResult:
    """Train ``cfg`` in this process (CPU or one GPU) and evaluate at the end; ``progress`` gets every row."""
    result = fit(cfg, LocalStrategy(), model=model,
                 report=None if progress is None else (lambda row, _: progress(row)))
    if evaluate_at_end and not result.metrics:
        result.metrics = summarize(evaluate(result.model, cfg))
    return result
