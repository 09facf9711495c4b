"""Order-preserving integer keys of float32 scores, and exact order statistics from them without a full sort.

* :func:`float32_keys` / :func:`keys_to_float32`: the radix-sort map float32 ↔ uint32 (``a < b ⇔ key(a) < key(b)``);
  :class:`~oodseg.scoring.metrics.PixelMetrics` bins its scores by the keys' top bits.
* :class:`KeyOrder`: what the SMIYC per-frame binning reads of a frame's sorted scores, a few hundred values at
  given ranks (``take``) and the counts below a few hundred edges (``count_below``), answered from a histogram of
  the keys over ≤ 2^20 buckets of about four keys each: only the buckets holding a requested rank or edge are
  gathered and sorted (1–2 % of a trained model's frame; all keys are sorted once where the queries crowd into a
  few buckets), the rest is counted; when the keys span no more buckets than that (scores with few distinct
  values, e.g. near-uniform softmax maps), every bucket is one key and nothing is gathered.
  Results equal those of the fully sorted array (``np.sort`` + indexing / ``np.searchsorted``), except that −0.0 is
  returned as +0.0 (they compare equal).
"""

from __future__ import annotations

import numpy as np
import torch

from oodseg.outputs import read_only_tensor

_SIGN = np.uint32(0x80000000)
#: KeyOrder: at most 2^20 buckets between the smallest and the largest key, about 2^2 keys per bucket (a finer
#: histogram costs more to count and to sum up than the smaller gathers save: benchmarks/README.md)
BUCKET_BITS = 20
VALUES_PER_BUCKET_BITS = 2


def _int32(x: np.ndarray) -> torch.Tensor:
    """A uint32 array whose values are below 2^31 as a flat int32 tensor (the same values, no copy if contiguous)."""
    return read_only_tensor(np.ascontiguousarray(x).view(np.int32).reshape(-1))


def float32_keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving map float32 → uint32: ``a < b ⇔ key(a) < key(b)`` for finite floats (−0.0 folded to +0.0).

    Positive floats get their sign bit set, negative floats have all bits flipped (the usual radix-sort trick). An
    array of one sign (no zero) takes one pass: the sign bit set, or every bit flipped.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size:
        lo, hi = (float(v) for v in torch.aminmax(read_only_tensor(x)))  # one pass; NaN fails both tests
        if lo > 0:
            return x.view(np.uint32) | _SIGN
        if hi < 0:
            return ~x.view(np.uint32)
    bits = (x + np.float32(0.0)).view(np.uint32)  # + 0.0 turns −0.0 into +0.0
    flip = (bits.view(np.int32) >> 31).view(np.uint32) | _SIGN  # all ones for negatives, sign bit for positives
    return bits ^ flip


def float32_keys_torch(x: torch.Tensor) -> torch.Tensor:
    """:func:`float32_keys` by torch ops on ``x``'s device, as int64 (torch has no unsigned 32-bit arithmetic)."""
    bits = (x + 0.0).contiguous().view(torch.int32)  # + 0.0 turns −0.0 into +0.0
    return (bits ^ ((bits >> 31) | torch.iinfo(torch.int32).min)).long() & 0xFFFFFFFF


def count_values(x: np.ndarray, minlength: int) -> np.ndarray:
    """``np.bincount(x, minlength=minlength)`` (int64) of a uint32 array whose values are below 2^31, by torch's
    kernel on its int32 view: numpy's first copies the whole array to int64 (~1.8× the time on 4M values)."""
    return torch.bincount(_int32(x), minlength=minlength).numpy()


