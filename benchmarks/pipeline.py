"""Throughput of the benchmark job vs the bare batched model forward on the same images and device.

    python benchmarks/pipeline.py                         # synthetic suite (256x512), published-size ERFNet
    python benchmarks/pipeline.py --width 0.25 --input-size 128 256   # a tiny model: scoring cost dominates
    python benchmarks/pipeline.py --input-size 512 1024 --batch-size 8   # ERFNet's Cityscapes input size (GPU)

Prints images/s of (a) ``model.predict`` alone over the in-memory images in batches (device-synchronised), (w) the
same per-batch work as the actors (read, predict, every scorer, metric states) in one process without Ray, (b) the
Ray Data scoring pass (read + decode + predict + every scorer + metric states + reduce, incl. actor start-up), (c)
the whole job (Ray start, model load, component pass, Parquet commit); the ratios to (a) (target ≥ 0.9) and (b)/(w)
(Ray's own overhead), the peak object-store use sampled during the run, and the output-cache bytes per image of
ERFNet and EoMT-L.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from oodseg.data import create_dataset
from oodseg.models import Runtime, create_model, save_safetensors
from oodseg.platform.cache import output_nbytes
from oodseg.platform.pipeline import (
    ANOMALY_DATASETS,
    BenchmarkConfig,
    BenchmarkRunner,
    DatasetInfo,
    ModelSpec,
    ScoreActor,
    read_batch,
    scorer_keys,
    scorer_names,
    synthetic_suite,
)


class ObjectStorePeak(threading.Thread):
    """Samples this cluster's plasma usage (``memory_summary(stats_only=True)``) until stopped; keeps the max MiB."""

    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.peak_mib = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import ray
        from ray._private.internal_api import memory_summary

        while not self._stop_event.is_set():
            if ray.is_initialized():
                try:
                    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
                    m = re.search(r"Plasma memory usage (\d+(?:\.\d+)?) MiB", text)
                    if m:
                        self.peak_mib = max(self.peak_mib, float(m.group(1)))
                except Exception:  # noqa: BLE001 - sampling is best effort while Ray starts/stops
                    pass
            self._stop_event.wait(self.period_s)

    def stop(self) -> float:
        self._stop_event.set()
        self.join(timeout=10)
        return self.peak_mib


