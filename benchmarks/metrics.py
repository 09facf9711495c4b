"""Benchmark: streaming PixelMetrics vs sklearn (average_precision_score + roc_auc_score) on many pixels.

Synthetic but realistic data, generated in image-sized chunks (default 1024×2048): Gaussian inlier scores,
one or a few rectangular anomalies per image (~2 % of pixels) whose scores are shifted up, 1 % ignore pixels.

Measured in one run, memory and time in separate passes (tracemalloc's per-allocation cost falls on the many
small allocations of the per-frame SMIYC binning and once made it look 2.5× slower than it is):
* peak memory (first pass, tracemalloc on): the peak above the baseline while the metric works (numpy allocations
  are traced). For PixelMetrics the chunk being scored is excluded (it exists anyway); sklearn additionally needs
  every pixel's score and label in memory at once, reported as "inputs held" (5 bytes/pixel here);
* time (then, tracemalloc off): PixelMetrics.update over all chunks + compute(), as the benchmark job runs it (the
  exact metrics plus the SMIYC leaderboard's per-frame binned ones) and with ``smiyc=False`` (the exact metrics
  alone: what sklearn computes); sklearn average_precision_score + roc_auc_score (+ the exact FPR95 from
  roc_curve, timed separately) on the concatenated non-ignored pixels.

    python benchmarks/metrics.py --pixels 1e8
    python benchmarks/metrics.py --pixels 2e7 --repeats 3    # ours / sklearn alternated 3 times, median ratio
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import tracemalloc

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodseg.scoring.metrics import PixelMetrics

MB = 2**20


def make_chunk(rng: np.random.Generator, h: int, w: int, frac: float, offset: float):
    """One image: N(offset, 1) scores, rectangular anomalies covering ~frac of the image scored +1.5, 1 % ignore."""
    labels = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        area = frac * h * w / 2 * rng.uniform(0.5, 1.5)
        rh = int(np.clip(np.sqrt(area * rng.uniform(0.5, 2)), 1, h))
        rw = int(np.clip(area / rh, 1, w))
        top, left = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
        labels[top : top + rh, left : left + rw] = 1
    labels[rng.random((h, w)) < 0.01] = 255
    scores = rng.standard_normal((h, w), dtype=np.float32) + np.float32(offset) + np.float32(1.5) * (labels == 1)
    return scores, labels


def ours(args: argparse.Namespace, keep: tuple[np.ndarray, np.ndarray] | None, smiyc: bool = True
         ) -> tuple[float, int, dict, int]:
    """(seconds, peak bytes, metrics, pixels kept) of PixelMetrics over every chunk (regenerated from the seed, the
    generation untimed); with ``keep`` the non-ignored pixels are copied into it for sklearn."""
    rng = np.random.default_rng(args.seed)
    metric = PixelMetrics(bits=args.bits, smiyc=smiyc)
    t_ours, peak, n_kept = 0.0, 0, 0
    for _ in range(args.n_chunks):
        scores, labels = make_chunk(rng, args.height, args.width, args.anomaly_fraction, args.offset)
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        metric.update(scores, labels)
        t_ours += time.perf_counter() - t0
        peak = max(peak, tracemalloc.get_traced_memory()[1] - base)  # 0 while tracemalloc is off
        if keep is not None:
            valid = labels.reshape(-1) != 255
            k = int(valid.sum())
            keep[0][n_kept : n_kept + k] = scores.reshape(-1)[valid]
            keep[1][n_kept : n_kept + k] = labels.reshape(-1)[valid]
            n_kept += k
        del scores, labels
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    result = metric.compute()
    t_ours += time.perf_counter() - t0
    peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
    memory = f", peak {peak / MB:.0f} MB (tracemalloc on)" if tracemalloc.is_tracing() else ""
    print(f"ours{'' if smiyc else ' (exact only)'}: {t_ours:.2f} s{memory}; state "
          f"{sum(p.nbytes for p in metric._pages.values()) / MB:.0f} MB, {len(metric._pages)} pages", flush=True)
    return t_ours, peak, result, n_kept


def sklearn_ap_auroc(y: np.ndarray, s: np.ndarray) -> tuple[float, int, dict]:
    """(seconds, peak bytes, {auprc, auroc}) of sklearn's average_precision_score + roc_auc_score."""
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    ref = {"auprc": average_precision_score(y, s), "auroc": roc_auc_score(y, s)}
    t_sk = time.perf_counter() - t0
    print(f"sklearn AP+AUROC{' (tracemalloc on)' if tracemalloc.is_tracing() else ''}: {t_sk:.2f} s", flush=True)
    return t_sk, tracemalloc.get_traced_memory()[1] - base, ref


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pixels", type=float, default=1e8, help="total pixels (default 1e8)")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--anomaly-fraction", type=float, default=0.02)
    ap.add_argument("--offset", type=float, default=0.0, help="add to all scores (e.g. -15 for energy-like scores)")
    ap.add_argument("--bits", type=int, default=24, help="PixelMetrics bin bits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="interleaved repeats of ours / sklearn (the time ratio printed is the median of the repeats')")
    ap.add_argument("--skip-sklearn", action="store_true")
    args = ap.parse_args()
    args.n_chunks = max(1, round(args.pixels / (args.height * args.width)))
    return args


def main() -> None:
    args = parse_args()
    chunk = args.height * args.width
    n_total = args.n_chunks * chunk
    print(f"{args.n_chunks} chunks of {args.height}x{args.width} = {n_total:.3g} pixels, anomaly fraction "
          f"~{args.anomaly_fraction}, offset {args.offset}, bits {args.bits}; load {os.getloadavg()[0]:.2f}")
    tracemalloc.start()  # the first pass measures memory
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    keep = None if args.skip_sklearn else (np.empty(n_total, np.float32), np.empty(n_total, np.uint8))
    _, peak_ours, result, n_kept = ours(args, keep)
    rows = [("AuPRC", "auprc"), ("AUROC", "auroc"), ("FPR95", "fpr95")]
    if keep is None:
        for label, key in rows:
            print(f"{label:8s} {result[key]:.6f}")
        return
    y, s = keep[1][:n_kept], keep[0][:n_kept]
    peak_sk = sklearn_ap_auroc(y, s)[1]
    tracemalloc.stop()  # the timing passes: tracemalloc off for both
    times = []
    for _ in range(args.repeats):  # alternate, so a change of machine load hits both alike
        t_sk, _, ref = sklearn_ap_auroc(y, s)
        times.append((ours(args, None)[0], t_sk, ours(args, None, smiyc=False)[0]))
    t0 = time.perf_counter()
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    ref["fpr95"] = float(fpr[np.argmax(tpr >= 0.95)])
    t_fpr = time.perf_counter() - t0
    del fpr, tpr
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t_ours, t_sk, t_exact = (float(np.median(v)) for v in zip(*times))
    ratio = float(np.median([b / a for a, b, _ in times]))
    ratio_exact = float(np.median([b / c for _, b, c in times]))
    print()
    print(f"{'':28s} {'PixelMetrics':>14s} {'sklearn':>14s} {'ratio sk/ours':>14s}")
    print(f"{'time AP+AUROC (s), median':28s} {t_ours:14.2f} {t_sk:14.2f} {ratio:14.1f}   ({len(times)} repeat(s))")
    print(f"{'  exact only (smiyc=False)':28s} {t_exact:14.2f} {t_sk:14.2f} {ratio_exact:14.1f}")
    print(f"{'time FPR95 roc_curve (s)':28s} {'(included)':>14s} {t_fpr:14.2f}")
    print(f"{'peak working memory (MB)':28s} {peak_ours / MB:14.0f} {peak_sk / MB:14.0f} {peak_sk / peak_ours:14.1f}")
    print(f"{'inputs held at once (MB)':28s} {chunk * 5 / MB:14.0f} {(y.nbytes + s.nbytes) / MB:14.0f}")
    print(f"{'process max RSS (MB)':28s} {'':14s} {'':14s} (start {rss0:.0f}, end {rss1:.0f})")
    print(f"load average (1/5/15 min) at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    print(f"{'metric':8s} {'PixelMetrics':>14s} {'sklearn':>14s} {'|diff|':>10s}")
    for label, key in rows:
        print(f"{label:8s} {result[key]:14.8f} {ref[key]:14.8f} {abs(result[key] - ref[key]):10.2e}")
    print(f"pixels scored: {result['n_pixels']} (sklearn {n_kept}), anomaly fraction {result['anomaly_fraction']:.4f}")


if __name__ == "__main__":
    main()
