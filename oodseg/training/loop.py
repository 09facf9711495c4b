"""Plain single-process training built from the shared pieces, plus the builders the Ray trainer reuses.

``train_local(cfg)`` is the single-process entry point (the demo model uses it); ``oodseg.platform.trainer`` runs
the very same builders, ``torch_step`` / ``deepspeed_step`` and ``evaluate`` inside Ray Train workers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from oodseg.training.config import TrainConfig
from oodseg.training.data import SegAugment, StepBatches, TrainSamples
from oodseg.training.params import select_parameters, train_mode
from oodseg.training.schedule import build_scheduler
from oodseg.training.step import torch_step

log = logging.getLogger(__name__)


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model of ``cfg`` seeded by ``cfg.seed``, with ``cfg.init`` loaded.

    Architecture: ``create_model(cfg.model, **cfg.model_cfg)``; when ``init`` is a safetensors file written by
    ``save_safetensors`` for the same model name, its stored cfg is the base and ``model_cfg`` overrides entries
    (e.g. ``{"head": "isomax"}``). When the head differs from the checkpoint's (an IsoMax+ head for the EIM loss on
    a linear-head checkpoint), the head starts fresh: only ``head``-group parameters may be missing from the file.
    The ``eim`` loss is defined on IsoMax+ logits, so it implies ``head="isomax"`` unless ``model_cfg`` sets a head.
    """
    from oodseg.models import create_model, load_checkpoint
    from oodseg.models.checkpoint import META_CFG, META_MODEL, read_safetensors_metadata

    model_cfg = dict(cfg.model_cfg)
    if cfg.init and str(cfg.init).endswith(".safetensors"):
        meta = read_safetensors_metadata(cfg.init)
        if meta.get(META_MODEL) == cfg.model and META_CFG in meta:
            model_cfg = {**json.loads(meta[META_CFG]), **model_cfg}
    if cfg.loss == "eim" and "head" not in cfg.model_cfg:
        model_cfg["head"] = "isomax"
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **model_cfg)
    if cfg.init:
        head = {id(p) for p in model.param_groups().get("head", [])}
        head_modules = {n.rpartition(".")[0] for n, p in model.named_parameters() if id(p) in head}
        fresh_ok = {n for n in model.state_dict() if n.rpartition(".")[0] in head_modules}
        report = load_checkpoint(model, cfg.init, strict=False)
        bad = [k for k in report.missing if k not in fresh_ok] + report.mismatched
        if bad or (report.unexpected and not report.missing):
            raise ValueError(
                f"{cfg.init}: does not fit {cfg.model}({model_cfg}): missing/mismatched {bad[:6]}, "
                f"unexpected {report.unexpected[:6]}"
            )
        if report.missing:
            log.info("%s: head re-initialised (%d tensors not in the checkpoint)", cfg.init, len(report.missing))
    return model


def build_samples(cfg: TrainConfig) -> TrainSamples:
    """The training split with augmentation and, when ``cfg.coco_root`` is set, the OE outlier paste."""
    from oodseg.data import create_dataset

    dataset = create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.train_split)
    paste = None
    if cfg.coco_root:
        from oodseg.data.coco import CocoObjects
        from oodseg.data.paste import OutlierPaste

        objects = CocoObjects(cfg.coco_root, cfg.coco_ann)
        paste = OutlierPaste(objects, ood_prob=cfg.ood_prob, road_only=cfg.paste_road_only, seed=cfg.seed)
    aug = SegAugment(crop=tuple(cfg.crop), scale=tuple(cfg.scale), hflip=cfg.hflip)
    return TrainSamples(dataset, aug, seed=cfg.seed, paste=paste, cache=cfg.cache_data)


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, ICLR 2019); no weight decay on 1-d tensors (norm scales, biases)."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def build_loss(cfg: TrainConfig) -> nn.Module:
    from oodseg.losses import create_loss

    return create_loss(cfg.loss, **cfg.loss_cfg)