def take_u32(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``table[idx]`` for a 1-D ``table`` (bool or 32-bit) and a uint32 ``idx`` below 2^31, by torch's
    ``index_select`` on the int32 views: numpy first copies the whole index array to int64 (~3x the time on 4M)."""
    view = table.view(np.int32) if table.dtype == np.uint32 else table
    out = torch.index_select(read_only_tensor(view), 0, _int32(idx))
    return out.numpy().view(table.dtype)


def keys_to_float32(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float32_keys`."""
    keys = np.asarray(keys, dtype=np.uint32)
    bits = np.where(keys & _SIGN, keys ^ _SIGN, ~keys).astype(np.uint32)
    return bits.view(np.float32)


def float32_bounds(edges: np.ndarray, last_inclusive: bool) -> np.ndarray:
    """uint32-key thresholds ``t`` (int64) such that, for every float32 ``v``, ``v < e ⇔ key(v) < t``; with
    ``last_inclusive`` the last one is for ``v ≤ e`` instead. ``e`` (float64) is first rounded up to the nearest float32
    (rounded down, plus one key, for the inclusive one), so the comparison stays exact."""
    e = np.asarray(edges, dtype=np.float64)
    with np.errstate(over="ignore"):
        e32 = e.astype(np.float32)
    up = np.where(e32.astype(np.float64) < e, np.nextafter(e32, np.float32(np.inf)), e32)
    t = float32_keys(up).astype(np.int64)
    if last_inclusive and e.size:
        down = e32[-1] if float(e32[-1]) <= e[-1] else np.nextafter(e32[-1], np.float32(-np.inf))
        t[-1] = int(float32_keys(np.array([down], np.float32))[0]) + 1
    return t


class KeyOrder:
    """Exact order statistics of float32 values given by their :func:`float32_keys`: values at sorted ranks
    (:meth:`take`) and counts below edges, from a histogram of the keys over ≤ 2^20 buckets, sorting only the
    buckets a query touches; equal to ``np.sort`` + indexing / ``np.searchsorted`` (−0.0 comes back as +0.0)."""

    def __init__(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.uint32).reshape(-1)
        self.shape = keys.shape
        self.n = int(keys.size)
        self._keys = keys
        if not self.n:
            return
        self.lo, self.hi = int(keys.min()), int(keys.max())
        buckets_bits = min(BUCKET_BITS, max(8, self.n.bit_length() - VALUES_PER_BUCKET_BITS))
        self.shift = max(0, (self.hi - self.lo).bit_length() - buckets_bits)
        self._bucket = (keys - np.uint32(self.lo)) >> np.uint32(self.shift)  # < 2^20
        hist = count_values(self._bucket, ((self.hi - self.lo) >> self.shift) + 1)
        self._below = np.zeros(hist.size + 1, np.int64)  # keys in buckets < b
        np.cumsum(hist, out=self._below[1:])
        self._sorted: np.ndarray | None = None

    def _gather(self, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The keys of ``buckets``, sorted, and where each bucket starts in them: one pass over the keys; or, when
        those buckets hold over a quarter of the keys (values crowded in a few buckets), all keys sorted once and
        kept for the next query."""
        if self._sorted is None:
            held = np.unique(buckets)
            if int((self._below[held + 1] - self._below[held]).sum()) > self.n >> 2:
                self._sorted = np.sort(self._keys)
        if self._sorted is not None:
            got = self._sorted
        else:
            need = np.zeros(self._below.size - 1, bool)
            need[buckets] = True
            got = np.sort(self._keys[take_u32(need, self._bucket)])
        return got, np.searchsorted(got, ((buckets.astype(np.int64) << self.shift) + self.lo).astype(np.uint32))

    def take(self, idx: np.ndarray) -> np.ndarray:
        """The values (float32) at ascending-sort positions ``idx`` (``np.sort(values)[idx]``)."""
        idx = np.asarray(idx, dtype=np.int64)
        buckets = np.searchsorted(self._below, idx, side="right") - 1
        if not self.shift:  # one key per bucket: the bucket is the value
            return keys_to_float32((buckets + self.lo).astype(np.uint32))
        got, start = self._gather(buckets)
        return keys_to_float32(got[start + idx - self._below[buckets]])

    def count_below(self, edges: np.ndarray) -> np.ndarray:
        """``#{v < e}`` for every edge but the last, ``#{v ≤ e}`` for the last: ``np.searchsorted`` on the sorted
        values (``side="left"``, the last ``"right"``), as int64."""
        t = float32_bounds(edges, last_inclusive=True)
        if not self.n:
            return np.zeros(t.size, np.int64)
        out = np.where(t <= self.lo, 0, self.n).astype(np.int64)
        inside = (t > self.lo) & (t <= self.hi)
        buckets = (t[inside] - self.lo) >> self.shift
        if not self.shift:  # one key per bucket: the keys below t are those of the buckets below
            out[inside] = self._below[buckets]
            return out
        got, start = self._gather(buckets)
        out[inside] = self._below[buckets] + np.searchsorted(got, t[inside].astype(np.uint32)) - start  # t ≤ hi
        return out
