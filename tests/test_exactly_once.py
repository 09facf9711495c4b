"""Every image counts exactly once whatever Ray re-runs: the reducer takes a call only if none of its images was
taken before, and the shards of calls it did not take are deleted before the component pass reads the cache.

The end-to-end test SIGKILLs a real scoring actor (a plugin on ``PYTHONPATH`` wraps ``ShardCache.write`` so that the
first actor process dies right after writing its N-th score shard, before its rows reach the driver: the window in
which a killed actor used to leave its shards behind). Ray restarts the actor and re-runs the call; every metric,
per-image row and failure row must equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from oodseg.platform.benchmark.config import ScorerKey
from oodseg.platform.benchmark.rows import Rows
from oodseg.platform.benchmark.units import Reducer, UnitInfo, UnitResult
from oodseg.platform.cache import ShardCache
from oodseg.scoring.metrics import PixelMetrics

ROOT = Path(__file__).resolve().parents[1]
INFO = UnitInfo("fs_static", "fs_static", "FS Static", "anomaly", "obstacle", 19)
KEYS = [ScorerKey("msp", "cl", 1.0)]


def call_table(ids: list[str], seed: int) -> tuple[pa.Table, PixelMetrics]:
    """One score call's rows for ``ids``: an image row each, then the merged pixel state (seeded random maps)."""
    rng = np.random.default_rng(seed)
    rows, pm = Rows(), PixelMetrics()
    for i in ids:
        label = (rng.random((8, 8)) < 0.2).astype(np.uint8)
        pm.update(rng.random((8, 8)).astype(np.float32), label)
        rows.image({"dataset": "fs_static", "id": i, "image_path": f"{i}.png"}, [{"scorer": "msp"}])
    rows.shard("fs_static", "scores", f"/x/shard-{seed}.npz")
    rows.state("fs_static", {(0, "pixel"): pm}, ids)
    return rows.table(), pm


def reduce(tables: list[pa.Table], expected: int) -> UnitResult:
    unit = UnitResult(INFO, list(KEYS), expected=expected)
    (out,) = list(Reducer({"fs_static": unit}).consume(tables))
    return out


def test_a_re_run_call_is_taken_once():
    a, pa_ = call_table(["a", "b"], 0)
    b, pb = call_table(["c"], 1)
    a_again, _ = call_table(["a", "b"], 0)  # the same images from a re-run task: a new call id
    unit = reduce([a, a_again, b], expected=3)
    reference = pa_.merge(pb).compute(warn=False)
    assert unit.metrics[(0, "pixel")].compute(warn=False) == reference
    assert unit.n_images == 3 and sorted(s["image_id"] for s in unit.summaries) == ["a", "b", "c"]
    assert unit.shards == {"scores": ["/x/shard-0.npz", "/x/shard-1.npz"]}


def test_a_call_split_over_batches_is_taken_when_its_state_arrives():
    a, _ = call_table(["a", "b"], 0)
    unit = reduce([a.slice(0, 1), a.slice(1)], expected=2)  # image row | image row + state row
    assert unit.n_images == 2 and unit.covered == 2


def test_a_partly_overlapping_call_fails_the_unit():
    a, _ = call_table(["a", "b"], 0)
    ab, _ = call_table(["b", "c"], 1)
    with pytest.raises(RuntimeError, match="1 image\\(s\\) taken before and 1 new"):
        reduce([a, ab], expected=3)


def test_keep_only_deletes_the_shards_no_taken_call_wrote(tmp_path):
    cache = ShardCache(str(tmp_path), "run", "m", "fs_static", "scores")
    record = {"label": np.zeros((2, 2), np.uint8), "scores": np.zeros((1, 2, 2), np.float16)}
    kept = [cache.write([record], ["a"]), cache.write([record], ["b"])]
    assert cache.write([record], ["a"]) == kept[0]  # a re-run of the same images replaces its shard
    cache.write([record, record], ["a", "b"])  # a dead call's shard
    (Path(cache.dir) / ".tmp-partial").write_bytes(b"x")
    cache.keep_only(kept)
    assert cache.shards() == sorted(kept)
    assert sorted(os.listdir(cache.dir)) == sorted(Path(p).name for p in kept)
    assert [i.id for i in cache.items()] == ["a", "b"]


