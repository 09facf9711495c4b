"""Validation during training: in-distribution mIoU and held-out anomaly AuPRC / FPR95, as mergeable state.

Each rank scores every ``world``-th image (:func:`evaluate`) through ``model.predict``, exactly as the benchmark does;
the per-rank :class:`~oodseg.scoring.metrics.MetricSet` states merge into the full-set metrics
(``Strategy.gather``), so the numbers do not depend on the worker count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from oodseg.data import create_dataset
from oodseg.scoring import create_scorer, semantic_prediction
from oodseg.scoring.metrics import ConfusionMatrix, MetricSet, PixelMetrics
from oodseg.training.config import TrainConfig


def eval_datasets(cfg: TrainConfig) -> tuple[Any, Any]:
    """(in-distribution val split, anomaly set) of ``cfg`` (either may be None)."""
    semantic = create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.val_split) if cfg.val_split else None
    anomaly = create_dataset(cfg.anomaly_set, root=cfg.data_root) if cfg.anomaly_set else None
    return semantic, anomaly


def _subset(n: int, limit: int) -> list[int]:
    """The first ``limit`` indices of an evenly spaced selection (all when ``limit`` is 0 or ≥ n)."""
    if limit <= 0 or limit >= n:
        return list(range(n))
    return np.linspace(0, n - 1, limit).round().astype(int).tolist()


@torch.no_grad()
def evaluate(model: nn.Module, cfg: TrainConfig, *, rank: int = 0, world: int = 1,
             datasets: tuple[Any, Any] | None = None) -> MetricSet:
    """This rank's share of the validation metrics: ``confusion`` on the val split, ``pixel`` (of ``cfg.scorer``)
    on the anomaly set."""
    semantic, anomaly = datasets if datasets is not None else eval_datasets(cfg)
    was_training = model.training
    model.eval()
    metrics = {}
    if semantic is not None:
        cm = metrics["confusion"] = ConfusionMatrix(num_classes=semantic.num_classes)
        for i in _subset(len(semantic), cfg.val_images)[rank::world]:
            s = semantic[i]
            pred = semantic_prediction(model.predict(torch.from_numpy(s["image"])[None]), semantic.num_classes)[0]
            cm.update(pred.cpu().numpy().astype(np.int64), s["label"])
    if anomaly is not None:
        scorer = create_scorer(cfg.scorer)
        pm = metrics["pixel"] = PixelMetrics(smiyc=False)
        for i in _subset(len(anomaly), cfg.val_images)[rank::world]:
            s = anomaly[i]
            pm.update(scorer(model.predict(torch.from_numpy(s["image"])[None]))[0].float().cpu().numpy(), s["label"])
    model.train(was_training)
    return MetricSet(metrics)


def summarize(state: MetricSet) -> dict[str, float]:
    """``val_miou`` (0..1), ``val_auprc``, ``val_fpr95``, ``val_auroc``, ``val_anomaly_fraction``."""
    out: dict[str, float] = {}
    if "confusion" in state:
        out["val_miou"] = float(state["confusion"].compute()["miou"])
    if "pixel" in state:
        m = state["pixel"].compute(warn=False)
        out.update(val_auprc=m["auprc"], val_fpr95=m["fpr95"], val_auroc=m["auroc"],
                   val_anomaly_fraction=m["anomaly_fraction"])
    return out
