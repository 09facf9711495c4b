"""Ray Tune search of a scorer's temperature on the benchmark's cached model outputs (no forward passes).

Temperature scaling of post-hoc anomaly scores (Guo et al., ICML 2017; the OpenOOD postprocessor sweeps):
``scorer(outputs / T)`` for per-pixel logits; for mask outputs ``T`` divides the class logits (``cl``) or the
per-pixel class scores (``pl``); see :mod:`oodseg.scoring.scorers`. For each placement one Tune study searches ``T``
over the scorer's declared space (``scorer_space(name)``, or ``t_low``..``t_high``) with Optuna's TPE sampler,
maximising AuPRC or minimising FPR95 on one validation set, then reports the best ``T`` on every set and warns when
it sits at a bound of the range (widen it).

Data flow: the benchmark (``--cache-outputs true``) leaves each image's fp16 model outputs and label in the output
cache (:mod:`oodseg.platform.output_cache`). This search reuses the newest matching run's cache or runs that benchmark
once to create it (the only forward pass). The cached sets are ``ray.put`` once; each trial re-scores the validation
set from the object store (zero-copy numpy). Grid mode evaluates fixed temperatures (default the published MSP rows
``T = 0.5, 0.75, 1.1``); Optuna mode enqueues the same points first, so the best ``T`` is never worse than a grid row.

Results: a ``runs`` row (``job="tune_temperature"``), one ``trials`` part per study (``study`` =
``temperature__<model>__<scorer>__<placement>__<objective>``, with the objective's ``mode``), ``metrics`` rows for
every reported (set, placement, T) with ``extra_json.row`` = ``grid`` | ``best``; TensorBoard logs under
``<storage>/<run_id>``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from oodseg.config import ConfigError, to_json
from oodseg.config import help_meta as _h
from oodseg.data import default_datasets, list_datasets
from oodseg.platform.benchmark import BenchmarkConfig, BenchmarkRunner, DatasetSpec, ModelSpec
from oodseg.platform.output_cache import CachedSet, find_source_run, load_cached_set, score_cached_set
from oodseg.platform.results import ResultsStore, safe_key
from oodseg.platform.runs import RunRecord, init_ray, log, new_run_id
from oodseg.platform.tuning.spaces import at_bound, in_space, tune_space
from oodseg.platform.tuning.trials import hints, trial_rows, write_trials
from oodseg.scoring import PLACEMENTS, list_scorers, scorer_applies, scorer_space

OBJECTIVES = {"auprc": "max", "fpr95": "min"}


@dataclass(frozen=True)
class TemperatureSearchConfig:
    """Search a scorer's temperature on cached model outputs with Ray Tune (Optuna TPE or a grid)."""

    results: str = field(default="./results", metadata=_h("results root (directory or URI)"))
    run_id: str = field(default="", metadata=_h("id of this search (empty: new)"))
    source_run: str = field(default="", metadata=_h("benchmark run whose output cache to reuse (empty: the newest "
                                                    "run of the same model spec with a cache, else run the "
                                                    "benchmark once to create one)"))
    model: ModelSpec = field(default=ModelSpec(), metadata=_h("model spec, as in the benchmark config"))
    data_root: str = field(default="", metadata=_h("dataset root if the cache must be created"))
    cache_dir: str = field(default="", metadata=_h("suite/demo-model cache if the cache must be created"))
    seed: int = field(default=0, metadata=_h("seed of the sampler (and of the suite when created)"))
    scorer: str = field(default="msp", metadata=_h("scorer", choices=list_scorers))
    placements: tuple[str, ...] = field(default=("cl", "pl"), metadata=_h("placements (mask models; per-pixel "
                                                                          "models have one)", choices=PLACEMENTS))
    objective: str = field(default="auprc", metadata=_h("objective on the validation set: auprc (maximised) or "
                                                        "fpr95 (minimised)", choices=tuple(OBJECTIVES)))
    val_set: str = field(default="road_anomaly_21", metadata=_h("validation set the search optimises",
                                                                choices=list_datasets))
    datasets: tuple[str, ...] = field(default=default_datasets("anomaly"),
                                      metadata=_h("sets reported at the best T", choices=list_datasets))
    search: str = field(default="optuna", metadata=_h("search algorithm", choices=("optuna", "grid")))
    num_samples: int = field(default=24, metadata=_h("Optuna trials per placement (grid points included)"))
    t_low: float = field(default=0.0, metadata=_h("lower bound of T (0: the scorer's declared lower bound)"))
    t_high: float = field(default=0.0, metadata=_h("upper bound of T (0: the scorer's declared upper bound)"))
    grid: tuple[float, ...] = field(default=(0.5, 0.75, 1.1), metadata=_h("reference temperatures"))
    include_grid: bool = field(default=True, metadata=_h("enqueue the grid points first in Optuna mode"))
    max_images: int = field(default=0, metadata=_h("at most this many cached images per set (0: all)"))
    bits: int = field(default=24, metadata=_h("PixelMetrics histogram bits"))
    trial_cpus: float = field(default=1.0, metadata=_h("CPUs per trial (torch threads = ceil)"))
    max_concurrent_trials: int = field(default=0, metadata=_h(
        "0: as many as the CPUs allow with one left to the Tune driver (trial_concurrency)"))
    batch_size: int = field(default=8, metadata=_h("batch size of the benchmark that creates the cache"))
    storage: str = field(default="", metadata=_h("Tune experiment root (empty: <results>/tune)"))
    ray_address: str = field(default="", metadata=_h("Ray address (empty: $RAY_ADDRESS or local)"))
    num_cpus: int = field(default=0, metadata=_h("CPUs of a locally started Ray (0: all)"))
    verbose: bool = field(default=False, metadata=_h("show Ray's own log output"))

    def __post_init__(self) -> None:
        if self.search == "grid" and not self.grid:
            raise ValueError("grid search needs at least one grid temperature")
        if self.search == "optuna" and self.include_grid and self.num_samples < len(self.grid):
            raise ValueError(f"num_samples={self.num_samples} < {len(self.grid)} enqueued grid points")
        self.space()  # a scorer without a temperature, a bad range or grid: a config error, before any work

    @property
    def report_sets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.val_set, *self.datasets)))

    def space(self) -> dict[str, Any]:
        """The scorer's declared space, its temperature bounds replaced by ``t_low`` / ``t_high`` where set."""
        declared = scorer_space(self.scorer)
        if "temperature" not in declared:
            raise ValueError(f"scorer {self.scorer!r} declares no 'temperature' in its space {declared}")
        if self.t_low or self.t_high:
            t = declared["temperature"]
            low, high = self.t_low or t.get("low", 0.0), self.t_high or t.get("high", 0.0)
            if not 0 < low < high:
                raise ValueError(f"the T range needs 0 < --t-low < --t-high, got {low}, {high} (0: the declared "
                                 f"bound of {t})")
            declared["temperature"] = {"type": "loguniform", "low": low, "high": high}
        bad = [t for t in self.grid if not in_space(t, declared["temperature"])]
        if bad:
            raise ValueError(f"--grid temperatures {bad} lie outside the search range {declared['temperature']}")
        return declared


