"""Cost of one temperature-search trial (scoring cached outputs) vs one forward pass over the same images.

    python benchmarks/tune.py                                    # CPU default: ERFNet at 128x256, 8 images
    python benchmarks/tune.py --image-size 512 1024 --images 16 --num-cpus 0       # ERFNet's Cityscapes size

Builds a synthetic suite at the requested size in a temporary directory, saves a randomly initialised ERFNet, and
runs the temperature search (``oodseg.platform.tuning.temperature.run_temperature_search``) in grid mode on an empty
results store, so it first runs the benchmark once to create the output cache (the only forward pass of the search),
then one Ray Tune trial per grid temperature: by default 24, the trials of the job's default (Optuna) search, over
``geomspace(0.25, 4)``. A trial's cost is its ``eval_s`` (scoring every cached validation image and its pixel metrics)
and its ``time_total_s`` (Tune's wall time of the trial's step; each actor reads the cached set from the object store
once, zero-copy), from the ``trials`` rows (as many trials at once as the job runs, ``trial_concurrency``, on reused
actors), and ``evaluate_temperature`` over the grid in this process right after the forward pass (same load
conditions); the means over the search, and the medians (a shared machine's noise hits single trials). The forward
pass is timed here:
``model.predict`` over the same validation images, batched, with as many torch threads as a trial has
(``ceil(trial_cpus)``), one warm-up batch untimed. Prints each and its ratio to the forward pass (target: a trial ≤ 10 %
of a forward pass).
Weights are random: only the timing is meaningful. Ray is shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import bench_suite, forward_seconds  # benchmarks/common.py: the script's own folder is on sys.path

from oodseg.data import create_dataset
from oodseg.models import Runtime, create_model, save_safetensors, setup_worker
from oodseg.platform.benchmark import ModelSpec
from oodseg.platform.output_cache import evaluate_temperature, load_cached_set
from oodseg.platform.results import ResultsStore
from oodseg.platform.tuning.temperature import TemperatureSearchConfig, run_temperature_search

VAL_SET = "road_anomaly_21"


def forward_seconds_over(model: Any, images: list[np.ndarray], batch_size: int, runtime: Runtime) -> float:
    """Seconds of ``model.predict`` over ``images`` in batches of ``batch_size``."""
    batches = [torch.from_numpy(np.stack(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return forward_seconds(model, batches, runtime)


def trial_costs(trials: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, int]:
    """(eval_s, time_total_s, images) of every trial, from its ``trials`` row's ``metrics_json``."""
    metrics = [json.loads(t["metrics_json"]) for t in trials]
    return (np.array([m["eval_s"] for m in metrics]), np.array([m["time_total_s"] for m in metrics]),
            int(metrics[0]["n_images"]))


def in_process_trial(cfg: TemperatureSearchConfig, source_run: str) -> float:
    """Mean seconds of ``evaluate_temperature`` over the grid in this process (no Ray, same conditions as the
    forward timing), on the output cache the search created."""
    data = load_cached_set(ResultsStore(cfg.results), source_run, cfg.model.name, cfg.val_set)
    return float(np.mean([evaluate_temperature(data, cfg.scorer, t, bits=cfg.bits)["eval_s"] for t in cfg.grid]))


def search(cfg: TemperatureSearchConfig) -> Any:
    """Run the search; Ray (started by it) is shut down afterwards."""
    import ray

    try:
        return run_temperature_search(cfg)
    finally:
        ray.shutdown()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=1.0, help="ERFNet width multiplier")
    ap.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="model input size (default: the images' own size)")
    ap.add_argument("--image-size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"),
                    help="synthetic suite image size")
    ap.add_argument("--images", type=int, default=8, help="validation images")
    ap.add_argument("--grid", type=float, nargs="+", default=[round(float(t), 4) for t in np.geomspace(0.25, 4, 24)],
                    help="trial temperatures (default: 24, the default search's trial count)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--trial-cpus", type=float, default=1.0)
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (0: all)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device of the forward pass")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        suite = bench_suite(work, a.image_size, a.images)
        torch.manual_seed(0)
        model = create_model("erfnet", width=a.width, input_size=list(a.input_size) if a.input_size else None)
        ckpt = save_safetensors(model, work / "model.safetensors")
        cfg = TemperatureSearchConfig(
            results=str(work / "results"), data_root=str(suite), model=ModelSpec("bench", checkpoint=str(ckpt)),
            val_set=VAL_SET, datasets=(VAL_SET,), search="grid", grid=tuple(a.grid), trial_cpus=a.trial_cpus,
            batch_size=a.batch_size, num_cpus=a.num_cpus)
        t0 = time.perf_counter()
        res = search(cfg)
        search_s = time.perf_counter() - t0
        ds = create_dataset(VAL_SET, root=str(suite))
        images = [ds.load(r)["image"] for r in ds.samples]
        threads = max(1, math.ceil(a.trial_cpus))
        runtime = Runtime(device=a.device)
        setup_worker(threads, runtime.torch_device)  # as the score actors and the trials do
        fwd = forward_seconds_over(model, images, a.batch_size, runtime)
        local = in_process_trial(cfg, res.source_run)
    evals, totals, n = trial_costs(res.studies[0].trials)
    print(f"ERFNet width {a.width}, {len(images)} images of {images[0].shape[0]}x{images[0].shape[1]}, forward on "
          f"{runtime.torch_device} with {threads} thread(s); search {search_s:.1f} s incl. Ray start and the "
          f"cache-creating benchmark", file=sys.stderr)
    print(f"forward pass (model.predict)   : {1000 * fwd:8.1f} ms for {len(images)} images")
    for what, s in (("trial, scoring only (eval_s)   ", evals), ("trial, Tune wall (time_total_s)", totals),
                    ("same scoring in this process  ", local)):
        s = np.atleast_1d(s)
        spread = f"   (median {np.median(s) / fwd:.3f} over {s.size} trials)" if s.size > 1 else ""
        print(f"{what}: {1000 * s.mean():8.1f} ms for {n} images   ratio to forward {s.mean() / fwd:.3f}   "
              f"(target ≤ 0.10){spread}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
