"""The demo trainer's OpenMP wait policy, side by side: threads that sleep at every barrier (oodseg's
``OMP_WAIT_POLICY=PASSIVE``, for shared cores) vs libgomp's brief spinning (``GOMP_SPINCOUNT``), which the benchmark's
trainer child uses (``oodseg.training.background``).

    python benchmarks/omp_wait.py [--steps 150] [--repeats 2]

OpenMP reads the policy when it starts, so every run is a fresh process that trains ``--steps`` steps of the demo
ERFNet recipe (``oodseg.training.demo.demo_config``: the demo's thread count, denormals flushed) on a synthetic suite
in a temp dir. The variants alternate, ``--repeats`` runs each, because this machine's speed drifts. Prints each
run's steps/s, the mean per variant and the ratio spinning / passive.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, torch
from oodseg.models.runtime import tune_allocator
from oodseg.training.cached import TRAIN_THREADS
from oodseg.training.demo import demo_config
from oodseg.training.loop import fit
torch.set_num_threads(TRAIN_THREADS); tune_allocator(); torch.set_flush_denormal(True)
print(fit(demo_config(sys.argv[1], steps=int(sys.argv[2]))).history[-1]["steps_per_s"])
"""


def run(suite: Path, steps: int, spin: bool) -> float:
    """Steps/s of one fresh training process."""
    from oodseg.training.background import GOMP_SPINCOUNT

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    if spin:  # what BackgroundBuild gives its child
        env["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    out = subprocess.run([sys.executable, "-c", CHILD, str(suite), str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)

    from oodseg.data.synthetic import ensure_suite

    speeds: dict[str, list[float]] = {"passive": [], "spinning": []}
    with tempfile.TemporaryDirectory() as tmp:
        suite = ensure_suite(Path(tmp) / "suite", seed=0, n_val=1, n_anomaly=1, n_coco=1)
        for _ in range(a.repeats):
            for name in speeds:
                speeds[name].append(run(suite, a.steps, spin=name == "spinning"))
                print(f"{name:9s} {speeds[name][-1]:.2f} steps/s", flush=True)
    mean = {k: sum(v) / len(v) for k, v in speeds.items()}
    print(f"mean: passive {mean['passive']:.2f}, spinning {mean['spinning']:.2f} steps/s; "
          f"ratio spinning / passive {mean['spinning'] / mean['passive']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
