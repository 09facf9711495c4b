"""Validation during training: the one subset rule (:func:`val_indices`) and the segmentation task's metrics.

The evaluation loop itself is :meth:`oodseg.training.task.Task.evaluate`: each rank scores every ``world``-th item
of each validation set into a mergeable :class:`~oodseg.scoring.metrics.MetricSet`, and the per-rank states merge
into the full-set metrics (``Strategy.gather``), so the numbers do not depend on the worker count. The segmentation
task measures in-distribution mIoU and held-out anomaly AuPRC / FPR95 through ``model.predict``, exactly as the
benchmark does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from oodseg.data import create_dataset
from oodseg.scoring import semantic_prediction
from oodseg.scoring.metrics import ConfusionMatrix, MetricSet, PixelMetrics
from oodseg.training.config import TrainConfig


def val_indices(n: int, limit: int) -> list[int]:
    """The validation images of every task: ``limit`` evenly spaced indices of ``n`` (all when ``limit`` is 0 or
    ≥ n). Evenly spaced rather than the first ``limit``: a set's files are ordered by city or sequence, and the
    first few would all come from one."""
    if limit <= 0 or limit >= n:
        return list(range(n))
    return np.linspace(0, n - 1, limit).round().astype(int).tolist()


def eval_datasets(cfg: TrainConfig) -> dict[str, Subset]:
    """``semantic`` (the in-distribution val split) and ``anomaly`` (the held-out anomaly set) of ``cfg``, each
    cut to :func:`val_indices`; a set the config leaves out is absent."""
    sets = {"semantic": create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.val_split) if cfg.val_split else None,
            "anomaly": create_dataset(cfg.anomaly_set, root=cfg.data_root) if cfg.anomaly_set else None}
    return {name: Subset(ds, val_indices(len(ds), cfg.val_images)) for name, ds in sets.items() if ds is not None}


def segmentation_state(data: Mapping[str, Subset]) -> MetricSet:
    """Empty metrics for :func:`eval_datasets`' sets: ``confusion`` on the semantic split, ``pixel`` on the anomaly
    set."""
    metrics: dict[str, Any] = {}
    if "semantic" in data:
        metrics["confusion"] = ConfusionMatrix(num_classes=data["semantic"].dataset.num_classes)
    if "anomaly" in data:
        metrics["pixel"] = PixelMetrics(smiyc=False)
    return MetricSet(metrics)


def update_segmentation(model: nn.Module, state: MetricSet, scorer: Any, name: str, sample: dict[str, Any]) -> None:
    """Add one validation image: its semantic prediction to ``confusion`` or its anomaly score (``scorer``) to
    ``pixel``.

    Args:
        model: a network with ``predict(uint8 [1, H, W, 3])``.
        state: :func:`segmentation_state`'s metrics, updated in place.
        scorer: the config's scorer (``create_scorer``), outputs → anomaly map ``[1, H, W]`` (higher = anomalous).
        name: which set the sample is from: ``"semantic"`` or ``"anomaly"`` (:func:`eval_datasets`' keys).
        sample: a dataset item: ``image`` uint8 ``[H, W, 3]`` RGB and ``label`` ``[H, W]`` (trainIds with 255
            ignore for ``"semantic"``; 0 inlier / 1 anomaly / 255 ignore for ``"anomaly"``).
    """
    logits = model.predict(torch.from_numpy(sample["image"])[None])
    if name == "semantic":
        cm = state["confusion"]
        pred = semantic_prediction(logits, cm.num_classes)[0]
        cm.update(pred.cpu().numpy().astype(np.int64), sample["label"])
    else:
        state["pixel"].update(scorer(logits)[0].float().cpu().numpy(), sample["label"])


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
