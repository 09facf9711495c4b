"""What every job's command line shares: one-line errors (exit code 2), Ctrl-C as one line (exit code 130).

Bad input — a config key, a file, a checkpoint, a dataset — surfaces as ``error: <file or option>: <problem>``,
including when it was raised inside a Ray worker (the original exception travels as the Ray error's ``cause``);
a KeyboardInterrupt prints ``interrupted; <how to resume>``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from oodseg.config import ConfigError
from oodseg.data import DataError
from oodseg.models import CheckpointError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside ``exc`` (itself, or a Ray error's ``cause`` chain), if there is one."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, USER_ERRORS):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None


def run_cli(body: Callable[[], int], resume_hint: Callable[[], str] | None = None) -> int:
    """Run a job's ``body`` with the module docstring's error handling; returns the exit code."""
    try:
        return body()
    except KeyboardInterrupt:
        hint = resume_hint() if resume_hint else ""
        print(f"\ninterrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def exit_fast(code: int) -> NoReturn:
    """End a job's process with ``code``: shut Ray down, flush the console and leave with ``os._exit``, skipping
    the interpreter's teardown of the torch / pandas / Ray modules (2–3 s on 2 cores after every run; the benchmark
    job's cached rerun: 51.3 → 46.3 s). For a job script's ``__main__`` only: by then its results are committed and
    its files closed, and Ray's own exit handler (the shutdown) has run here."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