def bare_forward(model, images: list[np.ndarray], batch_size: int, runtime: Runtime) -> float:
    """images/s of ``model.predict`` alone (same-size images batched; one warm-up batch not timed)."""
    model = runtime.prepare(model).eval()
    batches = [torch.from_numpy(np.stack(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    sync = torch.cuda.synchronize if runtime.torch_device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), runtime.autocast():
        model.predict(batches[0])
        sync()
        t0 = time.perf_counter()
        for b in batches:
            model.predict(b)
        sync()
    return len(images) / (time.perf_counter() - t0)


def in_process_actor(cfg: BenchmarkConfig, ckpt: str, datasets: list[str], threads: int) -> float:
    """images/s of the same per-batch work (read, predict, every scorer, metric states, score-map shards) run by
    one in-process :class:`ScoreActor` without Ray: what the pipeline costs on top of the work itself."""
    import pyarrow as pa

    spec = cfg.models[0]
    opened = {n: create_dataset(n, root=cfg.data_root) for n in datasets}
    keys = scorer_keys(scorer_names(cfg), cfg.placements, cfg.temperatures, "mask")
    infos = {n: DatasetInfo(n, d.kind, d.track, 19) for n, d in opened.items()}
    rows = [{"dataset": n, "idx": i, "id": r.id, "image_path": r.image_path, "label_path": r.label_path or ""}
            for n, d in opened.items() for i, r in enumerate(d.samples)]
    with tempfile.TemporaryDirectory() as tmp:
        actor = ScoreActor(spec, ckpt, keys, infos, tmp, "inproc", torch_threads=threads, cache_outputs=False,
                           model_batch=cfg.batch_size)
        batches = [pa.Table.from_pylist(rows[i : i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]
        actor(read_batch(batches[0], opened))  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            actor(read_batch(b, opened))
        return len(rows) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=1.0, help="ERFNet width multiplier (1.0 = the published model)")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="model input size (default: the images' own size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--datasets", nargs="+", default=list(ANOMALY_DATASETS))
    p.add_argument("--repeat", type=int, default=1, help="use every image this many times (longer, steadier run)")
    p.add_argument("--cache-dir", default=None, help="where the synthetic suite lives (default: $OODSEG_CACHE)")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs of the local Ray (0: all)")
    p.add_argument("--actor-cpus", type=float, default=1.0,
                   help="CPUs per scoring actor; the bare loop uses as many torch threads, for a like-for-like ratio")
    a = p.parse_args(argv)

    from oodseg.platform.pipeline import default_cache_dir

    cache_dir = Path(a.cache_dir) if a.cache_dir else default_cache_dir()
    suite = synthetic_suite(cache_dir, 0)
    runtime = Runtime()
    threads = max(1, int(np.ceil(a.actor_cpus)))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("erfnet", width=a.width, input_size=list(a.input_size) if a.input_size else None)
    images = []
    for name in a.datasets:
        ds = create_dataset(name, root=str(suite))
        images += [ds.load(r)["image"] for r in ds.samples] * a.repeat
    n = len(images) // a.repeat
    at = tuple(a.input_size) if a.input_size else "native size"
    print(f"device {runtime.torch_device} ({runtime.dtype}), ERFNet width {a.width} at {at}, "
          f"{n} images of {images[0].shape[1]}x{images[0].shape[0]}, batch {a.batch_size}, {threads} thread(s)",
          file=sys.stderr)
    bare = bare_forward(model, images[:n], a.batch_size, runtime)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_safetensors(model.cpu(), Path(tmp) / "model.safetensors")
        cfg = BenchmarkConfig(
            results=str(Path(tmp) / "results"), data_root=str(suite),
            models=(ModelSpec("bench", checkpoint=str(ckpt)),),
            datasets=tuple(a.datasets), batch_size=a.batch_size, cache_outputs=False, heatmaps=0, plots=False,
            progress=False, num_cpus=a.num_cpus, actor_num_cpus=a.actor_cpus, torch_threads=threads,
        )
        work = in_process_actor(cfg, str(ckpt), a.datasets, threads)
        runner = BenchmarkRunner(cfg)
        sampler = ObjectStorePeak()
        sampler.start()
        t0 = time.perf_counter()
        runner.run()
        job_s = time.perf_counter() - t0
        peak = sampler.stop()
    score_rate = runner.n_images / runner.timings["score_pass"]
    job_rate = runner.n_images / job_s
    print(f"bare batched forward        : {bare:8.2f} images/s")
    print(f"same work in-process, no Ray: {work:8.2f} images/s   ratio {work / bare:.2f} (scoring cost)")
    print(f"Ray Data scoring pass       : {score_rate:8.2f} images/s   ratio {score_rate / bare:.2f}"
          f"  (vs in-process work {score_rate / work:.2f})")
    print(f"whole job (start to commit) : {job_rate:8.2f} images/s   ratio {job_rate / bare:.2f}")
    print("stage seconds               : " + ", ".join(f"{k} {v:.1f}" for k, v in runner.timings.items()))
    print(f"peak object store use       : {peak:.1f} MiB")
    mib = 2**20
    erf19 = output_nbytes("pixel", 19, (512, 1024))
    erf20 = output_nbytes("pixel", 20, (512, 1024))
    # EoMT-L Cityscapes (tue-mps/cityscapes_semantic_eomt_large_1024): Q=100, 19 classes (+ no-object), windows of
    # 1024x1024 (2 per 1024x2048 frame), mask logits at 4x the 64x64 patch grid = 256x256 natively
    eomt_native = output_nbytes("mask", 19, (256, 256), num_queries=100, n_crops=2)
    eomt_full = output_nbytes("mask", 19, (1024, 1024), num_queries=100, n_crops=2)
    print(f"output cache per image (fp16): ERFNet 512x1024 {erf20 / mib:.1f} MiB with void / {erf19 / mib:.1f} MiB "
          f"scored; EoMT-L 1024 {eomt_native / mib:.1f} MiB native 256x256 masks "
          f"({eomt_full / mib:.0f} MiB if upsampled to the window)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
