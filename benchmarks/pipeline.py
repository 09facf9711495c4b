"""Throughput of the benchmark job (``oodseg.platform.benchmark``) vs the bare batched model forward, same images.

    python benchmarks/pipeline.py                    # CPU default: 5 anomaly sets x 8 images of 128x256, ERFNet
    python benchmarks/pipeline.py --width 0.25       # a tiny model: the scoring cost dominates
    python benchmarks/pipeline.py --image-size 512 1024 --images 32 --batch-size 8 --num-cpus 0   # GPU machine
    python benchmarks/pipeline.py --data-root /data  # real datasets instead of a temporary synthetic suite
    python benchmarks/pipeline.py --scale 1 4 16     # only the whole job at 1x, 4x, 16x the images (scaling.py)

Prints images/s of (a) ``model.predict`` alone over the decoded images in batches (device-synchronised), (w) the same
per-batch work as the score stage's actors (``ScoreActor``: predict, every scorer, metric states, fp16 score shards)
in this process without Ray (decoding, ``read_batch``, which the job runs in Ray Data read tasks beside the actors, is
in neither timing: it is printed on its own, with what (w) would be with it), (a) and (w) interleaved batch by batch
and repeated
(``--repeats``; the median of the per-repeat ratios is printed too, so a change of load on a shared machine hits both
alike; with the job, the repeats are split between before and after it and their mean is the reference, so a drift of
the machine's speed during the run hits (a), (w) and the job alike), (b) the Ray Data scoring pass (from the score
stage's start, actor start-up included, to its last row) and (b') the same pass after its first batch arrived (steady
state), (c) the whole job (prepare, Ray start, score stage, component pass, Parquet commit); the ratios to (a) (target
≥ 0.9 for (b') on a GPU) and to (w) (Ray's own overhead), the peak object-store use sampled during the run, and the
output-cache bytes per image of ERFNet and EoMT-L (``oodseg.platform.cache.output_nbytes``). With the small CPU
defaults the fixed costs (Ray start, actor start-up: seconds) dominate (b) and (c); (b') shows the per-image cost. The
load averages at the start, after (a)/(w) and at the end are printed (``os.getloadavg``, as ``uptime``).
Weights are random: only the timing is meaningful. Everything is written to a temporary directory; Ray is shut down
at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from common import bench_suite  # benchmarks/common.py: the script's own folder is on sys.path

from oodseg.data import default_datasets
from oodseg.models import Runtime, create_model, save_safetensors, setup_worker
from oodseg.platform.benchmark import BenchmarkConfig, BenchmarkRunner, ModelSpec, Plan
from oodseg.platform.benchmark.prepare import prepare
from oodseg.platform.benchmark.read import image_items, read_batch
from oodseg.platform.benchmark.score import ScoreActor, ScoreStage
from oodseg.platform.benchmark.stage import ModelRun, Stage
from oodseg.platform.cache import output_nbytes
from oodseg.platform.runs import init_ray


class PeakSampler(threading.Thread):
    """Calls :meth:`sample` every ``period_s`` until stopped and keeps the largest value (MiB; None: no sample)."""

    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.peak_mib = 0.0
        self._stop_event = threading.Event()

    def sample(self) -> float | None:
        raise NotImplementedError

    def run(self) -> None:
        while not self._stop_event.is_set():
            if (value := self.sample()) is not None:
                self.peak_mib = max(self.peak_mib, value)
            self._stop_event.wait(self.period_s)

    def stop(self) -> float:
        self._stop_event.set()
        self.join(timeout=10)
        return self.peak_mib


class ObjectStorePeak(PeakSampler):
    """This cluster's plasma usage (``memory_summary(stats_only=True)``), once Ray is up."""

    def sample(self) -> float | None:
        import ray
        from ray._private.internal_api import memory_summary

        if not ray.is_initialized():
            return None
        try:
            text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        except Exception:  # noqa: BLE001 - sampling is best effort while Ray starts/stops
            return None
        m = re.search(r"Plasma memory usage (\d+(?:\.\d+)?) MiB", text)
        return float(m.group(1)) if m else None


