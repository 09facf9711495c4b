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
    """The user-facing error inside ``exc``: itself, or one found through a Ray error's ``cause`` chain or a Ray
    Train failure's per-rank ``worker_failures`` / ``controller_failure``."""
    todo: list[BaseException | None] = [exc]
    for _ in range(16):
        if not todo:
            break
        e = todo.pop(0)
        if e is None:
            continue
        if isinstance(e, USER_ERRORS):
            return e
        todo += [getattr(e, "cause", None) or e.__cause__, getattr(e, "controller_failure", None),
                 *getattr(e, "worker_failures", {}).values()]
    return None


def run_cli(body: Callable[[], int], resume_hint: Callable[[], str] | None = None) -> int:
    """Run a job's ``body`` and return its exit code: a user error (config, data, checkpoint; also one raised in a
    Ray worker) prints ``error: …`` and gives 2, Ctrl-C prints ``interrupted; <resume_hint()>`` and gives 130, and
    anything else is re-raised with its traceback."""
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
    the interpreter's teardown of the torch / pandas / Ray modules (seconds after every run on a small machine:
    ``benchmarks/README.md``). For a job script's ``__main__`` only: by then its results are committed and
    its files closed, and Ray's own exit handler (the shutdown) has run here."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
