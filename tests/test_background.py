"""Cached demo models: pinned training threads, ``cached_only``, and the child-process build the benchmark overlaps
with starting Ray (``oodseg.training.background``, ``Plan.pending`` / ``Plan.finish``)."""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

PLUGIN = "oodseg_test_sources"


@pytest.fixture()
def plugin(tmp_path, monkeypatch) -> Iterator[str]:
    """A plugin module registering four checkpoint sources, importable here and in child processes."""
    (tmp_path / f"{PLUGIN}.py").write_text(textwrap.dedent('''
        import os
        import time
        from oodseg.models import register_checkpoint_source
        from oodseg.training.demo import get_demo_checkpoint

        @register_checkpoint_source("test-tiny-demo")
        def tiny(cache_dir=None, data_root=None, seed=0, **_):
            return str(get_demo_checkpoint(data_root, cache_dir, seed=seed, steps=2, progress=None))

        @register_checkpoint_source("test-broken")
        def broken(**_):
            raise ValueError("no such weights")

        @register_checkpoint_source("test-slow")
        def slow(**_):
            time.sleep(120)
            return "never"

        @register_checkpoint_source("test-env")  # the child's OpenMP settings, as its "path"
        def env(**_):
            return f"{os.environ.get('OMP_WAIT_POLICY')}/{os.environ.get('GOMP_SPINCOUNT')}"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sys.modules.pop(PLUGIN, None)
    yield PLUGIN
    from oodseg.models.factory import CHECKPOINT_SOURCES

    for name in ("test-tiny-demo", "test-broken", "test-slow", "test-env"):  # registered if imported here
        if name in CHECKPOINT_SOURCES:
            CHECKPOINT_SOURCES.unregister(name)


def test_cached_only_refuses_to_train_and_training_pins_the_thread_count(train_suite, tmp_path):
    from oodseg.training.cached import TRAIN_THREADS, NotCached, cached_only
    from oodseg.training.demo import get_demo_checkpoint

    cache = tmp_path / "cache"
    with cached_only(), pytest.raises(NotCached, match=r"demo-erfnet-\w+\.safetensors"):
        get_demo_checkpoint(train_suite, cache, seed=0, steps=2, progress=None)
    assert not list(cache.glob("*.safetensors"))
    threads: list[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = get_demo_checkpoint(train_suite, cache, seed=0, steps=2,
                                   progress=lambda row: "elapsed_s" in row and threads.append(torch.get_num_threads()))
        assert threads and set(threads) == {TRAIN_THREADS}  # not the caller's 1 thread
        assert torch.get_num_threads() == 1  # restored afterwards
    finally:
        torch.set_num_threads(before)
    with cached_only():
        assert get_demo_checkpoint(train_suite, cache, seed=0, steps=2, progress=None) == path


@pytest.mark.slow
def test_a_child_process_builds_the_same_file_the_driver_would(train_suite, tmp_path, plugin):
    from safetensors.torch import load_file

    from oodseg.training.background import BackgroundBuild
    from oodseg.training.demo import get_demo_checkpoint

    built = Path(BackgroundBuild("test-tiny-demo", cache_dir=tmp_path / "a", data_root=train_suite, seed=0,
                                 plugins=[plugin]).wait())
    stamp = built.stat().st_mtime_ns
    assert get_demo_checkpoint(train_suite, tmp_path / "a", seed=0, steps=2, progress=None) == built
    assert built.stat().st_mtime_ns == stamp  # the driver finds the child's file: not trained twice
    here = load_file(get_demo_checkpoint(train_suite, tmp_path / "b", seed=0, steps=2, progress=None))
    there = load_file(built)
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)


@pytest.mark.slow
def test_a_failed_build_is_one_line_and_cancel_stops_the_child(tmp_path, plugin, capfd):
    from oodseg.models import CheckpointError
    from oodseg.training.background import BackgroundBuild

    context = {"cache_dir": tmp_path, "data_root": tmp_path, "seed": 0, "plugins": [plugin]}
    with pytest.raises(CheckpointError, match=r"test-broken: building it in a child process failed \(exit code 1"):
        BackgroundBuild("test-broken", **context).wait()
    err = capfd.readouterr().err
    assert "error: ValueError: no such weights" in err and "Traceback" not in err
    slow = BackgroundBuild("test-slow", **context)
    t0 = time.monotonic()
    slow.cancel()
    assert slow.proc.returncode is not None and time.monotonic() - t0 < 30


@pytest.mark.slow
def test_prepare_leaves_an_unbuilt_model_pending_and_finish_checks_it(train_suite, tmp_path, plugin):
    from oodseg.config import build_config
    from oodseg.platform.benchmark import BenchmarkConfig
    from oodseg.platform.benchmark.prepare import prepare
    from oodseg.training.background import BackgroundBuild

    cfg = build_config(BenchmarkConfig, overrides=[
        f"data_root={train_suite}", f"cache_dir={tmp_path / 'cache'}", f"results={tmp_path / 'results'}",
        f"plugins=[{plugin}]", "datasets=road_anomaly_21", "models=[{name: m, checkpoint: test-tiny-demo}]"])
    plan = prepare(cfg)
    assert isinstance(plan.pending["m"], BackgroundBuild) and "m" not in plan.checkpoints
    plan.finish()
    assert not plan.pending and Path(plan.checkpoints["m"]).is_file() and plan.keys["m"]  # its scorer keys, once built
    again = prepare(cfg)  # built now: resolved in the driver, nothing pending
    assert not again.pending and again.checkpoints == plan.checkpoints


def test_the_child_spins_at_openmp_barriers_unless_the_user_chose_a_policy(tmp_path, plugin, monkeypatch):
    from oodseg.process import JOB_WAIT_POLICY, apply_job_settings
    from oodseg.training.background import GOMP_SPINCOUNT, BackgroundBuild

    context = {"cache_dir": tmp_path, "data_root": tmp_path, "seed": 0, "plugins": [plugin]}
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv(JOB_WAIT_POLICY, raising=False)
    apply_job_settings()  # a job's entry point: PASSIVE is the job's choice
    build = BackgroundBuild("test-env", start=False, **context)
    assert build.proc is None
    assert build.wait() == f"PASSIVE/{GOMP_SPINCOUNT}"  # started by wait(); libgomp's default spinning
    monkeypatch.delenv(JOB_WAIT_POLICY)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user's own
    apply_job_settings()
    assert BackgroundBuild("test-env", **context).wait() == "PASSIVE/None"  # the user's own PASSIVE is kept


def test_prepare_starts_one_build_at_a_time(train_suite, tmp_path, plugin):
    from oodseg.config import build_config
    from oodseg.platform.benchmark import BenchmarkConfig
    from oodseg.platform.benchmark.prepare import prepare

    cfg = build_config(BenchmarkConfig, overrides=[
        f"data_root={train_suite}", f"cache_dir={tmp_path / 'cache'}", f"results={tmp_path / 'results'}",
        f"plugins=[{plugin}]", "datasets=road_anomaly_21",
        "models=[{name: a, checkpoint: test-tiny-demo}, {name: b, checkpoint: test-tiny-demo}]"])
    plan = prepare(cfg)
    try:  # two trainers on the same cores only slow each other down: b starts when Plan.finish has waited for a
        assert plan.pending["a"].proc is not None and plan.pending["b"].proc is None
    finally:
        first = plan.pending["a"]
        plan.cancel()
    assert first.proc.returncode is not None and not plan.pending
