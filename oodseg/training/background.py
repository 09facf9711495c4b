"""Build a named checkpoint source (``demo``, ``demo-tdos``, a plugin's) in a child process.

The benchmark's first run spends minutes training the demo model and then seconds starting Ray; with the training in
a child process the two overlap (the driver starts Ray while the child trains). The child is a plain
``python -m oodseg.training.background SOURCE …`` that resolves the source (training it once, as the driver would:
:func:`oodseg.training.cached.cached_fit`, same lock, same file) and prints the file's path as its last line. Its
progress lines go to the console (inherited stderr); Ctrl-C ends it quietly (exit 130) and the driver prints the one
interrupt line; it exits on its own when the driver dies (it watches its parent), so a killed job leaves no trainer
behind.

The child has the cores to itself (the driver waits; with several sources the benchmark starts one child at a time),
so its OpenMP threads spin briefly at barriers as OpenMP does by default (``GOMP_SPINCOUNT`` = GNU libgomp's default
of 300,000) instead of sleeping at once, as the job's ``OMP_WAIT_POLICY=PASSIVE`` makes them (:mod:`oodseg.process`):
the demo ERFNet's small steps train faster and give the same weights (``benchmarks/omp_wait.py``; the numbers:
``benchmarks/README.md``). A policy the user set is kept.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from oodseg.models.checkpoint import CheckpointError
from oodseg.process import wait_policy_from_user

GOMP_SPINCOUNT = "300000"  # GNU libgomp's spin count when OMP_WAIT_POLICY is unset (libgomp manual)


class BackgroundBuild:
    """A child that builds ``source`` (started now, or by :meth:`start` / :meth:`wait` with ``start=False``);
    :meth:`wait` returns the checkpoint path, :meth:`cancel` stops it."""

    def __init__(self, source: str, *, cache_dir: str | os.PathLike[str], data_root: str | os.PathLike[str],
                 seed: int, plugins: Sequence[str] = (), start: bool = True) -> None:
        self.source = source
        self.cmd = [sys.executable, "-m", "oodseg.training.background", source, "--cache-dir", str(cache_dir),
                    "--data-root", str(data_root), "--seed", str(seed), "--parent", str(os.getpid())]
        self.cmd += [a for p in plugins for a in ("--plugin", p)]
        self.proc: subprocess.Popen[str] | None = None
        if start:
            self.start()

    def start(self) -> subprocess.Popen[str]:
        """The child, started on the first call."""
        if self.proc is None:
            env = dict(os.environ)
            if not wait_policy_from_user():
                env.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, text=True, env=env)
        return self.proc

    def wait(self) -> str:
        """The built checkpoint's path, once the child is done; :class:`CheckpointError` if it failed."""
        proc = self.start()
        out, _ = proc.communicate()
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise CheckpointError(self.source, f"building it in a child process failed (exit code "
                                  f"{proc.returncode}; its error is printed above)")
        return lines[-1]

    def cancel(self) -> None:
        """Stop the child (if started and still running) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.communicate()


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """A daemon thread that ends this process when ``parent`` is gone (the child is re-parented)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build a named checkpoint source; prints its path.")
    p.add_argument("source")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plugin", action="append", default=[], help="module registering the source (repeatable)")
    p.add_argument("--parent", type=int, default=0, help="exit when this process is gone")
    a = p.parse_args(argv)
    if a.parent:
        _exit_with_parent(a.parent)
    try:
        from oodseg.models import resolve_checkpoint
        from oodseg.registry import import_plugins

        import_plugins(a.plugin)
        path = resolve_checkpoint(a.source, cache_dir=a.cache_dir, data_root=a.data_root, seed=a.seed)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line: the driver adds which source failed
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
