"""The score actor's metric updates (keys with bit-identical maps are binned once, and each key's state is the one an
update of its own map gives), and how a stage's rows reach the driver."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import torch

from oodseg.platform.benchmark.score import ScoreActor, identical_groups
from oodseg.platform.benchmark.stage import row_batches
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


def test_stage_rows_reach_the_driver_as_each_call_returns(ray_session, tmp_path):
    """``row_batches`` hands the driver each call's table when the call returns, not when the next one does (Ray
    Data's prefetch window would hold it): a unit is committed as soon as its last call is done."""
    import ray

    class WaitForDriver:  # defined here so that Ray pickles it by value
        """Call ``k`` waits until the driver has received call ``k − 1``'s table; says if it gave up. A held table
        arrives only when the next call ends, so then every wait runs to its deadline, whatever its length; the
        deadline is long (120 s) because in one CI run under full load a table took over 30 s to arrive."""

        def __init__(self, marks: str) -> None:
            self.marks = Path(marks)

        def __call__(self, batch: pa.Table) -> pa.Table:
            k = int(batch.column("k")[0].as_py())
            deadline = time.monotonic() + 120
            while k and not (self.marks / str(k - 1)).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return pa.table({"k": [k], "late": [bool(k) and not (self.marks / str(k - 1)).exists()]})

    ds = ray.data.from_items([{"k": k} for k in range(4)], override_num_blocks=4)
    ds = ds.map_batches(WaitForDriver, fn_constructor_args=(str(tmp_path),), batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    got = []
    for table in row_batches(ds):
        for k, late in zip(table.column("k").to_pylist(), table.column("late").to_pylist()):
            got.append((k, late))
            (tmp_path / str(k)).touch()
    assert sorted(got) == [(0, False), (1, False), (2, False), (3, False)]
