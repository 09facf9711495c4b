"""Run bookkeeping every job shares: run ids, provenance, the ``runs`` row lifecycle, Ray start-up and the console.

* :func:`new_run_id` — ``YYYYmmdd-HHMMSS-<6 hex>`` (UTC).
* :class:`RunRecord` — the job's ``runs`` row: written ``running`` at start (with config, git sha, package versions,
  host, GPU, and what a resume must match: ``fingerprint_json``), ``finished`` / ``failed`` / ``interrupted`` at the end. A row left ``running`` by a killed attempt
  (SIGKILL, a lost node) is rewritten as ``interrupted`` by the next attempt with the same run id.
* :func:`init_ray` — connect to ``address`` / ``$RAY_ADDRESS`` or start a local Ray, quiet by default: Ray's and Ray
  Data's loggers at WARNING, worker output kept in Ray's log files (``log_to_driver=False``), the C++ backend at
  fatal errors only (the one line the C++ logger then prints about that setting is dropped from the console), Ray
  Data's own progress bars off (the stages draw one bar each); ``verbose=True`` restores Ray's output.
* :func:`log` — the one console logger (``oodseg``, stderr, one line per event); :func:`progress_bar` — one tqdm
  bar per stage, on a terminal only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform as _platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tqdm import tqdm

from oodseg.platform.results import ResultsStore, safe_key
from oodseg.process import local_ray_env

LOGGER = logging.getLogger("oodseg")
# Ray's C++ logger announces RAY_BACKEND_LOG_LEVEL on the driver's stderr at INFO whatever level it sets
RAY_LEVEL_BANNER = re.compile(r"logging\.cc:\d+: Set ray log level from environment variable")
STATUSES = ("running", "finished", "failed", "interrupted")


class _ConsoleHandler(logging.Handler):
    """Writes through ``tqdm.write`` so log lines and progress bars do not garble each other."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def log(msg: str) -> None:
    """One line on the console (stderr) through the ``oodseg`` logger."""
    if not LOGGER.handlers:
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("[oodseg %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.INFO)
        LOGGER.propagate = False
    LOGGER.info(msg)


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    """One bar per stage (images/s and ETA), on a terminal only."""
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def package_versions() -> dict[str, str]:
    out = {"python": _platform.python_version()}
    for pkg in ("oodseg", "ray", "torch", "numpy", "pyarrow", "timm", "transformers", "deepspeed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def gpu_names(ray: Any) -> str:
    n = int(ray.cluster_resources().get("GPU", 0))
    if not n:
        return ""
    import torch

    return f"{n}x {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'remote GPU'}"


class RunRecord:
    """The ``runs`` row of one attempt of a job: written ``running`` by :meth:`start` (with config, git sha,
    versions, host and resume fingerprint) and rewritten with its final status and wall time by :meth:`finish`."""

    def __init__(self, store: ResultsStore, run_id: str, job: str, config_json: str, seed: int = 0,
                 fingerprint_json: str | None = None) -> None:
        self.store, self.run_id, self.job = store, run_id, job
        self.attempt = uuid.uuid4().hex[:8]
        self.t0 = time.time()
        self.row: dict[str, Any] = {
            "run_id": run_id, "attempt": self.attempt, "job": job, "status": "running",
            "started_at": datetime.now(timezone.utc), "config_json": config_json, "git_sha": git_sha(),
            "versions_json": json.dumps(package_versions()), "seed": seed, "host": socket.gethostname(),
            "fingerprint_json": fingerprint_json,
        }

    def start(self, gpu: str = "") -> RunRecord:
        """Repair rows of earlier attempts still ``running`` (they were killed), then write ours."""
        runs = self.store.read("runs")
        stale = runs[(runs["run_id"] == self.run_id) & (runs["status"] == "running")]
        for row in stale.to_dict("records"):
            row.update(status="interrupted", finished_at=row.get("finished_at") or datetime.now(timezone.utc))
            self.store.write_part("runs", safe_key(self.run_id, row["attempt"]), [row])
        self.row["gpu"] = gpu
        self._write()
        return self

    def finish(self, status: str, **extra: Any) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self.row.update(status=status, finished_at=datetime.now(timezone.utc), wall_s=time.time() - self.t0, **extra)
        self._write()

    @contextlib.contextmanager
    def running(self, gpu: str = "") -> Iterator[RunRecord]:
        """The one start/finish block of every job: :meth:`start`, run the body, then :meth:`finish` with its
        outcome (:func:`status_of`). A status row that cannot be written (a full disk) does not hide the body's
        error; the next attempt marks this row ``interrupted``."""
        self.start(gpu)
        try:
            yield self
        except BaseException as e:
            with contextlib.suppress(OSError):
                self.finish(status_of(e))
            raise
        self.finish("finished")

    def _write(self) -> None:
        self.store.write_part("runs", safe_key(self.run_id, self.attempt), [self.row])


def status_of(exc: BaseException | None) -> str:
    """``finished`` (no exception), ``interrupted`` (Ctrl-C / SIGTERM) or ``failed``."""
    if exc is None:
        return "finished"
    return "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"


def quiet_ray_logging(verbose: bool) -> None:
    """Unless ``verbose``: Ray's C++ backend logs only fatal errors (its one ``E … core_worker.cc`` line per run is
    an advisory about actor restarts), Ray's Python loggers only errors. Call before and after ``ray.init`` (Ray
    Data sets up its logger when first imported)."""
    if verbose:
        return
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's classic reporter honours verbose=0 (no tables)
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def filtered_stderr(drop: re.Pattern[str]) -> Iterator[None]:
    """Capture file descriptor 2 (C++ code writes there, bypassing ``sys.stderr``) while the body runs, then write
    every captured line except those matching ``drop`` to the console."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (a detached process): nothing reaches a console anyway
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(True) if not drop.search(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def init_ray(address: str = "", num_cpus: int = 0, verbose: bool = False, runtime_env: Mapping[str, Any] | None = None,
             dashboard: bool = False) -> Any:
    """Connect to ``address`` / ``$RAY_ADDRESS``, else start a new local Ray (``"local"``: never a cluster someone
    started on this machine with ``ray start``, which plain ``ray.init()`` would join); reuses this process's Ray."""
    import ray

    quiet_ray_logging(verbose)
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs: dict[str, Any] = {"log_to_driver": verbose, "configure_logging": verbose,
                                  "logging_level": logging.INFO if verbose else logging.WARNING}
        if address == "local":
            kwargs["include_dashboard"] = dashboard
            if num_cpus:
                kwargs["num_cpus"] = num_cpus
        if runtime_env:
            kwargs["runtime_env"] = dict(runtime_env)
        with contextlib.nullcontext() if verbose else filtered_stderr(RAY_LEVEL_BANNER), \
                local_ray_env() if address == "local" else contextlib.nullcontext():
            ray.init(address=address, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.enable_operator_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    quiet_ray_logging(verbose)
    return ray