@dataclass
class StreamTiming:
    """When a stage's row batches arrived, seconds from the stage's start: the first (after actor start-up) and the
    last, and how many images the first batch and the whole stream carried."""

    first_s: float = 0.0
    first_n: int = 0
    last_s: float = 0.0
    n: int = 0

    def add(self, batch: pa.Table, at_s: float) -> None:
        images = sum(k in ("image", "failure") for k in batch.column("row").to_pylist())
        if not self.n:
            self.first_s, self.first_n = at_s, images
        self.n += images
        self.last_s = at_s

    @property
    def steady_rate(self) -> float:
        """images/s between the first and the last batch (start-up excluded)."""
        span = self.last_s - self.first_s
        return (self.n - self.first_n) / span if span > 0 else float("nan")


class TimedRunner(BenchmarkRunner):
    """The benchmark driver, recording per enabled stage its :class:`StreamTiming` and its seconds to the last
    commit (component pass included). A reader thread pulls the stage's row stream and stamps each batch on arrival,
    so the driver's component pass and commits of finished units (run between batches) do not delay the stamps."""

    def __init__(self, cfg: BenchmarkConfig) -> None:
        super().__init__(cfg)
        self.streams: dict[str, StreamTiming] = {}
        self.stage_s: dict[str, float] = {}

    def run_stage(self, ray: Any, stage: Stage) -> None:
        if not stage.enabled():
            return
        t0 = time.perf_counter()
        stream, timing = stage.stream, self.streams.setdefault(stage.name, StreamTiming())

        def timed(ray_: Any, pending: list[str]) -> Any:
            batches: queue.Queue = queue.Queue()
            rows = stream(ray_, pending)

            def pump() -> None:
                try:
                    for batch in rows:
                        timing.add(batch, time.perf_counter() - t0)
                        batches.put(batch)
                except BaseException as e:  # noqa: BLE001 - handed to the driver thread, which raises it
                    batches.put(e)
                batches.put(None)

            threading.Thread(target=pump, daemon=True).start()
            while (item := batches.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item

        stage.stream = timed  # type: ignore[method-assign]
        super().run_stage(ray, stage)
        self.stage_s[stage.name] = time.perf_counter() - t0


def interleaved(model: Any, cfg: BenchmarkConfig, plan: Plan, threads: int, runtime: Runtime, repeats: int
                ) -> tuple[float, float, float, float, float]:
    """(bare images/s, in-process images/s, median per-repeat ratio in-process / bare of the wall and of the CPU
    seconds of this process, decode seconds per image), measured interleaved.

    Bare: ``model.predict`` alone over the decoded images in the actors' batches (device-synchronised). In-process:
    one :class:`ScoreActor` call per batch in this process without Ray (predict, every scorer, metric states, fp16
    score shards): the actor's work in the job. Decoding (``read_batch``) is left out of both timings, as the job
    runs it in Ray Data read tasks beside the actor; its seconds are returned on their own. Each repeat times every
    batch both ways, one right after the other, so a change of machine load hits both alike; one warm-up batch
    each, untimed.
    """
    spec = cfg.models[0]
    run = ModelRun(replace(cfg, torch_threads=threads), plan.store, "inproc", spec, plan.checkpoints[spec.name],
                   plan.keys[spec.name], plan.datasets, plan.infos)
    actor = ScoreActor(run.actor_context(ScoreStage(run).keys()))
    rows = image_items(plan.datasets)
    batches = [pa.Table.from_pylist(rows[i : i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]
    model = runtime.prepare(model).eval()
    sync = torch.cuda.synchronize if runtime.torch_device.type == "cuda" else (lambda: None)

    def decode(table: pa.Table) -> tuple[pa.Table, float]:
        """The read tasks' work, not the actor's: the decoded batch and its seconds."""
        t0 = time.perf_counter()
        return read_batch(table, plan.datasets, cfg.protocol), time.perf_counter() - t0

    def bare(decoded: pa.Table) -> tuple[float, float]:
        images = torch.from_numpy(np.stack([np.frombuffer(r["image"], np.uint8).reshape(r["height"], r["width"], 3)
                                            for r in decoded.to_pylist()]))
        with torch.inference_mode(), runtime.autocast():
            t0, c0 = time.perf_counter(), time.process_time()
            model.predict(images)
            sync()
        return time.perf_counter() - t0, time.process_time() - c0

    def work(decoded: pa.Table) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        actor(decoded)
        return time.perf_counter() - t0, time.process_time() - c0

    first = decode(batches[0])[0]
    bare(first), work(first)  # warm-up
    totals, ratios, decode_s = np.zeros(2), [], 0.0
    for _ in range(repeats):
        pairs = []
        for b in batches:
            decoded, seconds = decode(b)  # one decode per batch and repeat, shared by both timings
            decode_s += seconds
            pairs.append([bare(decoded), work(decoded)])
        pair = np.array(pairs).sum(axis=0)  # [bare, work] x [wall, cpu]
        totals += pair[:, 0]
        ratios.append(pair[0] / pair[1])
    n = len(rows) * repeats
    wall, cpu = np.median(ratios, axis=0)
    return n / totals[0], n / totals[1], float(wall), float(cpu), decode_s / n


def whole_job(cfg: BenchmarkConfig) -> tuple[float, TimedRunner, float]:
    """(job seconds incl. Ray start, the runner with its stage timings, peak object-store MiB); Ray is shut down."""
    import ray

    sampler = ObjectStorePeak()
    sampler.start()
    t0 = time.perf_counter()
    try:
        init_ray(cfg.ray_address, cfg.num_cpus)
        runner = TimedRunner(cfg)
        runner.run()
        job_s = time.perf_counter() - t0
    finally:
        peak = sampler.stop()
        ray.shutdown()
    return job_s, runner, peak


def cache_sizes() -> str:
    """Output-cache bytes per image (fp16) of ERFNet at 512x1024 and EoMT-L Cityscapes."""
    mib = 2**20
    erf19 = output_nbytes("pixel", 19, (512, 1024))
    erf20 = output_nbytes("pixel", 20, (512, 1024))
    # EoMT-L Cityscapes (tue-mps/cityscapes_semantic_eomt_large_1024): Q=100, 19 classes (+ no-object), windows of
    # 1024x1024 (2 per 1024x2048 frame), mask logits at 4x the 64x64 patch grid = 256x256 natively
    eomt_native = output_nbytes("mask", 19, (256, 256), num_queries=100, n_crops=2)
    eomt_full = output_nbytes("mask", 19, (1024, 1024), num_queries=100, n_crops=2)
    return (f"output cache per image (fp16): ERFNet 512x1024 {erf20 / mib:.1f} MiB with void / {erf19 / mib:.1f} MiB "
            f"scored; EoMT-L 1024 {eomt_native / mib:.1f} MiB native 256x256 masks ({eomt_full / mib:.0f} MiB if "
            "upsampled to the window)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0, help="ERFNet width multiplier (1.0 = the published model)")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="model input size (default: the images' own size)")
    p.add_argument("--image-size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"),
                   help="synthetic suite image size")
    p.add_argument("--images", type=int, default=8, help="images per synthetic anomaly set")
    p.add_argument("--data-root", default="", help="existing dataset root (default: a temporary synthetic suite)")
    p.add_argument("--datasets", nargs="+", default=list(default_datasets("anomaly")))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (0: all)")
    p.add_argument("--actor-cpus", type=float, default=1.0,
                   help="CPUs per scoring actor; the bare loop uses as many torch threads, for a like-for-like ratio")
    p.add_argument("--num-actors", type=int, default=1,
                   help="scoring actors of the job (1: like the bare loop's one model; 0: the job's default pool)")
    p.add_argument("--actor-concurrency", type=int, default=0,
                   help="calls each scoring actor runs at once (0: the job's default, 2 on a GPU and 1 on CPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of bare forward vs in-process work")
    p.add_argument("--skip-job", action="store_true", help="only the bare forward vs in-process work, no Ray")
    p.add_argument("--scale", type=int, nargs="+", default=None, metavar="K",
                   help="instead: the whole job on synthetic sets of K x --images images each (e.g. 1 4 16), per-image "
                        "time and the driver's peak RSS per K, ratios to the first K (benchmarks/scaling.py)")
    a = p.parse_args(argv)
    if a.scale and (a.data_root or min(a.scale) < 1):
        p.error("--scale needs positive factors and the synthetic suite (no --data-root)")
    return a


def job_config(a: argparse.Namespace, work: Path, root: str) -> tuple[BenchmarkConfig, Any]:
    """The benchmark job's config over the suite at ``root``, for a random ERFNet (seed 0) saved under ``work``
    (results there too), and that model."""
    torch.manual_seed(0)
    model = create_model("erfnet", width=a.width, input_size=list(a.input_size) if a.input_size else None)
    ckpt = save_safetensors(model, work / "model.safetensors")
    threads = max(1, math.ceil(a.actor_cpus))
    cfg = BenchmarkConfig(
        results=str(work / "results"), data_root=root, models=(ModelSpec("bench", checkpoint=str(ckpt)),),
        datasets=tuple(a.datasets), batch_size=a.batch_size, cache_outputs=False, heatmaps=0, plots=False,
        progress=False, num_cpus=a.num_cpus, num_actors=a.num_actors, actor_num_cpus=a.actor_cpus,
        actor_concurrency=a.actor_concurrency,
        torch_threads=threads,
        device=a.device, precision=a.precision)
    return cfg, model


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    runtime = Runtime(device=a.device, precision=a.precision)
    threads = max(1, math.ceil(a.actor_cpus))
    setup_worker(threads, runtime.torch_device)  # as the score actors do
    if a.scale:
        from scaling import scaling  # benchmarks/scaling.py (it imports this module's job helpers)

        return scaling(a)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = a.data_root or str(bench_suite(work, a.image_size, a.images))
        cfg, model = job_config(a, work, root)
        plan = prepare(cfg)
        images = [ds.load(r)["image"] for ds in plan.datasets.values() for r in ds.samples]
        n = len(images)
        print(f"[{load()}] start", file=sys.stderr)
        print(f"device {runtime.torch_device} ({runtime.dtype}), ERFNet width {a.width} at "
              f"{tuple(a.input_size) if a.input_size else 'native size'}, {n} images of "
              f"{sorted({im.shape[:2] for im in images})}, batch {a.batch_size}, {threads} thread(s)", file=sys.stderr)
        before = a.repeats if a.skip_job else max(1, (a.repeats + 1) // 2)
        bare, work_rate, work_ratio, cpu_ratio, decode = interleaved(model, cfg, plan, threads, runtime, before)
        print(f"[{load()}] bare vs in-process done", file=sys.stderr)
        if not a.skip_job:
            job_s, runner, peak = whole_job(cfg)
            after = interleaved(model, cfg, plan, threads, runtime, max(1, a.repeats // 2))
            print(f"in-process work before / after the job: {work_rate:.2f} / {after[1]:.2f} images/s (bare "
                  f"{bare:.2f} / {after[0]:.2f}); their mean is compared with the job", file=sys.stderr)
            bare, work_rate = (bare + after[0]) / 2, (work_rate + after[1]) / 2
            work_ratio, cpu_ratio = (work_ratio + after[2]) / 2, (cpu_ratio + after[3]) / 2
            decode = (decode + after[4]) / 2
    print(f"bare batched forward        : {bare:8.2f} images/s")
    print(f"same work in-process, no Ray: {work_rate:8.2f} images/s   ratio {work_rate / bare:.2f} (scoring cost; "
          f"median per interleaved repeat {work_ratio:.2f}, of their CPU seconds {cpu_ratio:.2f})")
    print(f"  decoding, not in either    : {1000 * decode:8.1f} ms/image (Ray Data read tasks in the job; with it "
          f"in-process would be {1 / (1 / work_rate + decode) / bare:.2f})")
    if a.skip_job:
        print(f"load average at the end      : {load()}")
        return 0
    score = runner.streams["score"]
    score_rate, job_rate = n / score.last_s, n / job_s
    print(f"Ray Data scoring pass       : {score_rate:8.2f} images/s   ratio {score_rate / bare:.2f}"
          f"  (vs in-process work {score_rate / work_rate:.2f}; actor start-up included)")
    print(f"  after its first batch     : {score.steady_rate:8.2f} images/s   ratio {score.steady_rate / bare:.2f}"
          f"  (vs in-process work {score.steady_rate / work_rate:.2f})")
    print(f"whole job (start to commit) : {job_rate:8.2f} images/s   ratio {job_rate / bare:.2f}")
    print(f"seconds                     : job {job_s:.1f}; score stage: first rows {score.first_s:.1f}, last rows "
          f"{score.last_s:.1f}, committed {runner.stage_s['score']:.1f}")
    print(f"peak object store use       : {peak:.1f} MiB")
    print(cache_sizes())
    print(f"load average at the end      : {load()}")
    return 0


def load() -> str:
    """The 1/5/15-minute load averages (``uptime``): on a shared machine, what the timings ran beside."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    raise SystemExit(main())