def metric_columns(data: CachedSet, scorer: str, temperature: float, placement: str = "cl",
                   params: dict[str, Any] | None = None, bits: int = 24) -> dict[str, Any]:
    """:func:`score_cached_set`'s ``metrics`` table columns, as the benchmark writes them (``PixelMetrics.row``)."""
    pm, seconds = score_cached_set(data, scorer, temperature, placement, params, bits)
    return {**pm.row(), "n_images": len(data.labels), "wall_s": seconds}


@dataclass
class StudyResult:
    """One placement's study: every trial, the best temperature and its validation metrics."""

    study: str
    placement: str
    best_temperature: float
    best_value: float
    best_params: dict[str, Any]
    trials: list[dict[str, Any]]
    experiment_dir: str
    at_bound: str = ""


@dataclass
class TemperatureSearchResult:
    """What :func:`run_temperature_search` returns (also all written to the results store)."""

    run_id: str
    source_run: str
    created_cache: bool
    studies: list[StudyResult]
    rows: list[dict[str, Any]]
    hints: str = ""


def trial_concurrency(n_cpus: float, trial_cpus: float) -> int:
    """Trials run at once by default: the CPUs less one, per trial's CPUs (at least one). A trial scores a cached set
    in milliseconds, so the Tune driver (search algorithm, result processing, logging) is busy between trials. On a
    2-CPU machine (``benchmarks/tune.py``, three alternating runs each) one trial at a time beside the driver took a
    trial's Tune wall from 0.099–0.102 to 0.084–0.094 of a forward pass and the whole search from 16.2–19.9 s to
    16.2–16.7 s: a second trial actor only added its start-up and competed with the driver for the CPUs."""
    return max(1, int((n_cpus - 1) // max(trial_cpus, 1e-3)))


def _run_study(cfg: TemperatureSearchConfig, placement: str, val_ref: Any, storage: str, run_id: str,
               n_cpus: float) -> StudyResult:
    """One Tune study (one placement): Optuna TPE over the space, grid points first, or a plain grid."""
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback

    from oodseg.platform.tuning.temperature_trial import TemperatureTrial  # imports Ray Tune

    objective, mode = cfg.objective, OBJECTIVES[cfg.objective]
    study = f"temperature__{cfg.model.name}__{cfg.scorer}__{placement}__{objective}"
    declared = cfg.space()
    fixed = {"scorer": cfg.scorer, "placement": placement}
    if cfg.search == "grid":
        param_space = {**fixed, "temperature": tune.grid_search([float(t) for t in cfg.grid])}
        search_alg, num_samples = None, 1
    else:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        param_space = {**fixed, **tune_space(declared)}
        points = [{"temperature": float(t)} for t in cfg.grid] if cfg.include_grid else None
        search_alg = OptunaSearch(points_to_evaluate=points, sampler=optuna.samplers.TPESampler(seed=cfg.seed))
        num_samples = cfg.num_samples
    trainable = tune.with_resources(
        tune.with_parameters(TemperatureTrial, data=[val_ref], bits=cfg.bits, threads=max(1, math.ceil(
            cfg.trial_cpus))), {"cpu": cfg.trial_cpus})
    concurrent = cfg.max_concurrent_trials or trial_concurrency(n_cpus, cfg.trial_cpus)
    grid = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=objective, mode=mode, search_alg=search_alg, num_samples=num_samples,
                                    max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=study, storage_path=f"{storage}/{run_id}", callbacks=[TBXLoggerCallback()],
                                  verbose=0),
    ).fit()
    if grid.num_errors:
        raise RuntimeError(f"{grid.num_errors} temperature trial(s) of {study} failed: {grid.errors[0]}")
    best = grid.get_best_result(metric=objective, mode=mode, scope="last")
    rows = trial_rows(grid, run_id=run_id, study=study, model=cfg.model.name, dataset=cfg.val_set,
                      objective=objective, mode=mode, params=[*declared, "placement"], extra={"scorer": cfg.scorer})
    t_best = float(best.config["temperature"])
    bound = at_bound(t_best, declared["temperature"]) if cfg.search == "optuna" else ""
    extra = {k: best.config[k] for k in declared if k != "temperature" and k in best.config}
    return StudyResult(study, placement, t_best, float(best.metrics[objective]), extra, rows, grid.experiment_path,
                       bound)


