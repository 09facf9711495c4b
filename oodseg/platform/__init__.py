"""Platform layer, the only one that imports Ray (lazily, inside the functions that need it).

* :mod:`oodseg.platform.pipeline` — the benchmark job on Ray Data (:class:`BenchmarkConfig`, :func:`run_benchmark`).
* :mod:`oodseg.platform.results` — append-only Parquet results store with atomic per-unit commits.
* :mod:`oodseg.platform.cache` — per-run fp16 output / score-map shard cache (the Tune output cache).
* ``trainer.py`` (Ray Train) and ``tuners.py`` (Ray Tune) — see their modules.
"""

from oodseg.platform.cache import CachedItem, ShardCache, output_nbytes
from oodseg.platform.pipeline import BenchmarkConfig, ModelSpec, run_benchmark
from oodseg.platform.results import TABLES, ResultsStore

__all__ = [
    "TABLES",
    "BenchmarkConfig",
    "CachedItem",
    "ModelSpec",
    "ResultsStore",
    "ShardCache",
    "output_nbytes",
    "run_benchmark",
]
