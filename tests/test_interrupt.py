"""Ctrl-C, SIGKILL and resume of the real benchmark command, in subprocesses: one line and exit 130 on SIGINT, the
``runs`` row never left ``running`` (the next attempt repairs a killed one), committed units skipped on rerun, no
Ray process left behind. A plugin module (on ``PYTHONPATH``, listed in ``plugins``) registers a slow scorer with a
parameter set through ``scorer_params``: the run is slow enough to interrupt, and the plugin must be known inside
the Ray actors. It also registers a checkpoint source that trains for ever, so a job can be interrupted or killed
while its model trains in a child process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from oodseg.models import create_model, save_safetensors
from oodseg.platform.results import ResultsStore

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY_LOG_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]")  # "[date time,ms I pid tid]"
DATASETS = ("road_anomaly_21", "road_obstacle_21", "fs_static", "fs_lost_found", "road_anomaly")
PLUGIN = '''
"""A user's scorer: max-logit times ``scale``, sleeping ``delay`` seconds per call; a model source that trains the
demo recipe (on small crops) for 10**6 steps."""
import time
from dataclasses import replace

from oodseg.models import register_checkpoint_source
from oodseg.scoring import register_scorer
from oodseg.training.cached import cached_fit, printer
from oodseg.training.demo import demo_config


@register_scorer("slow_maxlogit", space={})
def slow_maxlogit(z, temperature, delay=0.0, scale=1.0):
    time.sleep(delay)
    return -scale * z.amax(dim=1)


@register_checkpoint_source("endless-demo")
def endless_demo(cache_dir=None, data_root=None, seed=0, **_):
    cfg = replace(demo_config(data_root, seed, steps=10**6), crop=(64, 128), global_batch=2, log_every=5)
    return str(cached_fit("endless", cfg, data_root, cache_dir, 0, printer("endless")))
'''


def tagged(tag: str) -> list[psutil.Process]:
    """This machine's processes started by one of this file's jobs: they (and every process they start, Ray's
    included) inherit ``OODSEG_TEST_TAG``, so a Ray another test or user runs at the same time is never counted."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.environ().get("OODSEG_TEST_TAG") == tag:
                out.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


def ray_processes(tag: str, core_only: bool = False) -> set[int]:
    """Ray's processes of the job tagged ``tag`` (``core_only``: the raylet and GCS server, not their agents)."""
    out = set()
    for p in tagged(tag):
        cmd = " ".join(p.info["cmdline"] or [])
        if "raylet" in cmd or "gcs_server" in cmd or (not core_only and cmd.startswith("ray::")):
            out.add(p.pid)
    return out


def wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        if not left:
            return set()
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def setup(tmp_path_factory, suite_factory):
    work = tmp_path_factory.mktemp("interrupt")
    suite = suite_factory(seed=4, size=(64, 128), n_train=2, n_val=2, n_anomaly=4, n_coco=2)
    torch.manual_seed(0)
    model = save_safetensors(create_model("erfnet", channels=[4, 8, 16], input_size=None), work / "tiny.safetensors")
    plugins = work / "plugins"
    plugins.mkdir()
    (plugins / "slow_scorer.py").write_text(textwrap.dedent(PLUGIN))
    return suite, model, plugins, work


