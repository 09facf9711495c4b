"""The README's training commands as a user runs them (subprocesses, shortened to a few steps on a tiny suite):
``jobs/train_detector.py`` and ``jobs/train_saom.py`` train in Ray Train workers (which import nothing but the
trainer: the tasks register themselves on first use) and export a model the benchmark takes; every run prints its
progress lines; a rerun of a finished run says so without starting Ray; Ctrl-C during fine-tuning prints how to
resume and exits 130, like the benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from oodseg.models import create_model, save_safetensors
from oodseg.platform.results import ResultsStore

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY_SAM = "{image_size: 64, hidden: 16, layers: 1, heads: 2}"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny synthetic suite (with its COCO-format outliers) and a tiny ERFNet to score its frames."""
    from oodseg.data.synthetic import build_suite

    work = tmp_path_factory.mktemp("train_jobs")
    build_suite(work / "suite", seed=0, size=(64, 128), n_train=4, n_val=2, n_anomaly=2, n_coco=2)
    torch.manual_seed(0)
    save_safetensors(create_model("erfnet", channels=[4, 8, 16], input_size=None), work / "tiny.safetensors")
    return work


def job(work: Path, script: str, name: str, *extra: str) -> list[str]:
    """The command line of a training job on the tiny suite: one worker, 2 steps, a progress line per step."""
    return [sys.executable, str(ROOT / "jobs" / script), "--data-root", str(work / "suite"), "--results",
            str(work / "results"), "--storage-path", str(work / "runs"), "--num-cpus", "2", "--num-workers", "1",
            "--name", name, "--steps", "2", "--set", "train.global_batch=2", "--set", "train.log_every=1", *extra]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=timeout, cwd=ROOT)


def check_trained(out: subprocess.CompletedProcess, name: str, work: Path) -> Path:
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 1/2  loss" in out.stderr and "step 2/2  loss" in out.stderr, out.stderr  # progress lines
    model = work / "runs" / f"{name}.safetensors"
    assert f"model: {model}" in out.stdout and model.is_file()
    assert list(ResultsStore(str(work / "results")).read("runs").query(f"run_id == '{name}'").status) == ["finished"]
    return model


def test_train_detector_job_trains_exports_and_a_rerun_is_already_finished(work):
    from oodseg.models.detector import load_detector

    cmd = job(work, "train_detector.py", "det", "--set", f"train.coco_root={work / 'suite' / 'coco'}",
              "--set", "train.crop=[64,128]", "--set", "train.val_images=2", "--set",
              f"train.task_cfg={{scorer: msp, scoring_model: {work / 'tiny.safetensors'}, calibration_images: 2, "
              "detector: {backbone: tiny, min_size: 64, max_size: 128}}")
    model = check_trained(run(cmd), "det", work)
    assert load_detector(model).cfg.scale > 0  # the calibration fixed before training
    model.unlink()
    t0 = time.monotonic()
    again = run(cmd)
    assert again.returncode == 0 and time.monotonic() - t0 < 30, again.stderr
    assert "det: already finished at step 2/2" in again.stdout and model.is_file()  # exported again
    assert "Ray" not in again.stderr and len(ResultsStore(str(work / "results")).read("runs")) == 1


def test_train_saom_job_trains_and_exports_a_sam(work):
    """Two DDP workers, as the README command: the grid objective leaves SAM's box prompt embeddings unused."""
    from oodseg.models.sam import create_sam

    cmd = job(work, "train_saom.py", "saom", "--num-workers", "2", "--set", "train.val_images=1", "--set",
              f"train.task_cfg={{sam: tiny, sam_cfg: {TINY_SAM}, prompts: grid, grid: [4, 4], num_classes: 19}}")
    model = check_trained(run(cmd), "saom", work)
    assert create_sam(str(model)).hidden_size == 16


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


def test_ctrl_c_during_finetuning_prints_how_to_resume_and_exits_130(work):
    cmd = job(work, "finetune.py", "ftint", "--init", "scratch", "--strategy", "ddp", "--checkpoint-every", "1",
              "--set", "train.model_cfg={channels: [4, 8, 16], input_size: null}", "--set", "train.val_split=",
              "--set", "train.anomaly_set=null", "--set", "train.crop=[32,64]")
    cmd[cmd.index("--steps") + 1] = "400"  # ends by itself within minutes if a step line never comes
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
