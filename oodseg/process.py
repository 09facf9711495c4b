"""Process-wide settings of a job process, applied by its entry point (``jobs/*.py``, ``python -m oodseg``) before
torch is imported; importing oodseg changes nothing in the process.

* ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy: torch's OpenMP threads sleep at barriers instead of
  spinning. With spinning (the GNU OpenMP default) a CPU process whose cores are shared — the benchmark's Ray actors
  beside the driver, a laptop doing other work — slows down by an order of magnitude on small ops
  (``benchmarks/README.md``). libgomp reads it once, when torch loads it, so it must be set
  first; Ray's local workers inherit it. :data:`JOB_WAIT_POLICY` marks the policy as the job's choice, so a child
  that has the cores to itself may spin again (:mod:`oodseg.training.background`: the demo trainer) while a policy
  the user set is kept.
* ``MALLOC_ARENA_MAX=1`` for the processes of a local Ray (:func:`local_ray_env`, used where a job starts one).
  Ray runs Ray Data calls, Tune trials and Train loops on threads other than the worker's main thread; glibc gives
  such a thread a malloc arena of its own, which keeps none of the freed large blocks that
  :func:`~oodseg.models.runtime.tune_allocator` keeps in the main one, so every temporary tensor is fresh pages
  again: scoring in a Ray Data actor's call thread measured 3× slower than in its main thread (``benchmarks/
  README.md``). glibc reads it once, at a process's start: on a cluster, CPU workers get it from ``ray start`` run
  with it in its environment.
* ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5`` for the same processes. Ray Train's controller polls its workers at this
  interval (Ray's default: 2 s); it sees a finished run only at a poll, and a worker's ``ray.train.report`` waits
  until the controller has collected its previous one (a queue of one), so reports closer together than a poll
  throttle training. A README-size fine-tune (4 steps; validation and a checkpoint every 2) took 20.5 s with 2 s
  and 18.1 s with 0.5 s (medians, ``benchmarks/train_start.py``). A poll is one small call per worker; one that is
  late is awaited at the next poll, not counted as a failure. On a cluster Ray's default stays, unless ``ray start``
  or the driver sets it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

JOB_WAIT_POLICY = "OODSEG_JOB_OMP_WAIT_POLICY"  # set to "1" when OMP_WAIT_POLICY is the job's default, not the user's


def apply_job_settings() -> None:
    """Set the job defaults above in ``os.environ`` (call before anything imports torch)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ[JOB_WAIT_POLICY] = "1"


def wait_policy_from_user() -> bool:
    """Whether ``OMP_WAIT_POLICY`` is set and was set by the user (not by :func:`apply_job_settings`)."""
    return "OMP_WAIT_POLICY" in os.environ and os.environ.get(JOB_WAIT_POLICY) != "1"


#: what a local Ray's processes get in their environment (unless the user set it), see the module docstring
LOCAL_RAY_ENV = {"MALLOC_ARENA_MAX": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@contextmanager
def local_ray_env() -> Iterator[None]:
    """:data:`LOCAL_RAY_ENV` in ``os.environ`` while a local Ray starts inside the block (its raylet hands its
    environment on to every worker it starts), this process's environment restored afterwards."""
    added = {k: v for k, v in LOCAL_RAY_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
