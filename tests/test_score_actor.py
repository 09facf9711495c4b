"""The score actor's metric updates: keys with bit-identical maps are binned once, and each key's state is the one an
update of its own map gives."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from oodseg.platform.benchmark.score import ScoreActor, identical_groups
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
        actor._update_pixel(scores, labels, states)
    assert sorted(states) == [(i, "pixel") for i in range(len(scores))]
    assert len({id(m) for m in states.values()}) == len(scores)
    for i, s in enumerate(scores):
        ref = PixelMetrics().update(s, labels).update(s, labels).state_dict()["state"]
        got = states[(i, "pixel")].state_dict()["state"]
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"key {i}: {k}")

