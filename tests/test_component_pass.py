"""The benchmark's component pass (``oodseg.platform.benchmark.components.ComponentPass``): the driver path (small
units) and the actor path (large ones) give the same metrics, equal to ComponentMetrics / S2MMetrics computed
directly on the fp16 maps."""

from __future__ import annotations

import numpy as np
import pytest

from oodseg.platform.benchmark.components import ComponentPass
from oodseg.platform.benchmark.config import ScorerKey
from oodseg.platform.benchmark.units import UnitInfo, UnitResult
from oodseg.platform.cache import ShardCache
from oodseg.scoring.metrics import ComponentMetrics, PixelMetrics, S2MMetrics

KEYS = [ScorerKey("msp", "cl", 1.0), ScorerKey("energy", "cl", 1.0)]


def frames(n: int = 6, hw: tuple[int, int] = (32, 48)) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(id, label, scores [2,H,W] fp16)``: two obstacles per frame (64 and 60 px), noisy scores, an ignore band."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        label = np.zeros(hw, np.uint8)
        label[4:12, 5:13] = 1
        label[20:26, 30:40] = 1
        label[-2:] = 255
        scores = 0.6 * rng.random((2, *hw), np.float32) + (label == 1) * np.float32([[[0.5]], [[0.25]]])
        out.append((f"img{i}", label, scores.astype(np.float16)))
    return out


def cached_unit(root: str) -> tuple[UnitResult, ShardCache, list]:
    data = frames()
    cache = ShardCache(root, "run", "m", "fs_static", "scores")
    for start in (0, 2, 4):  # three shards of two images, like three score-actor calls
        chunk = data[start:start + 2]
        cache.write([{"label": lab, "scores": s, "keys": np.arange(2)} for _, lab, s in chunk],
                    [i for i, _, _ in chunk])
    unit = UnitResult(UnitInfo("fs_static", "fs_static", "FS Static", "anomaly", "obstacle", 19), list(KEYS),
                      expected=len(data))
    for k in range(2):
        pm = PixelMetrics()
        for _, lab, s in data:
            pm.update(s[k].astype(np.float32), lab)
        unit.metrics[(k, "pixel")] = pm
    return unit, cache, data


@pytest.mark.parametrize("local_bytes", [1 << 30, 0], ids=["driver", "actors"])
def test_component_pass_matches_direct_metrics(ray_session, tmp_path, local_bytes):
    unit, cache, data = cached_unit(str(tmp_path))
    ComponentPass(ray_session, n_actors=2, local_bytes=local_bytes).run(unit, cache)
    for k in range(2):
        pixel = unit.metrics[(k, "pixel")]
        exact = ComponentMetrics.at_threshold(pixel, "obstacle")
        smiyc = ComponentMetrics.at_threshold(pixel, "obstacle", rule="smiyc")
        s2m = S2MMetrics()
        for _, lab, s in data:
            exact.update(s[k], lab)
            smiyc.update(s[k], lab)
            s2m.update((s[k] > np.float32(exact.threshold)).astype(np.float32), lab)
        for slot, want in (("components", exact), ("components_smiyc", smiyc), ("s2m", s2m)):
            got, ref = unit.metrics[(k, slot)].compute(), want.compute()
            assert got.keys() == ref.keys()
            for name in ref:  # equal up to the summation order of per-shard merges; NaN == NaN
                np.testing.assert_allclose(np.asarray(got[name], float), np.asarray(ref[name], float), rtol=1e-12,
                                           err_msg=f"{slot}.{name}")
    # not degenerate: the well-separated key finds most obstacles, the weak one none at its threshold
    assert unit.metrics[(0, "components")].compute()["mean_f1"] == pytest.approx(0.8)
    assert unit.metrics[(1, "components")].compute()["n_pred"] == 0


def test_a_key_with_the_same_maps_as_another_is_computed_once(ray_session, tmp_path, monkeypatch):
    """``eim`` and ``maxlogit`` of a plain head are one map twice: with a third key whose maps are the first key's,
    the pass computes each image's map once and gives the third key the first key's metrics; every key's metrics
    equal those of the two-key pass (:func:`cached_unit`)."""
    from oodseg.platform.benchmark import components

    reference, cache2, data = cached_unit(str(tmp_path / "two"))
    ComponentPass(ray_session, local_bytes=1 << 30).run(reference, cache2)
    cache = ShardCache(str(tmp_path / "three"), "run", "m", "fs_static", "scores")
    for start in (0, 2, 4):  # the shards of cached_unit, so per-shard sums merge in the same order
        chunk = data[start:start + 2]
        cache.write([{"label": lab, "scores": np.concatenate([s, s[:1]]), "keys": np.arange(3)} for _, lab, s in chunk],
                    [i for i, _, _ in chunk])
    unit = UnitResult(reference.info, [*KEYS, ScorerKey("maxlogit", "cl", 1.0)], expected=len(data))
    for k, row in enumerate((0, 1, 0)):
        unit.metrics[(k, "pixel")] = reference.metrics[(row, "pixel")]
    real, calls = components.shard_metrics, []
    monkeypatch.setattr(components, "shard_metrics", lambda *a: calls.append(1) or real(*a))
    ComponentPass(ray_session, local_bytes=1 << 30).run(unit, cache)
    assert len(calls) == 2 * len(data)
    for k, row in enumerate((0, 1, 0)):
        for slot in ("components", "components_smiyc", "s2m"):
            np.testing.assert_equal(unit.metrics[(k, slot)].state_dict(), reference.metrics[(row, slot)].state_dict())
    assert unit.metrics[(2, "components")].compute()["mean_f1"] == pytest.approx(0.8)
