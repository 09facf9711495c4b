"""``KeyOrder`` (exact order statistics from float32 keys, no full sort) against ``np.sort`` + indexing /
``np.searchsorted``, and the SMIYC frame binning it serves against the same binning on fully sorted scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodseg.scoring.metrics import SmiycPixelMetrics
from oodseg.scoring.metrics.order import KeyOrder, count_values, float32_bounds, float32_keys


def values(rng: np.random.Generator, kind: int, n: int) -> np.ndarray:
    """Spread, narrow, wide, heavily tied (with −0.0), fp16-rounded and few-valued float32 samples (the last: a
    key range of a few hundred keys, so every ``KeyOrder`` bucket is one key, as on near-uniform softmax maps)."""
    if kind == 5:
        return (np.float32(14.0) + rng.standard_normal(n).astype(np.float32) * np.float32(1e-4)).astype(np.float32)
    x = rng.standard_normal(n).astype(np.float32) * np.float32([1, 1e-3, 100, 1, 1][kind])
    if kind == 3:
        x = (np.round(x * 4) / 4).astype(np.float32)
        x[x == 0] = -0.0
    if kind == 4:
        x = (x * 20 - 15).astype(np.float16).astype(np.float32)
    return x


@pytest.mark.parametrize("kind", range(6))
def test_key_order_equals_the_sorted_array(kind):
    rng = np.random.default_rng(kind)
    for n in (1, 2, 17, 5000, 300_000):
        x = values(rng, kind, n)
        srt = np.sort(x)
        order = KeyOrder(float32_keys(x))
        assert kind != 5 or n < 5000 or order.shift == 0  # the few-valued samples take the one-key-per-bucket path
        idx = np.unique(np.r_[0, n - 1, rng.integers(0, n, 60)])
        assert np.array_equal(order.take(idx), srt[idx])
        picked = rng.choice(srt, 30).astype(np.float64)
        edges = np.unique(np.r_[picked, picked + 1e-9, np.nextafter(picked, -np.inf), srt[0] - 1, srt[-1], 1e300,
                                -1e300, 0.0])
        ref = np.r_[np.searchsorted(srt, edges[:-1], "left"), np.searchsorted(srt, edges[-1:], "right")]
        assert np.array_equal(order.count_below(edges), ref)


@pytest.mark.parametrize("kind", range(6))
@pytest.mark.parametrize("sign", [1, -1, 0])
def test_float32_keys_order_like_the_floats(kind, sign):
    """Keys sort like their floats (one-signed arrays take the one-pass path) and equal the radix-sort map written
    out bit by bit: sign bit set for ``v ≥ +0``, every bit flipped below; −0.0 keys as +0.0."""
    x = values(np.random.default_rng(kind), kind, 4000)
    x = np.abs(x) + np.float32(1e-30) if sign == 1 else -np.abs(x) - np.float32(1e-30) if sign == -1 else x
    keys = float32_keys(x)
    bits = (x + np.float32(0.0)).view(np.uint32)
    ref = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31)).astype(np.uint32)
    assert keys.dtype == np.uint32 and np.array_equal(keys, ref)
    assert np.array_equal(np.argsort(keys, kind="stable"), np.argsort(x + np.float32(0.0), kind="stable"))


def test_count_values_equals_numpy_bincount():
    rng = np.random.default_rng(0)
    for x, n in ((rng.integers(0, 5000, 100_000).astype(np.uint32), 6000), (np.array([], np.uint32), 7),
                 (np.array([2**20 + 3, 0, 0], np.uint32), 1), (rng.integers(0, 9, (40, 30)).astype(np.uint32), 0)):
        got = count_values(x, n)
        assert got.dtype == np.int64 and np.array_equal(got, np.bincount(x.reshape(-1), minlength=n))


def test_float32_bounds_compare_float64_edges_exactly():
    """``v < e`` ⇔ ``key(v) < t`` for float32 ``v`` next to float64 edges that are not float32 numbers."""
    v = np.float32([1.0, np.nextafter(np.float32(1.0), np.float32(2.0)), -0.0, 0.0, 3.4e38, -3.4e38])
    edges = np.array([1.0 + 1e-12, 1.0, 0.0, -1e-300, 1e39, -1e39])
    for e, t in zip(edges, float32_bounds(edges, last_inclusive=False)):
        assert np.array_equal(v.astype(np.float64) < e, float32_keys(v).astype(np.int64) < t)


@pytest.mark.parametrize("fp16", [False, True])
def test_smiyc_frames_from_key_order_equal_sorted_frames(fp16):
    """Host input (``KeyOrder`` for the ≥ 2^15 inlier pixels of a frame, a key sort for the anomaly pixels) and CPU
    torch input (what an accelerator runs: every frame in one batched sort, ``device_frames``) give the same
    per-frame bins, to the bit; frames without anomaly, without inlier or without any valid pixel included."""
    rng = np.random.default_rng(3)
    s = (rng.standard_normal((5, 192, 256)) * 3).astype(np.float32)
    s[1] = np.round(s[1])  # ties
    s[0, 10, :3] = [-0.0, 0.0, -1e-40]  # signed zeros and a denormal
    lab = (rng.random((5, 192, 256)) < 0.05).astype(np.uint8)
    lab[:, :4] = 255
    lab[2] = 0  # a frame without anomaly pixels
    lab[3] = np.where(lab[3] == 0, 1, lab[3])  # one without inlier pixels
    lab[4] = 255  # one without any valid pixel
    host = SmiycPixelMetrics(fp16=fp16).add_frames(s, lab)
    ref = SmiycPixelMetrics(fp16=fp16).add_frames(torch.from_numpy(s), torch.from_numpy(lab))
    a, b = host._state(), ref._state()
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
