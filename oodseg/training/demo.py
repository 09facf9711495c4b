"""The demo model: a small ERFNet trained on the synthetic suite, cached as a self-describing safetensors file.

Contract for the benchmark job (``jobs/benchmark.py``)::

    from oodseg.training.demo import get_demo_checkpoint
    path = get_demo_checkpoint(suite_root, cache_dir, seed=0)   # -> Path to "<cache_dir>/demo-erfnet-<hash>.safetensors"
    model = oodseg.models.create_model(checkpoint=path)         # name + cfg are in the header

The named checkpoint source ``"demo"`` (``create_model(checkpoint=resolve_checkpoint("demo", cache_dir=…,
data_root=…, seed=…))``, ``checkpoint: demo`` in job configs) resolves to this file, building the suite under the
cache when ``data_root`` is not a synthetic suite.

* ``suite_root``: a synthetic suite (``oodseg.data.synthetic.ensure_suite``); training uses its Cityscapes-format
  ``train`` split (``create_dataset("cityscapes", root=suite_root, split="train")``) only.
* Cached by :func:`oodseg.training.cached.cached_fit` (as every demo model): the file name carries a hash of the
  training config, the suite's build parameters and ``DEMO_VERSION``; concurrent callers train once.
* Reproducible from ``seed``: weights init (``torch.manual_seed``), data order and augmentation all derive from it.
* Budget: ``DEMO_STEPS`` AdamW steps of ``DEMO_BATCH`` crops of 128×256 (the suite's resolution, rescaled by
  ``DEMO_SCALE``; ERFNet at ``width=0.375`` → channels (6, 24, 48)), a minute or two on 2 CPU cores (the
  README's table of first-run times; the step's speed: ``benchmarks/demo_step.py``). Plain CE with class weights
  from the train split's pixel frequencies (:func:`class_weights`).
* Header metadata (besides ``oodseg.model`` / ``oodseg.cfg``): ``oodseg.demo.hash``, ``oodseg.demo.train_config``
  (JSON), ``oodseg.demo.train_seconds``. No validation at the end of training: the benchmark that asks for the
  model reports the same val mIoU and anomaly AuPRC seconds later (validating here would only lengthen the first
  run).

Training entry point (the plain single-process loop of ``oodseg.training.loop.train_local``, the same step function
the Ray trainer runs)::

    python -m oodseg.training.demo --suite DIR --out DIR [--seed 0] [--steps N]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from oodseg.data import cityscapes_id_to_train_id, create_dataset, read_label
from oodseg.data.base import value_lut
from oodseg.data.synthetic import MARKER, ensure_suite
from oodseg.models import register_checkpoint_source
from oodseg.paths import default_cache_dir, synthetic_suite
from oodseg.training.cached import Progress, cached_fit, printer
from oodseg.training.config import TrainConfig

# The smallest budget that meets the demo's AuPRC targets for training seeds 0, 1 and 2 (README "Standard table" and
# its seed table; the recipes compared: benchmarks/README.md).
DEMO_VERSION = 5
DEMO_STEPS = 700
DEMO_BATCH = 4
DEMO_SCALE = (0.85, 1.3)
DEMO_MODEL_CFG = {"width": 0.375, "input_size": [128, 256], "dropout": [0.0, 0.0]}
WEIGHT_C = 1.10  # class weight 1 / ln(c + p): ERFNet's hard-coded Cityscapes weights (2.8 road … 10.4) have c = 1.10


def class_weights(suite_root: str | os.PathLike[str], c: float = WEIGHT_C) -> list[float]:
    """Per-trainId CE weights ``w = 1 / ln(c + p)`` from the pixel frequencies ``p`` of the train split (ENet's class
    balancing, Paszke et al. 2016; ERFNet's reference training, ``erfnet_pytorch/train/main.py``, uses Cityscapes
    weights of this form). Classes absent from the split are never a target; they get 0."""
    data = create_dataset("cityscapes", root=suite_root, split="train")
    per_id = np.zeros(256, np.int64)
    for ref in data.samples:  # labelId histograms (labels only; the images are not decoded)
        per_id += np.bincount(read_label(ref.label_path).ravel(), minlength=256)
    train_ids = value_lut(cityscapes_id_to_train_id())
    counts = np.zeros(data.num_classes, np.int64)
    for label_id in np.nonzero(per_id)[0]:
        if 0 <= train_ids[label_id] < data.num_classes:
            counts[train_ids[label_id]] += per_id[label_id]
    freq = counts / max(int(counts.sum()), 1)
    return [round(float(1.0 / np.log(c + f)), 4) if f > 0 else 0.0 for f in freq]


def demo_config(suite_root: str | os.PathLike[str], seed: int = 0, steps: int = DEMO_STEPS) -> TrainConfig:
    """The demo training run: class-weighted CE on the suite's Cityscapes train split, no outlier paste."""
    return TrainConfig(
        model="erfnet",
        model_cfg=dict(DEMO_MODEL_CFG),
        data_root=str(suite_root),
        dataset="cityscapes",
        train_split="train",
        val_split="val",
        anomaly_set="road_anomaly_21",
        loss="ce",
        loss_cfg={"class_weights": class_weights(suite_root)},
        params="full",
        lr=7e-3,
        weight_decay=1e-4,
        schedule="cosine",
        warmup=30,
        steps=steps,
        global_batch=DEMO_BATCH,
        crop=(128, 256),
        scale=DEMO_SCALE,
        seed=seed,
        scorer="msp",
        log_every=50,
    )


def get_demo_checkpoint(
    suite_root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    seed: int = 0,
    *,
    steps: int = DEMO_STEPS,
    progress: Progress | None = printer("demo"),
) -> Path:
    """Path of the cached demo ERFNet checkpoint for (suite, seed), training it first (``steps`` AdamW steps on the
    suite's train split, a minute or two on 2 cores) when absent; the file is self-describing for ``create_model``.

    Args:
        suite_root: a built synthetic suite (holding ``.oodseg_suite.json``; its build parameters enter the cache key).
        cache_dir: where ``demo-erfnet-<hash>.safetensors`` is kept.
        seed: training seed (init, data order, augmentation); part of the cache key, as ``steps`` is.
        progress: receives every logged training row (default: printed to stderr as ``[demo] ...``); None: silent.
    """
    cfg = demo_config(suite_root, seed=seed, steps=steps)
    # Denormals flushed: the same weights bit for bit and slightly faster (benchmarks/README.md)
    return cached_fit("demo-erfnet", cfg, suite_root, cache_dir, DEMO_VERSION, progress, flush_denormal=True,
                      evaluate=False)


@register_checkpoint_source("demo")
def demo_checkpoint(cache_dir: str | os.PathLike[str] | None = None, data_root: str | os.PathLike[str] | None = None,
                    seed: int = 0, **_: object) -> str:
    """The ``"demo"`` checkpoint source: the demo ERFNet for the suite at ``data_root`` when that is a synthetic
    suite, else for the suite built under ``cache_dir``."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    given = Path(data_root) if data_root else None
    suite = given if given is not None and (given / MARKER).is_file() else synthetic_suite(cache, seed)
    return str(get_demo_checkpoint(suite, cache, seed=seed))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train (or reuse) the demo ERFNet on a synthetic suite.")
    p.add_argument("--suite", required=True, help="synthetic suite root (built if missing)")
    p.add_argument("--out", required=True, help="cache directory for the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEMO_STEPS)
    a = p.parse_args(argv)
    suite = ensure_suite(a.suite, seed=a.seed)
    print(get_demo_checkpoint(suite, a.out, seed=a.seed, steps=a.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
