"""Ray Tune search of loss hyper-parameters with ASHA; every trial is one Ray Train (V2) fine-tuning run.

Pattern (Ray 2.60 Train V2 + Tune, "Hyperparameter Tuning with Ray Tune" guide): the Tune trainable
:func:`loss_trial` is a small *driver* that builds a ``TorchTrainer`` around the fine-tuning engineer's
:func:`oodseg.platform.trainer.train_loop_per_worker` (same ``FinetuneConfig``, scaling, storage and failure
settings as :func:`oodseg.platform.trainer.run_finetune`) and calls ``fit()``. Worker metrics reach Tune through a
``TuneReportCallback`` subclass that also adds the derived objective ``val_combo``. The Train run is named
``train-<trial_id>`` under ``<storage>/<run_id>/train``, so a restarted trial resumes its own Train checkpoint.

Search space: the loss's declared space for the model's output kind (``loss_space(loss, model_output_kind(model))``:
OE ``weight`` / ``tau_in`` / ``tau_out`` on the per-pixel or mask scale, LogitNorm ``temperature``, EIM
``entropic_scale``) under ``loss_cfg``, plus the learning rate ``lr`` (log-uniform in
``[lr_low, lr_high]``). Random search (seeded ``BasicVariantGenerator``) or Optuna TPE.

Objective and ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020): every trial
validates every ``train.val_every`` steps and each validation is one Tune iteration (``log_every`` and
``checkpoint_every`` are set to ``val_every`` so every report carries validation metrics). ASHA
(``time_attr=training_iteration``, ``max_t = steps / val_every``, ``grace_period``, ``reduction_factor``) stops a
trial at a rung when its objective is below the rung's ``1 − 1/reduction_factor`` quantile. Objectives:

* ``val_auprc`` (max): pixel AuPRC of ``train.scorer`` on the held-out anomaly set (the default);
* ``val_fpr95`` (min);
* ``val_combo`` (max): harmonic mean ``2·AuPRC·mIoU / (AuPRC + mIoU)`` with the in-distribution mIoU, so a loss
  weight that buys anomaly AuPRC by wrecking the closed-set segmentation is not selected.

Resume: with ``resume`` (default) and an existing experiment directory ``<storage>/<run_id>/<study>``, the search
continues with ``Tuner.restore`` (finished trials kept, unfinished resumed, errored restarted).

Results: ``runs`` row (``job="tune_loss"``), one ``trials`` part (``study = loss__<loss>__<objective>``) with each
trial's params, last objective, iterations (fewer than ``max_t`` = stopped early by ASHA) and its objective history;
TensorBoard event files in every trial directory of ``<storage>/<run_id>/<study>``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from oodseg.config import from_dict, to_dict, to_json
from oodseg.losses import loss_space
from oodseg.models import model_output_kind
from oodseg.platform.results import ResultsStore
from oodseg.platform.runs import RunRecord, init_ray, log, new_run_id
from oodseg.platform.trainer import FinetuneConfig, build_trainer, resolve_data
from oodseg.platform.tuning.reaper import placement_group_reaper, reap_until_clean
from oodseg.platform.tuning.spaces import tune_space
from oodseg.platform.tuning.trials import hints, trial_rows, write_trials
from oodseg.training.config import TrainConfig

OBJECTIVES = {"val_auprc": "max", "val_fpr95": "min", "val_combo": "max"}


@dataclass(frozen=True)
class LossSearchConfig:
    """ASHA search over a loss's hyper-parameters and the learning rate; each trial is a Ray Train run."""

    results: str = field(default="./results", metadata={"help": "results root (directory or URI)"})
    run_id: str = field(default="", metadata={"help": "search id; reuse it to resume (empty: new)"})
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(train=TrainConfig(val_every=50)),
                                     metadata={"help": "base fine-tuning run"})
    params: tuple[str, ...] = field(default=(), metadata={"help": "loss params to tune (empty: the whole "
                                                                  "loss_space of finetune.train.loss)"})
    tune_lr: bool = field(default=True, metadata={"help": "also tune the learning rate"})
    lr_low: float = field(default=1e-5, metadata={"help": "lr search lower bound (log-uniform)"})
    lr_high: float = field(default=1e-2, metadata={"help": "lr search upper bound"})
    objective: str = field(default="val_auprc", metadata={"help": "val_auprc (max) | val_fpr95 (min) | val_combo "
                                                                  "(max)", "choices": ("val_auprc", "val_fpr95",
                                                                                       "val_combo")})
    searcher: str = field(default="random", metadata={"help": "search algorithm", "choices": ("random", "optuna")})
    num_samples: int = field(default=8, metadata={"help": "trials"})
    grace_period: int = field(default=1, metadata={"help": "ASHA: validations before a trial can be stopped"})
    reduction_factor: float = field(default=2.0, metadata={"help": "ASHA: keep the top 1/rf at each rung"})
    max_concurrent_trials: int = field(default=0, metadata={"help": "0: cluster CPUs (GPUs) / workers per trial"})
    seed: int = field(default=0, metadata={"help": "seed of the searcher"})
    storage: str = field(default="", metadata={"help": "Tune/Train storage root (empty: <results>/tune)"})
    resume: bool = field(default=True, metadata={"help": "restore the experiment if its directory exists"})
    ray_address: str = field(default="", metadata={"help": "Ray address (empty: $RAY_ADDRESS or local)"})
    num_cpus: int = field(default=0, metadata={"help": "CPUs of a locally started Ray (0: all)"})
    verbose: bool = field(default=False, metadata={"help": "show Ray's own log output"})

    def __post_init__(self) -> None:
        tc = self.finetune.train
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be ≥ 1 (trials), got {self.num_samples}")
        if self.tune_lr and not 0 < self.lr_low < self.lr_high:
            raise ValueError(f"the lr range needs 0 < lr_low < lr_high, got {self.lr_low}, {self.lr_high}")
        if tc.val_every < 1 or tc.steps % tc.val_every:
            raise ValueError(f"ASHA needs periodic validation: train.val_every ({tc.val_every}) must be ≥ 1 and "
                             f"divide train.steps ({tc.steps})")
        if not tc.anomaly_set:
            raise ValueError(f"objective {self.objective} needs train.anomaly_set (held-out anomaly validation set)")
        if self.objective == "val_combo" and not tc.val_split:
            raise ValueError("objective val_combo needs train.val_split (in-distribution mIoU)")
        if not 1 <= self.grace_period <= self.max_t:
            raise ValueError(f"grace_period must be in [1, max_t={self.max_t}], got {self.grace_period}")

    @property
    def max_t(self) -> int:
        """Validations per trial (= Tune iterations of a trial that is never stopped)."""
        return self.finetune.train.steps // self.finetune.train.val_every


