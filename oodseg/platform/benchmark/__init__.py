"""The benchmark job on Ray Data: every (model × dataset × scorer × temperature) → Parquet results.

Stages, each one module with a documented input and output:

* :mod:`.prepare`    — validate and resolve the config before Ray (suite, demo model, checkpoints, datasets);
* :mod:`.read`       — dataset listings → image rows → decoded images (CPU tasks);
* :mod:`.score`      — the scoring actor: model + scorers → per-image summaries + mergeable metric states;
* :mod:`.units`      — reduce the row stream per (model, dataset) unit, handing each unit on when complete;
* :mod:`.components` — threshold-dependent metrics (SMIYC components, S2M's IoU / F1) from the cached score maps;
* :mod:`.refine`     — the S2M refine stage (score maps → box prompts → SAM masks);
* :mod:`.commit`     — one unit → its rows in the results tables, atomically;
* :mod:`.driver`     — the loop over models and stages (:data:`~.driver.STAGES`).
"""

from oodseg.platform.benchmark.config import BenchmarkConfig, DatasetSpec, ModelSpec, RefineSpec, ScorerKey
from oodseg.platform.benchmark.driver import STAGES, BenchmarkRunner, run_benchmark
from oodseg.platform.benchmark.prepare import Plan, prepare

__all__ = ["STAGES", "BenchmarkConfig", "BenchmarkRunner", "DatasetSpec", "ModelSpec", "Plan", "RefineSpec",
           "ScorerKey", "prepare", "run_benchmark"]