def cache_benchmark(cfg: TemperatureSearchConfig) -> BenchmarkConfig:
    """The benchmark run that creates the output cache: this model, the needed sets, T = 1 only, no extras."""
    return BenchmarkConfig(
        results=cfg.results, data_root=cfg.data_root, cache_dir=cfg.cache_dir, seed=cfg.seed, models=(cfg.model,),
        datasets=tuple(DatasetSpec(d) for d in cfg.report_sets), max_images=cfg.max_images, scorers=(cfg.scorer,),
        temperatures=(1.0,), placements=tuple(cfg.placements), component_metrics=False, smiyc=False,
        cache_outputs=True, heatmaps=0, plots=False, batch_size=cfg.batch_size, ray_address=cfg.ray_address,
        num_cpus=cfg.num_cpus, progress=False, verbose=cfg.verbose)


def _report(ray: Any, cfg: TemperatureSearchConfig, store: ResultsStore, run_id: str, source: str,
            studies: list[StudyResult], refs: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluate grid rows and the best T of every study on every set (Ray tasks); commit ``metrics`` rows."""
    metrics = store.read("metrics")
    mine = metrics[metrics.run_id == source]
    tracks = dict(zip(mine.dataset, mine.track))
    remote = ray.remote(num_cpus=cfg.trial_cpus)(metric_columns)
    jobs = []
    for s in studies:
        for row, t, params in [("grid", float(t), {}) for t in cfg.grid] + [("best", s.best_temperature,
                                                                              s.best_params)]:
            for d, ref in refs.items():
                jobs.append(((s.placement, row, t, d), remote.remote(ref, cfg.scorer, t, s.placement, params,
                                                                     cfg.bits)))
    now, out = datetime.now(timezone.utc), []
    for (placement, row, t, d), ref in jobs:
        out.append({
            "run_id": run_id, "model": cfg.model.name, "dataset": d, "stage": "score", "kind": "anomaly",
            "track": tracks.get(d), "scorer": cfg.scorer, "placement": placement, "temperature": t, **ray.get(ref),
            "n_failures": 0, "committed_at": now,
            "extra_json": json.dumps({"row": row, "tuned_on": cfg.val_set, "objective": cfg.objective,
                                      "source_run": source, "search": cfg.search}),
        })
    for d in refs:
        store.write_part("metrics", safe_key(run_id, cfg.model.name, d), [r for r in out if r["dataset"] == d])
    return out


def source_run(cfg: TemperatureSearchConfig, store: ResultsStore) -> tuple[str, bool]:
    """``(run id, created)``: the benchmark run whose output cache the search reads (``--source-run`` or the newest
    matching one), or a new one, made by running the benchmark once (its own checks, among them that the scorer
    applies to the model, come before its Ray work)."""
    try:
        source = find_source_run(store, cfg.model, cfg.report_sets, cfg.source_run)
    except ValueError as e:
        raise ConfigError(f"--source-run: {e}") from None
    if source:
        return source, False
    log(f"no output cache of {cfg.model.name!r} for {list(cfg.report_sets)} in {store.root}: running the benchmark "
        "once to create it")
    return BenchmarkRunner(cache_benchmark(cfg)).run(), True


def load_sets(cfg: TemperatureSearchConfig, store: ResultsStore, source: str) -> dict[str, CachedSet]:
    """The cached sets, the validation set first: a scorer that does not apply to the model (``scorer_applies`` on
    the cached outputs' OOD channels, the benchmark's rule) or a validation set without anomaly and inlier pixels is
    a one-line error before the search starts Ray."""
    val = load_cached_set(store, source, cfg.model.name, cfg.val_set, cfg.max_images)
    ood = tuple(int(c) for c in val.records[0].get("ood_channels", ())) if val.records else ()
    if not scorer_applies(cfg.scorer, ood):
        raise ConfigError(f"--scorer {cfg.scorer}: needs a model with an OOD class; {cfg.model.name!r} has none "
                          f"(its outputs cached by run {source!r})")
    if not any((lab == 1).any() for lab in val.labels) or not any((lab == 0).any() for lab in val.labels):
        raise ConfigError(f"--val-set {cfg.val_set}: needs anomaly and inlier pixels for {cfg.objective} (cached "
                          f"by run {source!r})")
    return {d: val if d == cfg.val_set else load_cached_set(store, source, cfg.model.name, d, cfg.max_images)
            for d in cfg.report_sets}


def run_temperature_search(cfg: TemperatureSearchConfig) -> TemperatureSearchResult:
    """Find or create the output cache and check it, run one study per placement, report grid rows + best T on
    every set."""
    store = ResultsStore(cfg.results)
    run_id = cfg.run_id or "tune-" + new_run_id()
    source, created = source_run(cfg, store)
    data = load_sets(cfg, store, source)
    ray = init_ray(cfg.ray_address, cfg.num_cpus, verbose=cfg.verbose)
    with RunRecord(store, run_id, "tune_temperature", to_json(cfg), cfg.seed).running():
        log(f"{'created' if created else 'reusing'} the output cache of benchmark run {source!r}: "
            f"{sum(len(d.labels) for d in data.values())} images, {sum(d.nbytes for d in data.values()) / 2**20:.1f}"
            " MiB")
        refs = {d: ray.put(v) for d, v in data.items()}
        pixel = all("logits" in r for d in data.values() for r in d.records)
        placements = ["cl"] if pixel else list(cfg.placements)  # per-pixel logits: cl ≡ pl (both logits / T)
        n_cpus = float(ray.cluster_resources().get("CPU", 1))
        studies = []
        for placement in placements:
            study = _run_study(cfg, placement, refs[cfg.val_set], cfg.storage or store.uri("tune"), run_id, n_cpus)
            write_trials(store, run_id, study.study, study.trials)
            studies.append(study)
        rows = _report(ray, cfg, store, run_id, source, studies, refs)
    tb = f"{cfg.storage or store.uri('tune')}/{run_id}"
    return TemperatureSearchResult(run_id, source, created, studies, rows, hints(store, tb, run_id, studies[0].study))


def format_result(res: TemperatureSearchResult, cfg: TemperatureSearchConfig) -> str:
    """The report table (one line per placement × row × T, AuPRC / FPR95 per set), bound warnings and hints."""
    sets = list(cfg.report_sets)
    lines = [f"temperature search {res.run_id} on cached outputs of {res.source_run} (objective {cfg.objective} on "
             f"{cfg.val_set}; cells: AuPRC / FPR95, %)",
             f"{'scorer':<8}{'pl':<4}{'row':<6}{'T':>8}  " + "  ".join(f"{d[:18]:>18}" for d in sets)]
    cells = {(r["placement"], json.loads(r["extra_json"])["row"], r["temperature"], r["dataset"]): r
             for r in res.rows}
    for placement, row, t in dict.fromkeys((k[0], k[1], k[2]) for k in cells):
        parts = [f"{100 * cells[(placement, row, t, d)]['auprc']:8.2f} / "
                 f"{100 * cells[(placement, row, t, d)]['fpr95']:6.2f}" for d in sets]
        label = f"t={t:g}" if row == "grid" else "best"
        lines.append(f"{cfg.scorer:<8}{placement:<4}{label:<6}{t:>8.4g}  " + "  ".join(f"{c:>18}" for c in parts))
    for s in res.studies:
        if s.at_bound:
            lines.append(f"WARNING: the best T of {s.placement} ({s.best_temperature:.4g}) sits at the {s.at_bound} "
                         "bound of the search range; widen it with --t-low/--t-high")
    lines.append(res.hints)
    return "\n".join(lines)
