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

Importing the package imports none of them: Ray workers import only the stage module they run (a read task needs
``read`` alone, not torch, torchvision and pandas; the cost: ``benchmarks/README.md``). The names
below resolve on first use (PEP 562); ``prepare`` is the submodule, its function is ``prepare.prepare``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BenchmarkConfig": "config", "DatasetSpec": "config", "ModelSpec": "config", "RefineSpec": "config",
    "ScorerKey": "config", "STAGES": "driver", "BenchmarkRunner": "driver", "run_benchmark": "driver",
    "Plan": "prepare",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
