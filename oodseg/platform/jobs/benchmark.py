"""The benchmark job (``python jobs/benchmark.py`` / ``python -m oodseg benchmark``): prepare → score every
model × dataset × scorer on Ray Data, unit by unit → print the standard tables → plots. Stages:
``oodseg/platform/benchmark/``."""

from __future__ import annotations

import time

from oodseg.config import parse_config
from oodseg.platform.benchmark import BenchmarkConfig, BenchmarkRunner
from oodseg.platform.benchmark.prepare import prepare
from oodseg.platform.cli import run_cli
from oodseg.report import component_table, format_components, format_table, object_table, plot_curves, standard_table
from oodseg.report.tables import failure_summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BenchmarkConfig, argv, prog="python jobs/benchmark.py", description=__doc__)
    runner = BenchmarkRunner(cfg)

    def body() -> int:
        t0 = time.time()
        runner.plan = prepare(cfg)            # config, data, checkpoints, results root: checked before Ray starts
        run_id = runner.run()                 # per model: score → components → commit each unit (→ s2m refine)
        store = runner.plan.store
        table, info = standard_table(store, [run_id])
        print(format_table(table, info), flush=True)
        for text in (format_components(component_table(store, [run_id])),
                     format_components(object_table(store, [run_id]), "object level (%)")):
            if text:
                print(text, flush=True)
        if cfg.plots:
            plot_curves(store, [run_id], f"plots/{run_id}")
            print(f"plots: {store.uri('plots', run_id)}", flush=True)
        n_fail, hint = failure_summary(store, [run_id])
        if n_fail:
            print(hint, flush=True)
        print(f"run {run_id} finished in {time.time() - t0:.1f} s; results in {store.root} (compare runs: python -m "
              f"oodseg report --results {cfg.results})", flush=True)
        return 0

    return run_cli(body, lambda: f"rerun with --run-id {runner.run_id} to resume")
