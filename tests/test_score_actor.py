"""The score actor's metric updates: keys with bit-identical maps are binned once, and each key's state is the one an
update of its own map gives; its per-image summaries and fp16 score shards, on the host and by the accelerator path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from oodseg.platform.benchmark import score as score_stage
from oodseg.platform.benchmark.config import ScorerKey
from oodseg.platform.benchmark.score import (
    F16_MAX,
    ScoreActor,
    fp16_maps,
    identical_groups,
    image_summaries,
    summary_sums,
    summary_sums_torch,
)
from oodseg.scoring.metrics import PixelMetrics


def maps(seed: int = 0) -> tuple[list[torch.Tensor], np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(3, 48, 64, generator=g), torch.randn(3, 48, 64, generator=g)
    near = a.clone()
    near[1, 20, 33] = torch.nextafter(near[1, 20, 33], torch.tensor(1e9))  # one ulp off, off the sampled grid
    labels = (torch.rand(3, 48, 64, generator=g) < 0.1).to(torch.uint8).numpy()
    labels[:, :2] = 255
    return [a, b, a.clone(), near, -(-b)], labels


def test_identical_groups_compare_every_value():
    scores, _ = maps()
    assert identical_groups(scores) == [[0, 2], [1, 4], [3]]
    assert identical_groups([scores[0], scores[0][:1]]) == [[0], [1]]  # another shape is another map
    assert identical_groups([]) == []


def test_identical_maps_are_binned_once_and_every_key_gets_its_own_state():
    scores, labels = maps(1)
    actor = object.__new__(ScoreActor)
    actor.cfg = SimpleNamespace(smiyc=True)
    states: dict = {}
    for _ in range(2):  # a second chunk adds to the same states
        actor._update_pixel(scores, torch.from_numpy(labels), states, identical_groups(scores))
    assert sorted(states) == [(i, "pixel") for i in range(len(scores))]
    assert len({id(m) for m in states.values()}) == len(scores)
    for i, s in enumerate(scores):
        ref = PixelMetrics().update(s, labels).update(s, labels).state_dict()["state"]
        got = states[(i, "pixel")].state_dict()["state"]
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"key {i}: {k}")



def test_image_summaries_match_numpy_on_the_host_and_by_the_accelerator_path(monkeypatch):
    """Means over each image's inlier / anomaly pixels (255 ignored), as numpy's float64 mean; an image without anomaly
    pixels has none. The torch path (what an accelerator actor runs; device-agnostic ops) gives the same numbers.
    Keys whose maps are identical share one map's sums and keep a row each."""
    scores, labels = maps(2)
    labels[1][labels[1] == 1] = 0
    keys = [ScorerKey(f"s{i}", "cl", 1.0) for i in range(len(scores))]
    lab = torch.from_numpy(labels)
    rows = image_summaries(scores, lab, keys)
    for j in range(labels.shape[0]):
        for key, s, row in zip(keys, scores, rows[j]):
            s64 = s[j].numpy().astype(np.float64)
            assert row["scorer"] == key.method and row["n_valid"] == int((labels[j] != 255).sum())
            assert row["n_anomaly"] == int((labels[j] == 1).sum())
            assert row["score_mean_inlier"] == s64[labels[j] == 0].mean()
            assert row["score_max"] == float(s[j].max())
            if j == 1:
                assert row["score_mean_anomaly"] is None
            else:
                assert row["score_mean_anomaly"] == s64[labels[j] == 1].mean()
    summed: list[int] = []
    monkeypatch.setattr(score_stage, "summary_sums",
                        lambda maps_, *a: summed.append(len(maps_)) or summary_sums(maps_, *a))
    assert image_summaries(scores, lab, keys, identical_groups(scores)) == rows and summed == [3]  # 5 keys, 3 maps
    host = summary_sums(scores, labels == 0, labels == 1)
    dev = summary_sums_torch(scores, lab == 0, lab == 1)
    np.testing.assert_allclose(np.array(dev, dtype=np.float64), np.array(host, dtype=np.float64), rtol=1e-12)


def test_fp16_maps_clip_to_the_fp16_range_and_round_as_numpy():
    g = torch.Generator().manual_seed(3)
    maps_ = [torch.randn(40, 56, generator=g) * 10.0 ** e for e in (0, 3, 6)]
    got = fp16_maps(maps_)
    ref = np.clip(np.stack([m.numpy() for m in maps_]), -F16_MAX, F16_MAX).astype(np.float16)
    assert got.dtype == np.float16 and np.isfinite(got).all()
    np.testing.assert_array_equal(got.view(np.uint16), ref.view(np.uint16))



def test_a_scorer_that_runs_the_network_holds_the_actors_one_network_pass(tiny_suite, tiny_erfnet, tmp_path,
                                                                          monkeypatch):
    """With concurrent calls one network pass runs at a time: ODIN's input-gradient passes take the lock the forward
    takes; scorers of the forward's outputs alone score without it (so they overlap the next call's forward)."""
    import pyarrow as pa

    from oodseg.platform.benchmark import BenchmarkConfig, ModelSpec
    from oodseg.platform.benchmark import score as stage
    from oodseg.platform.benchmark.prepare import prepare
    from oodseg.platform.benchmark.read import image_items, read_batch
    from oodseg.platform.benchmark.stage import ModelRun

    held: list[bool] = []
    real = stage.score_many

    def score_many(*args, **kw):
        held.append(actor.network_lock.locked())
        return real(*args, **kw)

    monkeypatch.setattr(stage, "score_many", score_many)
    for scorers in (("msp", "odin"), ("msp",)):
        cfg = BenchmarkConfig(results=str(tmp_path / "-".join(scorers)), data_root=str(tiny_suite),
                              models=(ModelSpec("tiny", checkpoint=str(tiny_erfnet)),), datasets=("road_anomaly_21",),
                              scorers=scorers, batch_size=2, cache_outputs=False, heatmaps=0, plots=False,
                              progress=False, component_metrics=False, torch_threads=1)
        plan = prepare(cfg)
        spec = cfg.models[0]
        run = ModelRun(cfg, plan.store, "lock", spec, plan.checkpoints[spec.name], plan.keys[spec.name],
                       plan.datasets, plan.infos)
        actor = ScoreActor(run.actor_context(stage.ScoreStage(run).keys()))
        out = actor(read_batch(pa.Table.from_pylist(image_items(plan.datasets)[:2]), plan.datasets, cfg.protocol))
        assert out.column("row").to_pylist() == ["image", "image", "state"]  # scored, no failure rows
        assert not actor.network_lock.locked()
    assert held == [True, False]
