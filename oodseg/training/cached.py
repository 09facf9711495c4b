"""Models trained once on the synthetic suite and cached: the demo ERFNet, the demo SAMs, the S2M demo detectors
and the demo TDOS are each one :class:`~oodseg.training.config.TrainConfig` run by the one training loop, cached
as ``<cache>/<name>-<hash>.safetensors``.

* The hash covers everything that determines the weights: the training config (paths excluded, so a moved suite
  still hits the cache), the suite's build parameters (``.oodseg_suite.json``) and the recipe's ``version``.
* An existing file is returned without training. Writes are atomic (temp file + ``os.replace``) and serialised by a
  lock file, so concurrent callers train once. Reproducible from the seed (init, data order, augmentation).
* The file is the task's export (self-describing) with ``oodseg.demo.*`` header entries: the hash, the training
  config, the training time and, unless ``evaluate=False``, the final validation metrics.
* Trained with :data:`TRAIN_THREADS` intra-op threads on every machine: the thread count changes how CPU kernels
  split their reductions, hence the weights (nearly every tensor differs after a few steps: ``benchmarks/README.md``),
  so a fixed count makes a machine with more cores train the file the README measured.
  Other CPU types (other SIMD kernels) and other torch versions can still give other weights.
* ``with cached_only():`` a call that would train raises :class:`NotCached` instead (the benchmark asks this first,
  then trains in a child process while it starts Ray: :mod:`oodseg.training.background`).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from oodseg.data.synthetic import MARKER
from oodseg.models import tune_allocator
from oodseg.training.config import TrainConfig
from oodseg.training.loop import train_local
from oodseg.training.tasks import create_task

Progress = Callable[[dict[str, Any]], None]
TRAIN_THREADS = 2  # fixed: the thread count changes CPU reductions, hence the weights; the README measured with 2
_TRAIN = contextvars.ContextVar("oodseg_cached_train", default=True)


class NotCached(LookupError):
    """Raised under :func:`cached_only` instead of training a model that is not cached yet."""


@contextlib.contextmanager
def cached_only() -> Iterator[None]:
    """Within this block, :func:`cached_fit` returns cached files only and raises :class:`NotCached` otherwise."""
    token = _TRAIN.set(False)
    try:
        yield
    finally:
        _TRAIN.reset(token)


def suite_params(suite_root: Path) -> dict[str, Any]:
    marker = Path(suite_root) / MARKER
    try:
        params = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{marker}: not a synthetic suite marker ({e})") from None
    params.pop("build_seconds", None)
    return params


def _file_names(value: Any) -> Any:
    """Existing file paths → their names (cached inputs carry their own hash in the name), recursively."""
    if isinstance(value, dict):
        return {k: _file_names(v) for k, v in value.items()}
    if isinstance(value, str) and os.sep in value and Path(value).is_file():
        return Path(value).name
    return value


#: training settings added after the demo caches were first made: at these (default) values they leave the hash as it
#: was, so the cached demo models stay valid
LATER_DEFAULTS = {"adam_eps": 1e-8, "decay_1d": False, "lr_per": "step", "precision": "auto"}


def config_hash(cfg: TrainConfig, suite_root: Path, version: int) -> str:
    """16 hex digits over what determines the weights: the config minus paths and logging (input files by name
    only; later-added settings at their defaults left out), the suite's build parameters and ``version``."""
    paths = ("data_root", "coco_root", "log_every", "data_workers")
    key = _file_names({k: v for k, v in asdict(cfg).items() if k not in paths and LATER_DEFAULTS.get(k, ...) != v})
    blob = json.dumps({"version": version, "cfg": key, "suite": suite_params(suite_root)}, sort_keys=True,
                      default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def printer(tag: str) -> Progress:
    """A progress printer: ``[tag] step N loss=… lr=… (x steps/s) val_…=…``."""

    def show(row: dict[str, Any]) -> None:
        extra = "".join(f" {k}={v:.3f}" for k, v in row.items() if k.startswith("val_") and isinstance(v, float))
        print(f"[{tag}] step {int(row['step'])} loss={row['loss']:.3f} lr={row['lr']:.2e} "
              f"({row['steps_per_s']:.2f} steps/s){extra}", file=sys.stderr, flush=True)

    return show


def cached_fit(name: str, cfg: TrainConfig, suite_root: str | os.PathLike[str], cache_dir: str | os.PathLike[str],
               version: int, progress: Progress | None = None, flush_denormal: bool = False,
               evaluate: bool = True) -> Path:
    """The cached export of ``cfg`` trained on the suite at ``suite_root``; trains it first when absent.

    ``evaluate``: validate once at the end and store the metrics in the header (``oodseg.demo.metrics``).

    ``flush_denormal``: train with the CPU's flush-to-zero / denormals-are-zero modes (``torch.set_flush_denormal``):
    denormal floats slow x86 arithmetic by orders of magnitude. Only for a recipe whose weights were checked to stay
    bit-identical (flushing can change results in general).

    Args:
        name: file name prefix: the file is ``<cache_dir>/<name>-<config_hash>.safetensors`` (returned).
        suite_root: the synthetic suite the config trains on; its build parameters enter the hash.
        version: the recipe's version; bump it to retrain after a change the config does not show.
        progress: receives every logged training row, then one row with the final metrics.

    Raises:
        NotCached: under :func:`cached_only` when the file is absent.
    """
    suite_root, cache_dir = Path(suite_root), Path(cache_dir)
    digest = config_hash(cfg, suite_root, version)
    out = cache_dir / f"{name}-{digest}.safetensors"
    if out.is_file():
        return out
    if not _TRAIN.get():
        raise NotCached(f"{out.name} is not built yet")
    with locked(cache_dir / f".{name}.lock"):
        if out.is_file():  # trained by a concurrent caller while we waited
            return out
        threads = torch.get_num_threads()
        torch.set_num_threads(TRAIN_THREADS)
        tune_allocator()
        torch.set_flush_denormal(flush_denormal)
        try:
            t0 = time.perf_counter()
            result = train_local(cfg, progress=progress, evaluate_at_end=evaluate)
            seconds = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
            torch.set_flush_denormal(False)
        if progress is not None and result.metrics:
            progress({"step": cfg.steps, "loss": result.history[-1]["loss"], "lr": 0.0,
                      "steps_per_s": cfg.steps / seconds, **result.metrics})
        meta = {"oodseg.demo.hash": digest, "oodseg.demo.train_seconds": f"{seconds:.1f}",
                "oodseg.demo.train_config": json.dumps(asdict(replace(cfg, data_root=None, coco_root=None)),
                                                       default=list),
                **({"oodseg.demo.metrics": json.dumps({k: float(v) for k, v in result.metrics.items()})}
                   if result.metrics else {})}
        tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")
        create_task(cfg).export(result.model.cpu(), tmp, meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    return out
