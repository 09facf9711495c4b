"""Exact, order-independent sums for fit states: merging shards in any order gives the one-pass state bit for bit.

Floating-point sums depend on their order, so fit states never add floats. Every value ``v`` is first rounded to the
grid ``2^-GRID_BITS`` (≈ 1e-3) and clamped to ``|v| < 2^(21−GRID_BITS)`` = 2048: ``q = round(v · 2^10)`` is an
integer with ``|q| < 2^21``. Sums of ``q`` and of products ``q_i q_j`` are then integers, accumulated in int64:

* first moments: float64 sums of ``|q| < 2^21`` over fewer than 2^32 values per batch are exact;
* second moments: each ``q = hi · 2^11 + lo`` (``|hi| ≤ 2^10``, ``0 ≤ lo < 2^11``), so
  ``Σ q_i q_j = 2^22 Σ hi_i hi_j + 2^11 (Σ hi_i lo_j + Σ lo_i hi_j) + Σ lo_i lo_j``; one float64 matrix product of
  ``[hi, lo]`` gives the four blocks, each a sum of products ``< 2^22``, exact for fewer than 2^31 values per batch
  and, kept as int64, for fewer than 2^41 values in all.

The only approximation is the rounding of each value to ``2^-10`` (statistics of the rounded values are exact).
"""

from __future__ import annotations

import numpy as np
import torch

GRID_BITS = 10
SCALE = float(2**GRID_BITS)
Q_LIMIT = 2**21 - 1
SPLIT = 2**11


def quantise(x: torch.Tensor) -> torch.Tensor:
    """``round(x · 2^10)`` clamped to ``|q| < 2^21``, as integer-valued float64 (same device)."""
    return torch.round(x.double() * SCALE).clamp_(-Q_LIMIT, Q_LIMIT)


def split(q: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` integer-valued → ``[N, 2D]`` = ``[hi, lo]`` with ``q = hi · 2^11 + lo``, ``0 ≤ lo < 2^11``."""
    hi = torch.floor(q / SPLIT)
    return torch.cat([hi, q - hi * SPLIT], dim=1)


def gram_blocks(q: torch.Tensor) -> np.ndarray:
    """Exact ``[2D, 2D]`` int64 Gram matrix of ``split(q)`` for quantised ``q [N, D]``: every entry a sum of
    products < 2^22, exact in one float64 matmul for N < 2^31; :func:`combine_gram` turns the blocks into ``Σ v vᵀ``."""
    s = split(q)
    return (s.T @ s).round().to(torch.int64).cpu().numpy()


def combine_gram(blocks: np.ndarray) -> np.ndarray:
    """``Σ v vᵀ`` (float64) of the rounded values from accumulated :func:`gram_blocks`."""
    d = blocks.shape[0] // 2
    b = blocks.astype(np.float64)
    hh, hl, lh, ll = b[:d, :d], b[:d, d:], b[d:, :d], b[d:, d:]
    return (hh * float(SPLIT * SPLIT) + (hl + lh) * float(SPLIT) + ll) / (SCALE * SCALE)


def class_sums(q: torch.Tensor, cls: torch.Tensor, num_classes: int) -> np.ndarray:
    """Exact per-class sums ``[C, D]`` (int64) of integer-valued ``q [N, D]`` grouped by ``cls [N]``."""
    out = torch.zeros((num_classes, q.shape[1]), dtype=torch.float64, device=q.device)
    out.index_add_(0, cls, q)
    return out.round().to(torch.int64).cpu().numpy()


def value_counts(q: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Distinct grid values (int64, ascending) of ``q`` and how often each occurs."""
    values, counts = torch.unique(q.to(torch.int64).flatten(), return_counts=True)
    return values.cpu().numpy(), counts.cpu().numpy().astype(np.int64)


def merge_counts(values: np.ndarray, counts: np.ndarray, other_values: np.ndarray, other_counts: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Union of two sparse histograms over grid values (counts added; ascending values)."""
    all_values = np.concatenate([values, other_values])
    merged, inverse = np.unique(all_values, return_inverse=True)
    total = np.zeros(len(merged), dtype=np.int64)
    np.add.at(total, inverse, np.concatenate([counts, other_counts]))
    return merged, total


def percentile(values: np.ndarray, counts: np.ndarray, p: float) -> float:
    """``np.percentile(x, p)`` (linear interpolation) of the multiset ``values × counts``, in value units."""
    n = int(counts.sum())
    if n == 0:
        raise ValueError("percentile of an empty histogram")
    pos = p / 100.0 * (n - 1)
    lo, frac = int(np.floor(pos)), pos - np.floor(pos)
    ends = np.cumsum(counts)
    a = values[np.searchsorted(ends, lo, side="right")] / SCALE
    b = values[np.searchsorted(ends, min(lo + 1, n - 1), side="right")] / SCALE
    return float(a + (b - a) * frac)


def class_squares(q: torch.Tensor, cls: torch.Tensor, num_classes: int) -> np.ndarray:
    """Exact per-class ``[Σ hi², Σ hi·lo, Σ lo²]`` (int64 ``[C, 3]``) of integer-valued ``q [N]``."""
    s = split(q.reshape(-1, 1))
    hi, lo = s[:, 0], s[:, 1]
    return class_sums(torch.stack([hi * hi, hi * lo, lo * lo], dim=1), cls, num_classes)


def combine_squares(parts: np.ndarray) -> np.ndarray:
    """``Σ v²`` per class (float64) of the rounded values from accumulated :func:`class_squares`."""
    p = parts.astype(np.float64)
    return (p[:, 0] * float(SPLIT * SPLIT) + 2.0 * p[:, 1] * float(SPLIT) + p[:, 2]) / (SCALE * SCALE)
