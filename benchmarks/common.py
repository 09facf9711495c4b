"""Helpers shared by the benchmark scripts: a small synthetic suite and a timed forward pass."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from oodseg.models import Runtime


def bench_suite(work: Path, image_size: tuple[int, int], images: int) -> Path:
    """A synthetic suite under ``work`` with ``images`` frames per anomaly set (one train / val frame)."""
    from oodseg.data.synthetic import ensure_suite

    return ensure_suite(work / "suite", seed=0, size=tuple(image_size), n_train=1, n_val=1, n_anomaly=images,
                        n_coco=1)


def forward_seconds(model: Any, batches: list[torch.Tensor], runtime: Runtime) -> float:
    """Seconds of ``model.predict`` over ``batches`` (the first also runs once untimed as warm-up; CUDA
    synchronised)."""
    model = runtime.prepare(model).eval()
    sync = torch.cuda.synchronize if runtime.torch_device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), runtime.autocast():
        model.predict(batches[0])
        sync()
        t0 = time.perf_counter()
        for b in batches:
            model.predict(b)
        sync()
    return time.perf_counter() - t0
