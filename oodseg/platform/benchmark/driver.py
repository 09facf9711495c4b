"""The benchmark driver: prepare → Ray (while a model still to be trained trains in a child process) → for each model,
each stage: stream → reduce → components → commit.

Every (model, dataset, stage) unit is committed the moment its rows are reduced and its component pass is done, so
an interrupted run loses at most the units in flight; rerunning with the same ``run_id`` skips committed units and
clears the scratch caches of unfinished ones. The ``runs`` row records the attempt as ``running`` → ``finished`` /
``failed`` / ``interrupted`` (:class:`~oodseg.platform.runs.RunRecord`).

CPU budget (2-core machines): actors and read tasks take fractional CPUs (``actor_num_cpus`` + ``read_num_cpus`` ×
``read_concurrency`` ≤ cluster CPUs is checked), so reads always find a CPU slot and the pipeline cannot deadlock.
"""

from __future__ import annotations

import errno
import json
from typing import Any

from oodseg.config import ConfigError, to_json
from oodseg.platform.benchmark.commit import commit_unit
from oodseg.platform.benchmark.components import ComponentPass
from oodseg.platform.benchmark.config import BenchmarkConfig
from oodseg.platform.benchmark.fit import ensure_fits
from oodseg.platform.benchmark.heatmaps import write_heatmaps
from oodseg.platform.benchmark.prepare import Plan, prepare
from oodseg.platform.benchmark.refine import RefineStage
from oodseg.platform.benchmark.score import ScoreStage
from oodseg.platform.benchmark.stage import ModelRun, Stage
from oodseg.platform.benchmark.units import Reducer, UnitResult
from oodseg.platform.cache import KINDS, ShardCache
from oodseg.platform.runs import RunRecord, gpu_names, init_ray, log, new_run_id, progress_bar

#: the passes of a model, in order; a new pass is one Stage subclass added here
STAGES: tuple[type[Stage], ...] = (ScoreStage, RefineStage)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it wraps, e.g. inside a Ray task error) is "no space left on device"."""
    seen: list[BaseException | None] = [exc]
    for _ in range(16):
        e = seen.pop() if seen else None
        if e is None:
            return False
        if isinstance(e, OSError) and (e.errno == errno.ENOSPC or "[Errno 28]" in str(e)):
            return True
        seen.append(getattr(e, "cause", None) or e.__cause__ or e.__context__)
    return False


def unit_line(model: str, stage: str, unit: UnitResult, rows: list[dict[str, Any]]) -> str:
    """The one-line summary of a committed unit."""
    head = f"{model}/{unit.info.key}" + ("" if stage == "score" else f" [{stage}]")
    best = max((r for r in rows if r.get("auprc") is not None and r["auprc"] == r["auprc"]),
               key=lambda r: r["auprc"], default=None)
    what = (f"mIoU {100 * rows[0]['miou']:.1f}" if rows and rows[0].get("miou") is not None else
            f"best AuPRC {100 * best['auprc']:.1f} ({best['scorer']})" if best else
            "WARNING: no anomaly pixel, pixel metrics are NaN" if rows and rows[0].get("n_anomaly_pixels") == 0 else
            "no metrics")
    fails = f", {len(unit.failures)} failure(s)" if unit.failures else ""
    return f"{head}: {unit.n_images} images, {what}{fails}, committed ({unit.wall_s:.1f} s)"


class BenchmarkRunner:
    """Runs a :class:`BenchmarkConfig`: prepare (no Ray), then every model through :data:`STAGES`, each unit
    committed as it completes; ``run()`` returns the run id."""

    def __init__(self, cfg: BenchmarkConfig, plan: Plan | None = None) -> None:
        self.cfg = cfg
        self.run_id = cfg.run_id or new_run_id()
        self.plan = plan
        self.components: ComponentPass | None = None

    def run(self) -> str:
        plan = self.plan or prepare(self.cfg)
        try:
            ray = init_ray(self.cfg.ray_address, self.cfg.num_cpus, verbose=self.cfg.verbose)
            plan.finish()  # a model still training in a child process (the demo's first run) while Ray started
        except BaseException:
            plan.cancel()
            raise
        record = RunRecord(plan.store, self.run_id, "benchmark", to_json(self.cfg), self.cfg.seed,
                           json.dumps(plan.fingerprint()))
        with record.running(gpu_names(ray)):
            log(f"run {self.run_id}: results → {plan.store.root}, data ← {plan.data_root}")
            self.components = ComponentPass(ray) if self.cfg.component_metrics else None
            try:
                for spec in self.cfg.models:
                    run = ModelRun(self.cfg, plan.store, self.run_id, spec, plan.checkpoints[spec.name],
                                   plan.keys[spec.name], plan.datasets, plan.infos,
                                   plan.store.completed_units(self.run_id), plan.refine.get(spec.name, {}))
                    run.fits = ensure_fits(ray, run, plan.data_root)  # before scoring: what post-hoc scorers need
                    for stage_cls in STAGES:
                        self.run_stage(ray, stage_cls(run))
            except BaseException as e:
                if not disk_full(e):
                    raise
                self.free_scratch(plan)  # room for the status row; the rerun redoes these units anyway
                raise ConfigError(f"--results {plan.store.root}: no space left on its device; free space and rerun "
                                  f"with --run-id {self.run_id} to resume (committed units are kept)") from None
            finally:
                if self.components:
                    self.components.stop()
        return self.run_id

    def free_scratch(self, plan: Plan) -> None:
        """Delete the caches of the units not committed (a killed or failed attempt's scratch maps)."""
        done = plan.store.completed_units(self.run_id)
        for spec in self.cfg.models:
            for key in plan.infos:
                if (spec.name, key, "score") not in done:
                    for kind in KINDS:
                        ShardCache(plan.store.root, self.run_id, spec.name, key, kind).delete()

    def run_stage(self, ray: Any, stage: Stage) -> None:
        """Stream → reduce → components → commit, unit by unit."""
        run = stage.run
        if not stage.enabled():
            return
        pending = run.pending(stage.name)
        if not pending:
            log(f"{run.spec.name} [{stage.name}]: every unit already committed")
            return
        if len(pending) < len(run.infos):
            log(f"{run.spec.name} [{stage.name}]: resuming, {len(run.infos) - len(pending)} unit(s) already committed")
        units = stage.units(pending)
        bar = progress_bar(sum(u.expected for u in units.values()), f"{run.spec.name} {stage.name}",
                           self.cfg.progress)
        reducer = Reducer(units, on_image=lambda _: bar.update(1), on_info=lambda m: log(f"{run.spec.name}: {m}"))
        stream = iter(stage.stream(ray, pending))  # ours to close: on an error its tasks and actors stop here,
        try:  # before the caller frees their scratch
            for unit in reducer.consume(stream):
                unit.prune(lambda kind: run.cache(unit.info.key, kind), stage.shard_kinds)
                if self.components:
                    self.components.run(unit, run.cache(unit.info.key, stage.cache_kind), refined=stage.refined)
                rows = commit_unit(run.store, run.run_id, run.spec.name, stage.name, unit)
                if self.cfg.plots and self.cfg.heatmaps and unit.info.kind == "anomaly":
                    write_heatmaps(run, unit, stage)
                stage.after_commit(unit)
                log(unit_line(run.spec.name, stage.name, unit, rows))
        finally:
            bar.close()
            if callable(close := getattr(stream, "close", None)):
                close()


def run_benchmark(cfg: BenchmarkConfig) -> str:
    """Run the benchmark described by ``cfg``; returns the run id (results under ``cfg.results``)."""
    return BenchmarkRunner(cfg).run()
