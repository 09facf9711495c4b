"""A training job as a user runs it (a subprocess, its own Ray): Ctrl-C during fine-tuning prints how to resume and
exits 130, like the benchmark. (The README's training commands, their progress lines, exported models and the rerun
of a finished run are checked by ``tests/test_readme.py``, which runs them in-process.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oodseg.platform.results import ResultsStore

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def job(suite: Path, work: Path, script: str, name: str, *extra: str) -> list[str]:
    """The command line of a training job on ``suite``: one worker, a progress line per step."""
    return [sys.executable, str(ROOT / "jobs" / script), "--data-root", str(suite), "--results",
            str(work / "results"), "--storage-path", str(work / "runs"), "--num-cpus", "2", "--num-workers", "1",
            "--name", name, "--set", "train.global_batch=2", "--set", "train.log_every=1", *extra]


def read_until(proc: subprocess.Popen, needle: str, timeout: float) -> list[str]:
    """The stderr lines of ``proc`` up to the first that contains ``needle`` (AssertionError if none comes)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines
    raise AssertionError(f"no line with {needle!r}:\n" + "\n".join(lines))


def test_ctrl_c_during_finetuning_prints_how_to_resume_and_exits_130(tiny_suite, tmp_path):
    work = tmp_path
    cmd = job(tiny_suite, work, "finetune.py", "ftint", "--init", "scratch", "--strategy", "ddp", "--steps", "400",
              "--checkpoint-every", "1",
              "--set", "train.model_cfg={channels: [4, 8, 16], input_size: null}", "--set", "train.val_split=",
              "--set", "train.anomaly_set=null", "--set", "train.crop=[32,64]")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        lines = read_until(proc, "step 2/400", timeout=240)  # step 1's checkpoint is reported before step 2's row
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines += err.splitlines()
    assert proc.returncode == 130, "\n".join(lines)
    assert "Traceback" not in err
    assert lines[-1] == "interrupted; rerun the same command to resume ftint from its last checkpoint", lines
    runs = ResultsStore(str(work / "results")).read("runs")
    assert list(runs.query("run_id == 'ftint'").status) == ["interrupted"]
