"""Build a named checkpoint source (``demo``, ``demo-tdos``, a plugin's) in a child process.

The benchmark's first run spends minutes training the demo model and then seconds starting Ray; with the training in
a child process the two overlap (the driver starts Ray while the child trains). The child is a plain
``python -m oodseg.training.background SOURCE …`` that resolves the source (training it once, as the driver would:
:func:`oodseg.training.cached.cached_fit`, same lock, same file) and prints the file's path as its last line. Its
progress lines go to the console (inherited stderr); Ctrl-C ends it quietly (exit 130) and the driver prints the one
interrupt line; it exits on its own when the driver dies (it watches its parent), so a killed job leaves no trainer
behind.
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


class BackgroundBuild:
    """A running child that builds ``source``; :meth:`wait` returns the checkpoint path, :meth:`cancel` stops it."""

    def __init__(self, source: str, *, cache_dir: str | os.PathLike[str], data_root: str | os.PathLike[str],
                 seed: int, plugins: Sequence[str] = ()) -> None:
        self.source = source
        cmd = [sys.executable, "-m", "oodseg.training.background", source, "--cache-dir", str(cache_dir),
               "--data-root", str(data_root), "--seed", str(seed), "--parent", str(os.getpid())]
        cmd += [a for p in plugins for a in ("--plugin", p)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    def wait(self) -> str:
        """The built checkpoint's path, once the child is done; :class:`CheckpointError` if it failed."""
        out, _ = self.proc.communicate()
        lines = out.strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            raise CheckpointError(self.source, f"building it in a child process failed (exit code "
                                  f"{self.proc.returncode}; its error is printed above)")
        return lines[-1]

    def cancel(self) -> None:
        """Stop the child (if still running) and reap it."""
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
        import oodseg.training  # noqa: F401  (registers "demo" and "demo-tdos")
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
