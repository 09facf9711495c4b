"""The demo TDOS (checkpoint source ``demo-tdos``): a tiny TDOS trained once on the synthetic suite from a random
tiny CLIP, by the one training loop with the TDOS losses and the COCO-format outlier paste feeding the ``ood`` class,
cached by config hash (:func:`oodseg.training.cached.cached_fit`).

A random CLIP has no language prior, so the towers train too (``freeze_towers=False``; with real CLIP weights they
stay frozen, as released). What this model shows: the architecture and its losses learn an ``ood`` class from pasted
outliers, read out by ``p_ood`` next to the in-distribution scorers of the same model. What it cannot show: the value
of CLIP's semantics (real weights: ``models=[{name: tdos, arch: tdos, cfg: {clip: openai/clip-vit-base-patch16}}]``
and ``jobs/finetune.py --model tdos --loss tdos`` on Cityscapes + COCO).

    python -m oodseg benchmark --set 'models=[{name: tdos, checkpoint: demo-tdos}]'
"""

from __future__ import annotations

import os
from pathlib import Path

from oodseg.models import register_checkpoint_source
from oodseg.paths import demo_suite
from oodseg.training.cached import cached_fit, printer
from oodseg.training.config import TrainConfig

TDOS_VERSION = 2  # 2: context-decoder q/k/v without bias (the release's layout)
TDOS_STEPS = 400
TDOS_MODEL_CFG = {"clip": "tiny", "window": 128, "freeze_towers": False}
#: fewer sampled points / aligned pixels than the release (12544 / all): the CPU budget of a 128×256 crop
TDOS_LOSS_CFG = {"num_points": 1024, "align_pixels": 4096}


def tdos_config(suite: Path, seed: int = 0, steps: int = TDOS_STEPS) -> TrainConfig:
    """The demo recipe: AdamW with poly decay (as released, at a CPU-sized learning rate and budget), 128×256 crops,
    a pasted COCO-format outlier in half of them."""
    return TrainConfig(
        model="tdos", model_cfg=dict(TDOS_MODEL_CFG), loss="tdos", loss_cfg=dict(TDOS_LOSS_CFG),
        data_root=str(suite), coco_root=str(suite / "coco"), dataset="cityscapes", val_split="val",
        anomaly_set="road_anomaly_21", ood_prob=0.5, lr=1e-3, weight_decay=1e-4, schedule="poly", warmup=20,
        steps=steps, global_batch=8, crop=(128, 256), scale=(0.85, 1.3), scorer="p_ood", val_images=16, seed=seed,
        log_every=50)


@register_checkpoint_source("demo-tdos")
def demo_tdos(cache_dir: str | os.PathLike[str] | None = None, data_root: str | os.PathLike[str] | None = None,
              seed: int = 0, **_: object) -> str:
    """The demo TDOS for the suite at ``data_root`` (or the one built under ``cache_dir``), trained once."""
    suite, cache = demo_suite(cache_dir, data_root, seed)
    return str(cached_fit("demo-tdos", tdos_config(suite, seed), suite, cache, TDOS_VERSION, printer("demo-tdos")))
