"""The S2M demo models, trained once on the synthetic suite by the project's own training tasks and cached
(:func:`oodseg.training.cached.cached_fit`), as named checkpoint sources:

* ``demo-sam`` — a tiny SAM trained from scratch on the suite's person / car masks plus up to two pasted COCO-format
  outlier objects per frame, with SAM's promptable objective (``saom`` task, ``prompts="box"``: box and point
  prompts, encoder trainable): the "stock" SAM;
* ``demo-saom`` — ``demo-sam`` fine-tuned with SAOM's recipe (``prompts="grid"``: grid points by nearest-neighbour
  assignment, best of 3, class head; encoder frozen): the SAOM SAM;
* ``demo-detector`` — S2M's detector (tiny backbone) on the score maps of the demo ERFNet for one scorer
  (``resolve_checkpoint("demo-detector", scorer="rba", …)``; default ``msp``).

No pretrained SAM reaches CI or the laptops the demo runs on; these small models show the object-level path working
end to end on the synthetic suite, not SAM-B's quality (a real run points ``refine_cfg.sam`` at
``facebook/sam-vit-base`` and trains a detector on real data with ``jobs/train_detector.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from oodseg.models import register_checkpoint_source, resolve_checkpoint
from oodseg.paths import demo_suite
from oodseg.training.cached import cached_fit, printer
from oodseg.training.config import TrainConfig

SAM_VERSION = 3
DETECTOR_VERSION = 3
SAM_CFG = {"image_size": 256, "hidden": 32, "layers": 2, "heads": 2}
SAM_STEPS = {"box": 1200, "grid": 120}
DETECTOR_STEPS = 600
# Trained and applied at the suite's native 128×256 (S2M tests at native size; training at its 800-px shortest edge
# would scale objects ×6 past the tiny backbone's 16–64 px anchors: val box recall stayed 0 after 160 steps)
DETECTOR_CFG = {"backbone": "tiny", "min_size": 128, "max_size": 256}


def sam_config(suite: Path, seed: int, prompts: str, init: str = "tiny") -> TrainConfig:
    """The demo SAM recipes: ``box`` from scratch (encoder trains), then ``grid`` (SAOM) from it (encoder frozen)."""
    box = prompts == "box"
    task_cfg = {"sam": init, "sam_cfg": dict(SAM_CFG) if init == "tiny" else {}, "prompts": prompts,
                "grid": [16, 16], "train_encoder": box, "num_classes": 19, "outliers": 2 if box else 0}
    return TrainConfig(
        task="saom", task_cfg=task_cfg, data_root=str(suite), coco_root=str(suite / "coco"), dataset="cityscapes",
        val_split="val", anomaly_set=None, lr=3e-3 if box else 5e-4, weight_decay=1e-4, schedule="cosine",
        warmup=10, steps=SAM_STEPS[prompts], global_batch=2 if box else 4, val_images=8, seed=seed, log_every=40)


def detector_config(suite: Path, seed: int, scorer: str, scoring_model: str) -> TrainConfig:
    """The demo detector recipe: the tiny backbone on 128×256 crops with one pasted COCO object each."""
    return TrainConfig(
        task="s2m_detector", task_cfg={"scorer": scorer, "scoring_model": scoring_model,
                                       "detector": dict(DETECTOR_CFG)},
        data_root=str(suite), coco_root=str(suite / "coco"), dataset="cityscapes", val_split="val", anomaly_set=None,
        lr=2e-3, weight_decay=1e-4, schedule="cosine", warmup=10, steps=DETECTOR_STEPS, global_batch=8,
        crop=(128, 256), scale=(0.85, 1.3), val_images=16, seed=seed, log_every=40)


@register_checkpoint_source("demo-sam")
def demo_sam(cache_dir: str | os.PathLike[str] | None = None, data_root: str | os.PathLike[str] | None = None,
             seed: int = 0, **_: object) -> str:
    """The stock demo SAM: a tiny SAM trained from scratch on the suite with box and point prompts (cached file)."""
    suite, cache = demo_suite(cache_dir, data_root, seed)
    return str(cached_fit("demo-sam", sam_config(suite, seed, "box"), suite, cache, SAM_VERSION, printer("demo-sam")))


@register_checkpoint_source("demo-saom")
def demo_saom(cache_dir: str | os.PathLike[str] | None = None, data_root: str | os.PathLike[str] | None = None,
              seed: int = 0, **_: object) -> str:
    """The SAOM demo SAM: ``demo-sam`` fine-tuned with SAOM's grid-point recipe (cached file)."""
    suite, cache = demo_suite(cache_dir, data_root, seed)
    init = demo_sam(cache, suite, seed)
    cfg = sam_config(suite, seed, "grid", init=init)
    return str(cached_fit("demo-saom", cfg, suite, cache, SAM_VERSION, printer("demo-saom")))


@register_checkpoint_source("demo-detector")
def demo_detector(cache_dir: str | os.PathLike[str] | None = None, data_root: str | os.PathLike[str] | None = None,
                  seed: int = 0, scorer: str = "msp", **_: object) -> str:
    """The demo detector for ``scorer`` on the demo ERFNet's maps."""
    suite, cache = demo_suite(cache_dir, data_root, seed)
    scoring = resolve_checkpoint("demo", cache_dir=cache, data_root=suite, seed=seed)
    cfg = detector_config(suite, seed, scorer, scoring)
    return str(cached_fit(f"demo-detector-{scorer}", cfg, suite, cache, DETECTOR_VERSION,
                          printer(f"demo-detector {scorer}")))
