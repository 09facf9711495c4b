"""The demo mask model (checkpoint source ``demo-mask``): a tiny Mask2Former (``create_model("mask2former",
backbone="tiny")``: a 4-stage Swin of width 16, 8 queries, 3 decoder layers) trained once on the synthetic suite's
Cityscapes-format train split with its own mask-classification loss (Hungarian matching, class CE + mask BCE + Dice,
as transformers computes it), cached by config hash (:func:`oodseg.training.cached.cached_fit`).

It gives the demo table its mask-model block: the scorers that read mask outputs, RbA first (Nayal et al., ICCV
2023), next to the per-pixel ERFNet. It trains on first use of a config that names it (``configs/demo_mask.yaml``),
in a child process while the job starts Ray, as the demo ERFNet does.

    python jobs/benchmark.py --config configs/demo_mask.yaml
"""

from __future__ import annotations

import os
from pathlib import Path

from oodseg.models import register_checkpoint_source
from oodseg.paths import demo_suite
from oodseg.training.cached import cached_fit, printer
from oodseg.training.config import TrainConfig

MASK_VERSION = 1
MASK_STEPS = 400
MASK_MODEL_CFG = {"backbone": "tiny"}


def mask_config(suite: Path, seed: int = 0, steps: int = MASK_STEPS) -> TrainConfig:
    """The demo recipe: AdamW with cosine decay on 4 crops of 128×256 per step, the model's own loss (``ce`` is the
    model's loss for a mask model), no outlier paste."""
    return TrainConfig(
        model="mask2former", model_cfg=dict(MASK_MODEL_CFG), loss="ce", loss_cfg={}, data_root=str(suite),
        dataset="cityscapes", train_split="train", val_split="val", anomaly_set="road_anomaly_21", params="full",
        lr=1e-3, weight_decay=1e-4, schedule="cosine", warmup=20, steps=steps, global_batch=4, crop=(128, 256),
        scale=(0.85, 1.3), scorer="rba", seed=seed, log_every=50)


@register_checkpoint_source("demo-mask")
def demo_mask(cache_dir: str | os.PathLike[str] | None = None, data_root: str | os.PathLike[str] | None = None,
              seed: int = 0, **_: object) -> str:
    """The demo mask model for the suite at ``data_root`` (or the one built under ``cache_dir``), trained once."""
    suite, cache = demo_suite(cache_dir, data_root, seed)
    return str(cached_fit("demo-mask", mask_config(suite, seed), suite, cache, MASK_VERSION, printer("demo-mask")))
