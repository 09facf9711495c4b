"""``python -m oodseg report``: the standard tables, PR/ROC plots and heatmaps from a results store.

    python -m oodseg report                                   # latest row per model × dataset × method, all runs
    python -m oodseg report --runs RUN_A,RUN_B                # only these runs, side by side
    python -m oodseg report --heatmap demo:fs_static:validation_0001 --scorer rba   # needs --cache-outputs true
    python -m oodseg report --sql "SELECT * FROM failures"    # tables: runs metrics per_image failures curves trials
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import torch

from oodseg.config import ConfigError
from oodseg.data import create_dataset
from oodseg.paths import default_cache_dir, synthetic_suite
from oodseg.platform.cache import ShardCache
from oodseg.platform.results import TABLES, ResultsStore
from oodseg.report.plots import heatmap_png, plot_curves
from oodseg.report.tables import (
    component_table,
    failure_summary,
    format_components,
    format_table,
    object_table,
    standard_table,
)
from oodseg.scoring import PLACEMENTS, create_scorer, list_scorers, scorer_applies


def open_store(results: str) -> ResultsStore:
    """The existing results store at ``results`` (never created by a report)."""
    if "://" not in results and not Path(results).is_dir():
        raise ConfigError(f"--results {results}: no results store there (run python jobs/benchmark.py first)")
    return ResultsStore(results, create=False)


def _run_with_cache(store: ResultsStore, model: str, dataset: str, runs: Sequence[str]) -> str:
    """The run whose output cache draws the heatmap: the newest of the reported ``runs`` with one, else the newest
    run in the store with one (a cache outlives the rows that later runs supersede)."""
    everything = store.read("runs").sort_values("started_at")["run_id"].drop_duplicates().tolist()
    for run_id in [*reversed(sorted(runs)), *reversed(everything)]:
        if ShardCache(store.root, run_id, model, dataset, "outputs").shards():
            return run_id
    raise ConfigError(f"--heatmap: no run in {store.root} kept an output cache of {model}/{dataset} (see python -m "
                      "oodseg cache); rerun the benchmark with --cache-outputs true")


def parse_heatmap(spec: str) -> tuple[str, str, str]:
    try:
        model, dataset, image_id = spec.split(":", 2)
    except ValueError:
        raise ConfigError(f"--heatmap expects MODEL:DATASET:IMAGE_ID, got {spec!r}") from None
    return model, dataset, image_id


def check_runs(store: ResultsStore, runs: list[str] | None) -> None:
    """Every id of ``--runs`` names a run in the store."""
    known = set(store.read("runs").run_id)
    unknown = [r for r in runs or () if r not in known]
    if unknown:
        raise ConfigError(f"--runs: no run {', '.join(map(repr, unknown))} in {store.root}; runs there: "
                          f"{', '.join(sorted(known)) or 'none'}")


def _data_root(store: ResultsStore, run_id: str, given: str | None) -> str:
    if given:
        return given
    row = store.duckdb().execute("SELECT config_json FROM runs WHERE run_id = ? AND config_json IS NOT NULL "
                                 "ORDER BY started_at DESC LIMIT 1", [run_id]).fetchone()
    cfg = json.loads(row[0]) if row else {}
    if cfg.get("data_root"):
        return cfg["data_root"]
    return str(synthetic_suite(Path(cfg.get("cache_dir") or default_cache_dir()), int(cfg.get("seed", 0))))


def heatmap(store: ResultsStore, spec: str, runs: Sequence[str], a: argparse.Namespace) -> str:
    """Draw one ``MODEL:DATASET:IMAGE_ID`` heatmap from the run's output cache; returns the written path."""
    model, dataset, image_id = parse_heatmap(spec)
    run_id = _run_with_cache(store, model, dataset, runs)
    items = {item.id: item for item in ShardCache(store.root, run_id, model, dataset, "outputs").items()}
    if image_id not in items:
        shown = ", ".join(sorted(items)[:8])
        raise ConfigError(f"--heatmap: image {image_id!r} is not in the output cache of {model}/{dataset} "
                          f"(run {run_id}); cached ids: {shown}{' …' if len(items) > 8 else ''}")
    item = items[image_id]
    if not scorer_applies(a.scorer, item.outputs.ood_channels):
        raise ConfigError(f"--scorer {a.scorer}: needs a model with OOD class channels; {model!r} has none")
    ds = create_dataset(dataset, root=_data_root(store, run_id, a.data_root), strict=False)
    ref = next(r for r in ds.samples if r.id == image_id)
    fn = create_scorer(a.scorer, temperature=a.temperature, placement=a.placement)
    score = fn(item.outputs.to(dtype=torch.float32), size=tuple(item.label.shape))[0].numpy()
    png = heatmap_png(ds.load(ref)["image"], score, item.label,
                      title=f"{model} · {dataset} {image_id} · {a.scorer} T={a.temperature:g}")
    return store.write_bytes(f"plots/{run_id}/heatmaps/{model}__{dataset}__{image_id}__{a.scorer}.png", png)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m oodseg report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="./results", help="results root (directory or s3://… URI; default: "
                                                          "./results)")
    p.add_argument("--runs", default="", help="comma-separated run ids (default: the latest row of every model × "
                                              "dataset × method over all benchmark runs)")
    p.add_argument("--no-plots", action="store_true", help="only print the tables")
    p.add_argument("--heatmap", action="append", default=[], metavar="MODEL:DATASET:IMAGE_ID",
                   help="draw an anomaly heatmap for this image from the output cache (repeatable)")
    p.add_argument("--scorer", default="msp", choices=list_scorers(), help="scorer for --heatmap (default: msp)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature for --heatmap (default: 1)")
    p.add_argument("--placement", default="cl", choices=PLACEMENTS, help="temperature placement for --heatmap")
    p.add_argument("--data-root", default=None, help="dataset root for --heatmap (default: from the run's config)")
    p.add_argument("--sql", default=None, help=f"print this DuckDB query instead; tables: {', '.join(TABLES)}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        store = open_store(a.results)
        if a.sql:
            return sql(store, a.sql)
        runs = [r.strip() for r in a.runs.split(",") if r.strip()] or None
        check_runs(store, runs)
        for spec in a.heatmap:
            parse_heatmap(spec)
        return report(store, runs, a)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def sql(store: ResultsStore, query: str) -> int:
    """Print a DuckDB query's result; a query DuckDB rejects is one line naming its reason."""
    try:
        print(store.duckdb().sql(query))
    except duckdb.Error as e:
        raise ConfigError(f"--sql: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return 0


def report(store: ResultsStore, runs: list[str] | None, a: Any) -> int:
    table, info = standard_table(store, runs)
    if table.empty:
        known = sorted(set(store.read("runs").run_id))
        print(f"no results for runs {runs} in {store.root}; runs there: {', '.join(known) or 'none'}" if runs else
              f"no benchmark results in {store.root}", file=sys.stderr)
        return 1
    print(format_table(table, info))
    for text in (format_components(component_table(store, runs)),
                 format_components(object_table(store, runs), "object level (%; S2M: IoU at its best threshold, "
                                                              "mean F1 over thresholds)")):
        if text:
            print(text)
    n_fail, hint = failure_summary(store, info["runs"])
    if n_fail:
        print(hint)
    if not a.no_plots:
        for path in plot_curves(store, runs):
            print(f"plot: {path}")
    for spec in a.heatmap:
        print(f"heatmap: {heatmap(store, spec, info['runs'], a)}")
    return 0