def test_shards_are_zstd_compressed_and_plain_npz_shards_still_read(tmp_path):
    """A shard is a zstd frame holding the ``.npz`` (fewer bytes to shared storage); a shard an earlier version wrote,
    a plain ``.npz``, reads back the same."""
    cache = ShardCache(str(tmp_path), "run", "m", "fs_static", "scores")
    rng = np.random.default_rng(0)
    label = (rng.random((64, 96)) < 0.1).astype(np.uint8)
    scores = np.repeat(rng.normal(size=(2, 8, 96)), 8, axis=1).astype(np.float16)  # smooth maps compress
    path = cache.write([{"label": label, "scores": scores}], ["a"])
    raw = Path(path).read_bytes()
    assert raw[:4] == bytes.fromhex("28b52ffd") and len(raw) < scores.nbytes / 2
    np.savez(Path(cache.dir) / "shard-b-0.npz", **{"ids": np.array(["b"]), "0.label": label, "0.scores": -scores})
    items = {i.id: i for i in cache.items()}
    assert sorted(items) == ["a", "b"]
    for id_, sign in (("a", 1), ("b", -1)):
        np.testing.assert_array_equal(items[id_].label, label)
        np.testing.assert_array_equal(items[id_].scores, sign * scores)


KILLER = '''
"""Test plugin: the first process to write its ``OODSEG_TEST_KILL_AT``-th score shard SIGKILLs itself."""
import os
import signal

from oodseg.platform import cache

_write, _count = cache.ShardCache.write, [0]


def write(self, *args):
    path = _write(self, *args)
    if self.kind == "scores":
        _count[0] += 1
        if _count[0] == int(os.environ["OODSEG_TEST_KILL_AT"]):
            try:  # only the first process to get here dies
                os.close(os.open(os.environ["OODSEG_TEST_KILL_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return path
            os.kill(os.getpid(), signal.SIGKILL)
    return path


cache.ShardCache.write = write
'''
COMPARED = {"metrics": ["dataset", "scorer", "temperature"], "per_image": ["dataset", "image_id", "scorer", "temperature"]}


@pytest.mark.slow
def test_a_killed_scoring_actor_changes_no_metric(tmp_path, suite_factory):
    from oodseg.models import create_model, save_safetensors
    from oodseg.platform.results import ResultsStore

    suite = suite_factory(seed=5, size=(64, 128), n_train=2, n_val=2, n_anomaly=6, n_coco=2)
    torch.manual_seed(0)
    model = save_safetensors(create_model("erfnet", channels=[4, 8, 16], input_size=None), tmp_path / "m.safetensors")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "kill_after_write.py").write_text(textwrap.dedent(KILLER))
    results = tmp_path / "results"

    def run(run_id: str, kill_at: int) -> None:
        cmd = [sys.executable, str(ROOT / "jobs" / "benchmark.py"), "--data-root", str(suite), "--results",
               str(results), "--run-id", run_id, "--num-cpus", "2", "--batch-size", "2", "--plots", "false",
               "--datasets", "fs_static,fs_lost_found", "--scorers", "msp,energy", "--temperatures", "1,2",
               "--plugins", "kill_after_write", "--cache-dir", str(tmp_path / "cache"),
               "--set", f"models=[{{name: tiny, checkpoint: {model}}}]"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]),
               "OODSEG_TEST_KILL_AT": str(kill_at), "OODSEG_TEST_KILL_MARKER": str(tmp_path / f"{run_id}.killed")}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("clean", kill_at=10**6)
    run("killed", kill_at=3)  # the 3rd of 6 score shards: after two calls' rows arrived, mid-run
    assert (tmp_path / "killed.killed").exists() and not (tmp_path / "clean.killed").exists()

    store = ResultsStore(str(results))
    for table, keys in COMPARED.items():
        df = store.read(table)
        df = df.drop(columns=[c for c in ("committed_at", "wall_s") if c in df])
        clean = df[df.run_id == "clean"].drop(columns="run_id").sort_values(keys).reset_index(drop=True)
        killed = df[df.run_id == "killed"].drop(columns="run_id").sort_values(keys).reset_index(drop=True)
        assert len(clean) and not killed.duplicated(keys).any()
        pd_equal(clean, killed)
    m = store.read("metrics")
    n_gt = {json.loads(x)["components.n_gt"] for x in m[m.dataset == "fs_static"].extra_json}
    assert len(n_gt) == 1  # the same ground-truth components for every scorer key, counted once
    assert store.read("failures").empty
    runs = store.read("runs")
    assert sorted(runs.status) == ["finished", "finished"]


def pd_equal(a, b) -> None:
    import pandas.testing as pdt

    pdt.assert_frame_equal(a, b, check_exact=True)
