"""Cost against size: ``python benchmarks/pipeline.py --scale 1 4 16`` (issue 26, "cost grows linearly").

For each factor K, a fresh synthetic suite with K x ``--images`` frames per anomaly set, then the whole benchmark
job over it (``pipeline.whole_job``: Ray start, score stage, component pass, Parquet commit; suite and checkpoint
are made before the clock starts). Prints per K: images, wall seconds, seconds per image (whole job, and the score
stage after its first batch, fixed costs excluded), and the driver's resident set size at the job's start and its
peak during the job, sampled with psutil on a thread (``resource.getrusage().ru_maxrss`` is the maximum since the
process started and never resets, so it cannot separate runs that follow one another in one process). Then the
ratios to the first K: per-image time (linear cost: <= 1, as Ray start and actor start-up are spread over more
images; > 1 means the cost grows faster than the images), the marginal seconds per added image between consecutive
K (linear cost: about constant) and peak RSS (a flat driver: about 1). The runs share this process, so the first
K's peak also holds the imports (Ray, pyarrow) that later runs reuse.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
from common import bench_suite  # benchmarks/common.py: the script's own folder is on sys.path
from pipeline import PeakSampler, job_config, load, whole_job

MIB = 2**20


class RssPeak(PeakSampler):
    """This process's current resident set size (psutil), from its value at construction on."""

    def __init__(self, period_s: float = 0.05) -> None:
        super().__init__(period_s)
        self._process = psutil.Process()
        self.start_mib = self.peak_mib = self.sample()

    def sample(self) -> float:
        return self._process.memory_info().rss / MIB


@dataclass(frozen=True)
class ScaleRun:
    """One whole job at ``factor`` x the images."""

    factor: int
    images: int
    wall_s: float
    steady_s_per_image: float  # score stage after its first batch
    start_mib: float
    peak_mib: float

    @property
    def s_per_image(self) -> float:
        return self.wall_s / self.images


def run_scale(a: argparse.Namespace, factor: int, work: Path) -> ScaleRun:
    """The whole job on a new suite of ``factor`` x ``a.images`` frames per anomaly set under ``work``."""
    root = bench_suite(work, a.image_size, a.images * factor)
    cfg, _ = job_config(a, work, str(root))
    gc.collect()
    rss = RssPeak()
    rss.start()
    try:
        job_s, runner, _ = whole_job(cfg)
    finally:
        peak = rss.stop()
    score = runner.streams["score"]
    steady = 1 / score.steady_rate if score.steady_rate > 0 else float("nan")  # nan: a single batch
    return ScaleRun(factor, score.n, job_s, steady, rss.start_mib, peak)


def print_ratios(runs: list[ScaleRun]) -> None:
    """Per-image time of each run to the first's (steady: to the first with more than one batch), the marginal
    seconds per added image between consecutive runs (fixed costs cancel), and the last peak RSS to the first."""
    first, last = runs[0], runs[-1]
    per_image = ", ".join(f"{r.factor}x/{first.factor}x {r.s_per_image / first.s_per_image:.2f}" for r in runs[1:])
    print(f"per-image time ratio (whole job)   : {per_image}")
    steady = [r for r in runs if math.isfinite(r.steady_s_per_image)]
    if len(steady) > 1:
        base = steady[0]
        print("per-image time ratio (steady score): " + ", ".join(
            f"{r.factor}x/{base.factor}x {r.steady_s_per_image / base.steady_s_per_image:.2f}" for r in steady[1:]))
    marginal = ", ".join(f"{q.factor}x-{p.factor}x {(q.wall_s - p.wall_s) / (q.images - p.images):.3f}"
                         for p, q in itertools.pairwise(runs) if q.images != p.images)
    print(f"marginal s per added image         : {marginal}")
    print(f"driver peak RSS ratio              : {last.factor}x/{first.factor}x {last.peak_mib / first.peak_mib:.2f}"
          f" ({last.peak_mib - first.peak_mib:+.0f} MiB)")


def scaling(a: argparse.Namespace) -> int:
    """Runs every ``a.scale`` factor in turn and prints the table and the ratios to the first factor."""
    runs = []
    print(f"load average at the start: {load()}")
    print(f"{'scale':>5} {'images':>6} {'wall s':>7} {'s/image':>8} {'steady s/image':>14} {'RSS start MiB':>13} "
          f"{'peak MiB':>8}")
    for k in a.scale:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_scale(a, k, Path(tmp))
        runs.append(r)
        print(f"{k:>4}x {r.images:>6} {r.wall_s:>7.1f} {r.s_per_image:>8.3f} {r.steady_s_per_image:>14.3f} "
              f"{r.start_mib:>13.0f} {r.peak_mib:>8.0f}   [load {load()}]", flush=True)
    print_ratios(runs)
    print(f"load average at the end  : {load()}")
    return 0
