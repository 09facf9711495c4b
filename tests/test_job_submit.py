"""A real Ray cluster (``ray start --head`` on loopback, token authentication ON) + ``ray job submit`` of the
benchmark job. Runs on its own ports and temp dir, so it never touches the session Ray of the other tests.

Token auth: ``RAY_AUTH_MODE=token`` on the cluster and on the client, with the token read from
``RAY_AUTH_TOKEN_PATH`` (Ray's token precedence: ``RAY_AUTH_TOKEN`` > ``RAY_AUTH_TOKEN_PATH`` > ``~/.ray/auth_token``).
Teardown stops exactly the cluster this test started: ``ray start --block`` runs in its own process group, and
SIGTERM to it shuts down every process it spawned (a bare ``ray stop`` would kill every Ray on the machine,
including the session cluster).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from oodseg.platform.results import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_under(temp_dir: str) -> list[int]:
    """Processes whose command line mentions our cluster's temp dir (i.e. belong to it)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if temp_dir in (p / "cmdline").read_bytes().decode(errors="ignore"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


@pytest.fixture()
def token_cluster():
    temp_dir = tempfile.mkdtemp(prefix="oodseg-rayjob-", dir="/tmp")  # short: Ray's socket paths have a limit
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    dash = free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        "--include-dashboard=true",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (Path(temp_dir) / "ray-start.log").read_text()
            ok = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                capture_output=True, text=True, timeout=60)
            if ok.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("Ray dashboard did not come up:\n" + (Path(temp_dir) / "ray-start.log").read_text())
        yield address, env, token_file
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        deadline = time.time() + 10
        while pids_under(temp_dir) and time.time() < deadline:
            time.sleep(1)
        for pid in pids_under(temp_dir):  # stragglers of *this* cluster only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_with_token_auth(token_cluster, tmp_path, suite_factory):
    from oodseg.models import create_model, save_safetensors

    address, env, token_file = token_cluster
    # without the token the cluster refuses the client: auth is really on
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH",)}
    no_token["RAY_AUTH_TOKEN"] = "0" * 64
    denied = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=no_token,
                            capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0

    suite = suite_factory(seed=1, size=(64, 128), n_train=2, n_val=2, n_anomaly=2, n_coco=2)
    torch.manual_seed(0)
    model = save_safetensors(create_model("erfnet", channels=[4, 8, 16], input_size=None), tmp_path / "m.safetensors")
    results = tmp_path / "results"
    job = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
        "python", "jobs/benchmark.py", "--results", str(results), "--data-root", str(suite), "--run-id", "submitted",
        "--set", f"models=[{{name: tiny, checkpoint: {model}}}]", "--datasets", "fs_static,cityscapes",
        "--scorers", "msp,energy", "--batch-size", "2", "--heatmaps", "0", "--progress", "false",
    ]
    deadline = time.time() + 60
    while True:  # the head answers `ray job list` before its job agent registers; Ray then refuses the submission
        out = subprocess.run(job, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
        if "No available agent to submit job" not in out.stdout + out.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    assert "Cityscapes mIoU" in out.stdout  # the job printed the standard table
    store = ResultsStore(str(results))
    assert store.completed_units("submitted") == {("tiny", "fs_static", "score"), ("tiny", "cityscapes", "score")}
    runs = store.read("runs")
    assert runs.status.tolist() == ["finished"]
    metrics = store.read("metrics")
    assert sorted(metrics[metrics.dataset == "fs_static"].scorer) == ["energy", "msp"]
    assert (metrics.n_images == 2).all()
