"""A short fine-tune's wall time under Ray Train's default health-check interval (2 s) vs oodseg's local one (0.5 s).

    python benchmarks/train_start.py [--runs 2] [--repeats 2]

Ray Train's controller collects its workers' reports and notices a finished run only when it polls them
(``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), and a worker's next ``ray.train.report`` waits until the previous one was
collected; a local Ray's processes get 0.5 s (``oodseg/process.py``). Each variant is a fresh process that starts
its local Ray with its interval, as a job starts one (the controller reads it when it starts), and runs ``--runs``
README-size fine-tunes one after the other (``configs/finetune.yaml``, 4 steps, a progress line each, validation
and a checkpoint every 2, a random ERFNet: nothing to cache first), printing each run's wall seconds. The variants
take turns, ``--repeats`` processes each, because this machine's speed drifts. Prints the median run per variant and
the ratio 0.5 s / 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--steps", "4", "--set", "train.init=scratch", "--set", "train.log_every=1", "--set", "train.val_every=2",
         "--set", "checkpoint_every=2", "--set", "train.crop=[64,128]", "--set", "train.global_batch=2",
         "--set", "train.val_images=2"]
CHILD = """
import contextlib, io, json, sys, time
from oodseg.process import LOCAL_RAY_ENV, apply_job_settings
apply_job_settings()
from oodseg.platform.jobs import finetune
from oodseg.platform.runs import init_ray
import ray
storage, runs, short, interval = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
LOCAL_RAY_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval  # given to the local Ray's processes as a job's is
init_ray("", 2)
seconds = []
for i in range(runs):
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = finetune.main(["--config", "configs/finetune.yaml", "--name", f"run{i}", "--storage-path", storage,
                              "--export", f"{storage}/run{i}.safetensors", *short])
    assert not code, code
    seconds.append(time.perf_counter() - t0)
ray.shutdown()
print(json.dumps(seconds))
"""


def run(interval: str, work: Path, runs: int) -> list[float]:
    """Wall seconds of ``runs`` fine-tunes in one fresh process whose local Ray polls every ``interval`` seconds."""
    storage = Path(tempfile.mkdtemp(dir=work))
    # not in the driver's environment: there Ray Train would take it as the user's and hand it to its workers
    env = {k: v for k, v in os.environ.items() if k != "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"}
    env["OODSEG_CACHE"] = str(work / "cache")
    out = subprocess.run([sys.executable, "-c", CHILD, str(storage), str(runs), json.dumps(SHORT), interval], env=env,
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2, help="fine-tunes per process (one local Ray)")
    p.add_argument("--repeats", type=int, default=2, help="processes per variant, taking turns")
    a = p.parse_args(argv)
    seconds: dict[str, list[float]] = {"2.0": [], "0.5": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            for interval, got in seconds.items():
                got.extend(run(interval, Path(tmp), a.runs))
                print(f"interval {interval} s: " + " ".join(f"{s:.1f}" for s in got[-a.runs:]) + " s per fine-tune",
                      flush=True)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"median fine-tune: {median['2.0']:.1f} s at 2 s (Ray's default), {median['0.5']:.1f} s at 0.5 s "
          f"(oodseg's local Ray); ratio 0.5 s / 2 s = {median['0.5'] / median['2.0']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
