"""``python -m oodseg cache``: what the per-run caches under ``<results>/cache`` hold, and deleting them.

    python -m oodseg cache --results results                 # size per run / model / dataset / kind
    python -m oodseg cache --results results --delete RUN_ID # free one run's caches (the results tables stay)
    python -m oodseg cache --results results --delete all

Output caches (``--cache-outputs true``) feed the temperature search; score maps are scratch space of unfinished
units. Deleting either never touches the committed results.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import pyarrow.fs as pafs

from oodseg.config import ConfigError
from oodseg.platform.jobs.report import open_store
from oodseg.platform.results import resolve_fs


def sizes(results: str) -> dict[tuple[str, ...], int]:
    """``(run, model, dataset, kind) → bytes`` of every cache directory under the results root."""
    fs, base = resolve_fs(results)
    out: dict[tuple[str, ...], int] = {}
    for info in fs.get_file_info(pafs.FileSelector(f"{base}/cache", allow_not_found=True, recursive=True)):
        if info.type == pafs.FileType.File:
            parts = info.path[len(base) + len("/cache/"):].split("/")
            if len(parts) >= 5:
                key = tuple(parts[:4])
                out[key] = out.get(key, 0) + int(info.size or 0)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodseg cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="./results", help="results root (default: ./results)")
    p.add_argument("--delete", default="", metavar="RUN_ID|all", help="delete this run's caches (or all)")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        store = open_store(a.results)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    found = sizes(store.root)
    runs = sorted({k[0] for k in found})
    if a.delete:
        targets = runs if a.delete == "all" else [a.delete]
        if a.delete != "all" and a.delete not in runs:
            print(f"error: --delete {a.delete}: no cache of that run; runs with caches: {runs}", file=sys.stderr)
            return 2
        for run in targets:
            store.fs.delete_dir(f"{store.base}/cache/{run}")
        freed = sum(n for key, n in found.items() if key[0] in targets)
        print(f"deleted the caches of {len(targets)} run(s) ({freed / 2**20:.1f} MiB)")
        return 0
    for key, n in sorted(found.items()):
        print(f"{n / 2**20:10.1f} MiB  {'/'.join(key)}")
    print(f"{sum(found.values()) / 2**20:10.1f} MiB  total in {store.root}/cache")
    return 0
