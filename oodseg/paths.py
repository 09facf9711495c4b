"""Where oodseg keeps what it builds once and reuses: the synthetic suite and the demo models.

``default_cache_dir()``: ``$OODSEG_CACHE``, else ``./.cache/oodseg``; inside a ``ray job submit`` driver
``~/.cache/oodseg`` instead, because a submitted job's working directory is a fresh copy of ``--working-dir`` per
submission, so a cache there would be rebuilt (minutes) every time.
"""

from __future__ import annotations

import os
from pathlib import Path

#: set by Ray in the driver of a submitted job (``ray._private.runtime_env.constants``)
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_submitted_job() -> bool:
    """True inside a ``ray job submit`` driver."""
    return RAY_JOB_ENV in os.environ


def default_cache_dir() -> Path:
    """The cache root: ``$OODSEG_CACHE``, else ``./.cache/oodseg``, or ``~/.cache/oodseg`` in a submitted job
    (whose working directory is a fresh copy each time, so a cache there would be rebuilt on every submission)."""
    if os.environ.get("OODSEG_CACHE"):
        return Path(os.environ["OODSEG_CACHE"]).expanduser().resolve()
    if in_submitted_job():
        return Path.home() / ".cache" / "oodseg"
    return Path("./.cache/oodseg").resolve()


def synthetic_suite(cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """Build (once) and return the synthetic road suite ``<cache>/suite-seed<seed>``, rendering frames in up to 4
    processes (the output does not depend on the count)."""
    from oodseg.data.synthetic import ensure_suite

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return Path(ensure_suite(cache / f"suite-seed{seed}", seed=seed, workers=min(4, available_cpus())))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def demo_suite(cache_dir: str | os.PathLike[str] | None = None, data_root: str | os.PathLike[str] | None = None,
               seed: int = 0) -> tuple[Path, Path]:
    """``(suite, cache)`` for a demo model source: ``data_root`` when it is a synthetic suite, else the suite built
    (once) under the cache."""
    from oodseg.data.synthetic import MARKER

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    given = Path(data_root) if data_root else None
    suite = given if given is not None and (given / MARKER).is_file() else synthetic_suite(cache, seed)
    return suite, cache