@dataclass
class EvalState:
    """Mergeable validation state: a confusion matrix (in-distribution) and pixel metrics (anomaly set)."""

    confusion: Any = None
    pixels: Any = None

    def merge(self, other: EvalState) -> EvalState:
        for name in ("confusion", "pixels"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is None:
                setattr(self, name, theirs)
            elif theirs is not None:
                mine.merge(theirs)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {k: None if v is None else v.state_dict() for k, v in (("confusion", self.confusion),
                                                                        ("pixels", self.pixels))}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> EvalState:
        from oodseg.scoring.metrics import ConfusionMatrix, PixelMetrics

        return cls(
            None if d["confusion"] is None else ConfusionMatrix.from_state_dict(d["confusion"]),
            None if d["pixels"] is None else PixelMetrics.from_state_dict(d["pixels"]),
        )

    def compute(self) -> dict[str, float]:
        """``val_miou`` (0..1), ``val_auprc``, ``val_fpr95``, ``val_auroc``, ``val_anomaly_fraction``."""
        import warnings

        out: dict[str, float] = {}
        if self.confusion is not None:
            out["val_miou"] = float(self.confusion.compute()["miou"])
        if self.pixels is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                m = self.pixels.compute()
            out.update(val_auprc=m["auprc"], val_fpr95=m["fpr95"], val_auroc=m["auroc"],
                       val_anomaly_fraction=m["anomaly_fraction"])
        return out


def _subset(n: int, limit: int) -> list[int]:
    """The first ``limit`` indices of an evenly spaced selection (all when ``limit`` is 0 or ≥ n)."""
    if limit <= 0 or limit >= n:
        return list(range(n))
    return np.linspace(0, n - 1, limit).round().astype(int).tolist()


@torch.no_grad()
def evaluate(model: nn.Module, cfg: TrainConfig, *, rank: int = 0, world: int = 1,
             datasets: tuple[Any, Any] | None = None) -> EvalState:
    """Validate this rank's share (every ``world``-th image) of the val split (mIoU via ``ConfusionMatrix`` on the
    argmax of ``pixel_class_scores``) and of the anomaly set (``PixelMetrics`` of ``cfg.scorer``); images go through
    ``model.predict`` exactly as in the benchmark. Merge the per-rank states to get the full-set metrics."""
    from oodseg.scoring import create_scorer, pixel_class_scores
    from oodseg.scoring.metrics import ConfusionMatrix, PixelMetrics

    semantic, anomaly = datasets if datasets is not None else eval_datasets(cfg)
    was_training = model.training
    model.eval()
    state = EvalState()
    if semantic is not None:
        state.confusion = ConfusionMatrix(num_classes=model.num_classes)
        for i in _subset(len(semantic), cfg.val_images)[rank::world]:
            s = semantic[i]
            out = model.predict(torch.from_numpy(s["image"])[None])
            pred = pixel_class_scores(out).argmax(1)[0]
            state.confusion.update(pred.cpu().numpy().astype(np.int64), s["label"])
    if anomaly is not None:
        scorer = create_scorer(cfg.scorer)
        state.pixels = PixelMetrics()
        for i in _subset(len(anomaly), cfg.val_images)[rank::world]:
            s = anomaly[i]
            out = model.predict(torch.from_numpy(s["image"])[None])
            state.pixels.update(scorer(out)[0].float().cpu().numpy(), s["label"])
    model.train(was_training)
    return state


def eval_datasets(cfg: TrainConfig) -> tuple[Any, Any]:
    """(in-distribution val split, anomaly set) of ``cfg`` (either may be None)."""
    from oodseg.data import create_dataset

    semantic = create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.val_split) if cfg.val_split else None
    anomaly = create_dataset(cfg.anomaly_set, root=cfg.data_root) if cfg.anomaly_set else None
    return semantic, anomaly


@dataclass
class LocalResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def train_local(
    cfg: TrainConfig,
    *,
    model: nn.Module | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
    evaluate_at_end: bool = True,
) -> LocalResult:
    """Train ``cfg`` in this process (CPU or one GPU via ``Runtime``); returns the model, loss history and the
    final validation metrics. ``progress`` receives ``{step, loss, lr, steps_per_s}`` every ``cfg.log_every``."""
    from oodseg.models.runtime import Runtime

    rt = Runtime()
    model = build_model(cfg) if model is None else model
    params = select_parameters(model, cfg.params, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    model = rt.prepare(model)
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, total=cfg.steps, warmup=cfg.warmup, kind=cfg.schedule)
    loss_fn = build_loss(cfg).to(rt.torch_device)
    batches = StepBatches(build_samples(cfg), start=0, stop=cfg.steps, global_batch=cfg.global_batch,
                          seed=cfg.seed, accum=cfg.accum)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=cfg.data_workers)
    autocast = rt.dtype if rt.dtype != torch.float32 else None
    result = LocalResult(model)
    datasets = eval_datasets(cfg) if (cfg.val_every or evaluate_at_end) else None
    train_mode(model, frozen_stats=cfg.frozen_stats)
    t0 = time.perf_counter()
    for step, micro in enumerate(loader):
        loss = torch_step(model, optimizer, scheduler, micro, loss_fn, autocast_dtype=autocast,
                          grad_clip=cfg.grad_clip)
        row = {"step": step + 1, "loss": loss, "lr": scheduler.get_last_lr()[0]}
        if cfg.val_every and (step + 1) % cfg.val_every == 0 and step + 1 < cfg.steps:
            row.update(evaluate(model, cfg, datasets=datasets).compute())
            train_mode(model, frozen_stats=cfg.frozen_stats)
        result.history.append(row)
        if progress is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or len(row) > 3):
            progress({**row, "steps_per_s": (step + 1) / (time.perf_counter() - t0)})
    model.eval()
    if evaluate_at_end:
        result.metrics = evaluate(model, cfg, datasets=datasets).compute()
    return result