def with_objectives(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` plus ``val_combo`` (harmonic mean of ``val_auprc`` and ``val_miou``) when both are finite."""
    a, m = metrics.get("val_auprc"), metrics.get("val_miou")
    if a is None or m is None or not (math.isfinite(a) and math.isfinite(m)):
        return dict(metrics)
    return {**metrics, "val_combo": 0.0 if a + m == 0 else 2 * a * m / (a + m)}


def _report_callback():
    """A ``TuneReportCallback`` (forwards rank 0's reported row to the Tune trial) that adds ``val_combo``."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [with_objectives(m) for m in metrics], checkpoint)

    return ObjectiveReportCallback()


def trial_finetune_config(base: FinetuneConfig, config: dict[str, Any], name: str, storage: str) -> FinetuneConfig:
    """The trial's ``FinetuneConfig``: base + sampled ``lr`` / ``loss_cfg``; exactly one report per ``val_every``
    steps, each with validation metrics (``log_every = val_every``, ``checkpoint_every`` rounded up to a multiple of
    it, since a report without the objective would still count as a Tune iteration); no export (the trial's last
    checkpoint holds ``model.safetensors``)."""
    tc = base.train
    train = replace(tc, lr=float(config.get("lr", tc.lr)), loss_cfg={**tc.loss_cfg, **config.get("loss_cfg", {})},
                    log_every=tc.val_every)
    every = tc.val_every * max(1, math.ceil(base.checkpoint_every / tc.val_every))
    return replace(base, train=train, name=name, storage_path=storage, checkpoint_every=every)


def loss_trial(config: dict[str, Any], base: dict[str, Any], train_storage: str) -> None:
    """Tune trainable (the Train driver): one fine-tuning run with this trial's hyper-parameters."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_finetune_config(from_dict(FinetuneConfig, base), config, f"train-{trial_id}", train_storage)
    build_trainer(cfg, [_report_callback()]).fit()


def search_space(cfg: LossSearchConfig) -> dict[str, Any]:
    """``{"loss_cfg": {param: domain}, "lr": domain}`` from ``loss_space(train.loss, output_kind)`` for the
    model's output kind (and the lr bounds)."""
    from ray import tune

    train = cfg.finetune.train
    declared = loss_space(train.loss, output_kind=model_output_kind(train.model))
    space: dict[str, Any] = {}
    loss_params = tune_space(declared, only=cfg.params or None)
    if loss_params:
        space["loss_cfg"] = loss_params
    if cfg.tune_lr:
        space["lr"] = tune.loguniform(cfg.lr_low, cfg.lr_high)
    if not space:
        raise ValueError(f"nothing to tune: loss {cfg.finetune.train.loss!r} declares no space and tune_lr is off")
    return space


@dataclass
class LossSearchResult:
    """What :func:`run_loss_search` returns (the trials rows are also in the results store)."""

    run_id: str
    study: str
    experiment_dir: str
    best_config: dict[str, Any]
    best_value: float
    trials: list[dict[str, Any]]
    restored: bool
    best_checkpoint: str | None  # the best trial's last Train checkpoint (holds model.safetensors at the end)
    hints: str = ""


def _tuner(cfg: LossSearchConfig, ray: Any, trainable: Any, space: dict[str, Any], exp_dir: str, study: str,
           storage: str, run_id: str) -> tuple[Any, bool]:
    """A fresh ``Tuner`` (ASHA, random or Optuna search) or the restored one of an earlier attempt."""
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.resume and tune.Tuner.can_restore(exp_dir):
        log(f"resuming {exp_dir}")
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True), True
    ft = cfg.finetune
    per_trial = ft.num_workers * (1 if ft.use_gpu else ft.cpus_per_worker)
    cluster = ray.cluster_resources().get("GPU" if ft.use_gpu else "CPU", 1)
    concurrent = cfg.max_concurrent_trials or max(1, int(cluster // per_trial))
    if cfg.searcher == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    else:  # a SearchGenerator given as search_alg ignores TuneConfig.max_concurrent_trials: limit it here
        search_alg = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.max_t, grace_period=cfg.grace_period,
                              reduction_factor=cfg.reduction_factor)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=cfg.objective, mode=OBJECTIVES[cfg.objective], search_alg=search_alg,
                                    scheduler=scheduler, num_samples=cfg.num_samples,
                                    max_concurrent_trials=concurrent if cfg.searcher == "optuna" else None),
        run_config=tune.RunConfig(name=study, storage_path=f"{storage}/{run_id}", verbose=0,
                                  callbacks=[TBXLoggerCallback(), placement_group_reaper()]))
    return tuner, False


def run_loss_search(cfg: LossSearchConfig) -> LossSearchResult:
    """Run (or resume) the ASHA search; writes ``runs`` + ``trials`` rows; returns the best trial."""
    from ray import tune

    space = search_space(cfg)
    base = resolve_data(cfg.finetune)  # synthetic suite / demo checkpoint defaults, resolved once, before Ray
    store = ResultsStore(cfg.results)
    run_id = cfg.run_id or "tune-" + new_run_id()
    storage = cfg.storage or store.uri("tune")
    study = f"loss__{cfg.finetune.train.loss}__{cfg.objective}"
    exp_dir = f"{storage}/{run_id}/{study}"
    objective, mode = cfg.objective, OBJECTIVES[cfg.objective]
    ray = init_ray(cfg.ray_address, cfg.num_cpus, verbose=cfg.verbose)
    with RunRecord(store, run_id, "tune_loss", to_json(cfg), cfg.seed).running():
        trainable = tune.with_resources(
            tune.with_parameters(loss_trial, base=to_dict(base), train_storage=f"{storage}/{run_id}/train"),
            {"cpu": 0.01},  # the driver only waits on the Train controller; the workers hold the real resources
        )
        tuner, restored = _tuner(cfg, ray, trainable, space, exp_dir, study, storage, run_id)
        grid = tuner.fit()
        reap_until_clean()
        params = [f"loss_cfg.{k}" for k in space.get("loss_cfg", {})] + (["lr"] if "lr" in space else [])
        rows = trial_rows(grid, run_id=run_id, study=study, model=cfg.finetune.train.model,
                          dataset=cfg.finetune.train.anomaly_set or "", objective=objective, mode=mode,
                          params=params, extra={"max_t": cfg.max_t, "loss": cfg.finetune.train.loss})
        write_trials(store, run_id, study, rows)
        ok = [r for r in grid if r.error is None and objective in (r.metrics or {})]
        if not ok:
            why = f"first error: {grid.errors[0]}" if grid.errors else f"none reported {objective}"
            raise RuntimeError(f"no trial of {study} finished ({len(grid)} trial(s); {why})")
        best = best_trial(ok, objective, mode, cfg.max_t)
        stopped = sum(1 for r in rows if r["status"] == "ok" and _iterations(r) < cfg.max_t)
        log(f"{study}: {len(rows)} trials, {stopped} stopped early by ASHA; best {objective} = "
            f"{best.metrics[objective]:.4f} with {best.config}")
    return LossSearchResult(run_id, study, grid.experiment_path, dict(best.config), float(best.metrics[objective]),
                            rows, bool(restored), best.metrics.get("checkpoint_path"),
                            hints(store, f"{storage}/{run_id}", run_id, study, SQL_COMPLETED.format(cfg.max_t)))


#: DuckDB condition on a ``trials`` row: the trial ran all ``max_t`` validations (was not stopped by ASHA).
SQL_COMPLETED = "CAST(json_extract(t.metrics_json, '$.iterations') AS INTEGER) >= {}"


def best_trial(results: list[Any], objective: str, mode: str, max_t: int) -> Any:
    """The best trial by its last ``objective``, among those that ran all ``max_t`` validations when there are any.

    Trials stopped by ASHA were already ranked below a rung's quantile, and their last value comes from an earlier
    (less trained) point than the survivors'; comparing it with the survivors' final values would mix stages."""
    full = [r for r in results if r.metrics.get("training_iteration", 0) >= max_t]
    pool = full or results
    pick = max if mode == "max" else min
    return pick(pool, key=lambda r: r.metrics[objective])


def _iterations(row: dict[str, Any]) -> int:
    return int(json.loads(row["metrics_json"]).get("iterations", 0))