def start(setup, results: Path, run_id: str, tag: str, checkpoint: str = "") -> subprocess.Popen:
    """The benchmark job in a child process; it and its descendants carry ``OODSEG_TEST_TAG=tag``. The slow scorer
    sleeps 1 s per image (batches of 1, 4 images per set): the last unit commits ≥ 12 s after the first, so the
    signals land mid-run even on a loaded machine (at 0.4 s a loaded run once committed all five units first)."""
    suite, model, plugins, work = setup
    cmd = [sys.executable, str(ROOT / "jobs" / "benchmark.py"), "--data-root", str(suite), "--results", str(results),
           "--run-id", run_id, "--num-cpus", "2", "--batch-size", "1", "--plots", "false",
           "--datasets", ",".join(DATASETS), "--scorers", "maxlogit,slow_maxlogit", "--plugins", "slow_scorer",
           "--cache-dir", str(work / "cache"), "--set", f"models=[{{name: tiny, checkpoint: {checkpoint or model}}}]",
           "--set", "scorer_params={slow_maxlogit: {delay: 1.0, scale: 2.0}}"]
    env = {**os.environ, "PYTHONPATH": f"{plugins}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OODSEG_TEST_TAG": f"{tag}-{os.getpid()}"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(cmd, cwd=setup[3], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, lines: list[str], needle: str, timeout: float = 120.0) -> None:
    """Read stderr until a line contains ``needle``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if needle in line:
            return
    proc.kill()
    pytest.fail(f"no line with {needle!r}:\n" + "\n".join(lines))


def wait_for_commit(proc: subprocess.Popen, lines: list[str]) -> None:
    wait_for(proc, lines, ", committed (")  # a unit's summary line, not "resuming, 1 unit(s) already committed"


def trainers(tag: str) -> set[int]:
    """Child processes building a checkpoint source (``oodseg.training.background``) of the job tagged ``tag``."""
    return {p.pid for p in tagged(tag) if "oodseg.training.background" in (p.info["cmdline"] or [])}


def test_ctrl_c_then_kill_then_resume(setup, tmp_path):
    results, run_id = tmp_path / "results", "interrupted-run"
    t1, t2, t3 = (f"{tag}-{os.getpid()}" for tag in ("ctrl-c", "kill", "final"))

    # 1. Ctrl-C after the first committed unit: one line, exit 130, row "interrupted", no Ray process left
    proc, lines = start(setup, results, run_id, "ctrl-c"), []
    wait_for_commit(proc, lines)
    running = ray_processes(t1)  # the tag reaches Ray's processes: raylet, GCS and the workers
    assert ray_processes(t1, core_only=True) and len(running) > len(ray_processes(t1, core_only=True)), running
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    lines += err.splitlines()
    assert proc.returncode == 130, "\n".join(lines)
    assert "Traceback" not in err and lines[-1] == f"interrupted; rerun with --run-id {run_id} to resume", lines
    store = ResultsStore(str(results))
    assert list(store.read("runs").status) == ["interrupted"]
    first = store.completed_units(run_id)
    assert 1 <= len(first) < len(DATASETS)
    assert not wait_gone(ray_processes(t1)), "Ray processes left after Ctrl-C"

    # 2. SIGKILL during the resumed run: the row stays "running" until the next attempt repairs it
    proc, lines = start(setup, results, run_id, "kill"), []
    wait_for_commit(proc, lines)
    assert any("resuming" in line for line in lines), lines
    proc.kill()
    proc.communicate(timeout=30)
    assert sorted(store.read("runs").status) == ["interrupted", "running"]
    second = store.completed_units(run_id)
    assert first < second  # the committed units were skipped and one more was committed
    # a SIGKILLed driver cannot clean up: Ray's fate sharing takes the raylet and GCS down with it; their agents
    # (ray::DashboardAgent, ray::RuntimeEnvAgent) notice the raylet is gone and exit on their own a minute later
    assert not wait_gone(ray_processes(t2, core_only=True)), "raylet / GCS left after SIGKILL"

    # 3. The final attempt repairs the killed row and finishes the rest
    proc = start(setup, results, run_id, "final")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    ray_lines = [line for line in err.splitlines() if RAY_LOG_LINE.match(line)]
    assert not ray_lines, ray_lines  # Ray's own log lines stay in its log files
    assert sorted(store.read("runs").status) == ["finished", "interrupted", "interrupted"]
    assert store.completed_units(run_id) == {("tiny", d, "score") for d in DATASETS}
    per_image = store.read("per_image")
    assert not per_image.duplicated(["dataset", "image_id", "scorer"]).any()  # no unit was committed twice
    # the plugin scorer ran in the actors with its parameters: 2 · max-logit ranks pixels like max-logit
    m = store.read("metrics").set_index(["dataset", "scorer"])
    for d in DATASETS:
        assert m.loc[(d, "slow_maxlogit"), "auprc"] == pytest.approx(m.loc[(d, "maxlogit"), "auprc"], rel=1e-9)
    assert '"scale": 2.0' in m.loc[(DATASETS[0], "slow_maxlogit"), "extra_json"]
    assert not wait_gone(ray_processes(t3))


def test_ctrl_c_or_kill_while_the_model_trains_in_a_child_process(setup, tmp_path):
    t1, t2 = f"child-ctrl-c-{os.getpid()}", f"child-kill-{os.getpid()}"
    proc, lines = start(setup, tmp_path / "results", "child-run", "child-ctrl-c", checkpoint="endless-demo"), []
    wait_for(proc, lines, "tiny: Ray is up; waiting for the model's training")  # the child trains meanwhile
    assert len(trainers(t1)) == 1 and ray_processes(t1, core_only=True)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    lines += err.splitlines()
    assert proc.returncode == 130 and "Traceback" not in err, "\n".join(lines)
    assert lines[-1] == "interrupted; rerun with --run-id child-run to resume", lines
    assert not wait_gone(trainers(t1), 10) and not wait_gone(ray_processes(t1)), "processes left after Ctrl-C"

    proc, lines = start(setup, tmp_path / "results", "child-run", "child-kill", checkpoint="endless-demo"), []
    wait_for(proc, lines, "[endless] step 5 ")
    proc.kill()  # no clean-up in the driver: the child notices its parent is gone and exits
    proc.communicate(timeout=30)
    assert not wait_gone(trainers(t2), 10), "trainer left after SIGKILL"
    assert not wait_gone(ray_processes(t2, core_only=True))
