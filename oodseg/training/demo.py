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
* Cached: the file name carries a hash of the training config, the suite's build parameters
  (``.oodseg_suite.json``) and ``DEMO_VERSION``; an existing file is returned without training. Writes are
  atomic (temp file + ``os.replace``) and serialised by a lock file, so concurrent callers train once.
* Reproducible from ``seed``: weights init (``torch.manual_seed``), data order and augmentation all derive from it.
* Budget: ``DEMO_STEPS`` AdamW steps of ``DEMO_BATCH`` crops of 128×256 (the suite's resolution, rescaled by
  ``DEMO_SCALE``; ERFNet at ``width=0.375`` → channels (6, 24, 48)), ≈0.45 s/step with 2 threads on a free 2-core
  box, i.e. ≈2 min. Plain CE with class weights from the train split's pixel frequencies (:func:`class_weights`).
* Header metadata (besides ``oodseg.model`` / ``oodseg.cfg`` from ``save_safetensors``):
  ``oodseg.demo.hash``, ``oodseg.demo.train_config`` (JSON), ``oodseg.demo.val_miou`` (synthetic val split),
  ``oodseg.demo.train_seconds``.

Training entry point (the plain single-process loop of ``oodseg.training.loop.train_local``, the same step function
the Ray trainer runs)::

    python -m oodseg.training.demo --suite DIR --out DIR [--seed 0] [--steps N]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from oodseg.data import cityscapes_id_to_train_id, create_dataset, read_label
from oodseg.data.base import value_lut
from oodseg.data.synthetic import MARKER, ensure_suite
from oodseg.models import register_checkpoint_source, save_safetensors, tune_allocator
from oodseg.paths import default_cache_dir, synthetic_suite
from oodseg.training.config import TrainConfig
from oodseg.training.loop import train_local

# Chosen by measurement on 2 CPU cores (synthetic suite v3, seed 0): see the README table. The first benchmark run
# (suite + training + scoring) must stay within 3 minutes.
DEMO_VERSION = 4
DEMO_STEPS = 260
DEMO_BATCH = 8
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
        warmup=15,
        steps=steps,
        global_batch=DEMO_BATCH,
        crop=(128, 256),
        scale=DEMO_SCALE,
        seed=seed,
        scorer="msp",
        log_every=25,
    )


def _suite_params(suite_root: Path) -> dict:
    marker = suite_root / MARKER
    try:
        params = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{marker}: not a synthetic suite marker ({e})") from None
    params.pop("build_seconds", None)
    return params


def config_hash(cfg: TrainConfig, suite_root: Path) -> str:
    """Hash of everything that determines the weights (paths excluded, so a moved suite still hits the cache)."""
    key = {k: v for k, v in asdict(cfg).items() if k not in ("data_root", "coco_root", "log_every", "data_workers")}
    blob = json.dumps({"demo": DEMO_VERSION, "cfg": key, "suite": _suite_params(suite_root)}, sort_keys=True,
                      default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _print_progress(row: dict[str, float]) -> None:
    extra = "".join(f" {k}={row[k]:.3f}" for k in ("val_miou", "val_auprc") if k in row)
    print(f"[demo] step {int(row['step'])} loss={row['loss']:.3f} lr={row['lr']:.2e} "
          f"({row['steps_per_s']:.2f} steps/s){extra}", file=sys.stderr, flush=True)


def get_demo_checkpoint(
    suite_root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    seed: int = 0,
    *,
    steps: int = DEMO_STEPS,
    progress: Callable[[dict[str, float]], None] | None = _print_progress,
) -> Path:
    """Path of the cached demo checkpoint for (suite, seed); trains it first when absent (see module docstring)."""
    suite_root, cache_dir = Path(suite_root), Path(cache_dir)
    cfg = demo_config(suite_root, seed=seed, steps=steps)
    digest = config_hash(cfg, suite_root)
    out = cache_dir / f"demo-erfnet-{digest}.safetensors"
    if out.is_file():
        return out
    with _locked(cache_dir / ".demo.lock"):
        if out.is_file():  # trained by a concurrent caller while we waited
            return out
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, min(8, len(os.sched_getaffinity(0)))))
        tune_allocator()
        try:
            t0 = time.perf_counter()
            result = train_local(cfg, progress=progress)
            seconds = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
        meta = {
            "oodseg.demo.hash": digest,
            "oodseg.demo.train_config": json.dumps(asdict(replace(cfg, data_root=None)), default=list),
            "oodseg.demo.val_miou": f"{result.metrics.get('val_miou', float('nan')):.4f}",
            "oodseg.demo.train_seconds": f"{seconds:.1f}",
        }
        if progress is not None:
            progress({"step": cfg.steps, "loss": result.history[-1]["loss"], "lr": 0.0,
                      "steps_per_s": cfg.steps / seconds, **result.metrics})
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        save_safetensors(result.model.cpu(), tmp, meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    return out


def demo_checkpoint(cache_dir: str | os.PathLike[str] | None = None, data_root: str | os.PathLike[str] | None = None,
                    seed: int = 0, **_: object) -> str:
    """The ``"demo"`` checkpoint source: the demo ERFNet for the suite at ``data_root`` when that is a synthetic
    suite, else for the suite built under ``cache_dir``."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    given = Path(data_root) if data_root else None
    suite = given if given is not None and (given / MARKER).is_file() else synthetic_suite(cache, seed)
    return str(get_demo_checkpoint(suite, cache, seed=seed))


if __name__ != "__main__":  # ``python -m oodseg.training.demo`` runs this file again after the package registered it
    register_checkpoint_source("demo")(demo_checkpoint)


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
