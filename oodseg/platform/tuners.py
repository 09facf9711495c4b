"""Ray Tune searches of oodseg: shared pieces and the two public entry points.

* :func:`oodseg.platform.tune_temperature.run_temperature_search` — post-hoc temperature ``T`` of a scorer, for
  both placements, scored on the benchmark's fp16 *output cache*: trials never run the model.
* :func:`oodseg.platform.tune_loss.run_loss_search` — loss hyper-parameters (OE weight, ``τ_in``/``τ_out``,
  LogitNorm ``τ``, EIM scale, learning rate) with ASHA, each trial a Ray Train (V2) ``TorchTrainer`` run.

This module holds what both share:

* :func:`tune_space` turns the declared spaces of ``scorer_space(name)`` / ``loss_space(name)``
  (``{"type": "loguniform"|"uniform"|"choice"|"randint", ...}``) into Ray Tune domains.
* :func:`tune_run_row` / :func:`trial_rows` write the ``runs`` row of a search and one ``trials`` row per trial
  (``params_json``, ``objective``, ``value``, ``metrics_json``, ``status``) through the results store
  (:class:`oodseg.platform.results.ResultsStore`), so ``SELECT … FROM trials JOIN runs USING (run_id)`` works.
* :class:`PlacementGroupReaper`, a Tune callback: when Tune stops a trial (ASHA, or the end of the trial function),
  it kills the trial actor, and with it the Ray Train controller actor that the trial started. The controller's
  worker placement group is not fate-shared with its creator (Ray scopes it to the job), and Ray Train's own
  ``PlacementGroupCleaner`` finds dead controllers through the State API, which needs the dashboard and a single
  Ray instance per host. Without a dashboard (tests, ``include_dashboard=False``) every stopped trial leaks its
  workers' CPUs/GPUs and later trials wait forever. The reaper removes placement groups whose creator *actor* is
  dead (driver-created ones, such as Tune's own, are never touched), from the GCS table directly.
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from oodseg.platform.results import ResultsStore, safe_key

#: The declared-space types understood by :func:`tune_space` (the scorer/loss registries' format).
SPACE_TYPES = ("loguniform", "uniform", "choice", "randint")


def tune_space(declared: Mapping[str, Mapping[str, Any]], only: Iterable[str] | None = None) -> dict[str, Any]:
    """Ray Tune domains for a declared space ``{param: {"type": …, …}}``; ``only`` keeps a subset of params.

    ``loguniform``/``uniform`` need ``low < high`` (``low > 0`` for log); ``choice`` needs a non-empty ``values``;
    ``randint`` samples ``[low, high)``. Anything else raises ``ValueError`` naming the parameter.
    """
    from ray import tune

    keep = None if only is None else set(only)
    if keep is not None and keep - set(declared):
        raise ValueError(f"parameters {sorted(keep - set(declared))} are not in the declared space {sorted(declared)}")
    out: dict[str, Any] = {}
    for name, spec in declared.items():
        if keep is not None and name not in keep:
            continue
        kind = spec.get("type")
        if kind in ("loguniform", "uniform", "randint"):
            low, high = spec.get("low"), spec.get("high")
            if low is None or high is None or not low < high or (kind == "loguniform" and low <= 0):
                raise ValueError(f"space of {name!r}: {kind} needs low < high (low > 0 for log), got {dict(spec)}")
            domain = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind]
            out[name] = domain(low, high)
        elif kind == "choice":
            values = list(spec.get("values") or [])
            if not values:
                raise ValueError(f"space of {name!r}: choice needs a non-empty 'values', got {dict(spec)}")
            out[name] = tune.choice(values)
        else:
            raise ValueError(f"space of {name!r}: type must be one of {SPACE_TYPES}, got {kind!r}")
    return out


def in_space(value: Any, spec: Mapping[str, Any]) -> bool:
    """Whether ``value`` lies in one declared-space entry (used to validate fixed points such as the T grid)."""
    kind = spec["type"]
    if kind == "choice":
        return value in spec["values"]
    return spec["low"] <= value <= spec["high"]


# ------------------------------------------------------------------------------------------------------------------
# Results store rows
# ------------------------------------------------------------------------------------------------------------------


def _finite(x: Any) -> Any:
    """JSON-safe scalar: numpy → Python, NaN/inf → None."""
    if hasattr(x, "item"):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def json_metrics(metrics: Mapping[str, Any]) -> str:
    """Scalars of a Tune result (no ``config``, no nested dicts) as sorted JSON."""
    plain = {k: _finite(v) for k, v in metrics.items() if k != "config" and not isinstance(v, (dict, list))}
    return json.dumps(plain, sort_keys=True, default=str)


def tune_run_row(run_id: str, job: str, config_json: str, seed: int, status: str, started_at: datetime,
                 wall_s: float | None = None) -> dict[str, Any]:
    """The ``runs`` row of one search (the benchmark's columns; ``job`` = ``tune_temperature`` | ``tune_loss``)."""
    from oodseg.platform.pipeline import git_sha, package_versions

    row: dict[str, Any] = {
        "run_id": run_id, "attempt": run_id, "job": job, "status": status, "started_at": started_at,
        "config_json": config_json, "git_sha": git_sha(), "versions_json": json.dumps(package_versions()),
        "seed": seed, "host": socket.gethostname(),
    }
    if status != "running":
        row.update(finished_at=datetime.now(timezone.utc), wall_s=wall_s)
    return row


def write_run_row(store: ResultsStore, row: Mapping[str, Any]) -> None:
    store.write_part("runs", safe_key(row["run_id"], row["job"]), [dict(row)])


def trial_rows(result_grid: Any, *, run_id: str, study: str, model: str, dataset: str, objective: str,
               params: Iterable[str], extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One ``trials`` row per Tune trial of ``result_grid``.

    ``value`` is the trial's last reported ``objective`` (what ASHA and the searcher compared); ``metrics_json``
    holds every scalar of the last result plus ``iterations`` (reports made) and ``best_<objective>`` over the
    trial's history; ``status`` is ``ok`` or ``error``.
    """
    names = list(params)
    rows = []
    now = datetime.now(timezone.utc)
    for result in result_grid:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        history = result.metrics_dataframe
        scalars = json.loads(json_metrics(metrics))
        scalars["iterations"] = int(metrics.get("training_iteration", 0) or 0)
        if history is not None and objective in history:
            col = history[objective].dropna()
            if len(col):
                scalars[f"history_{objective}"] = [float(v) for v in col]
        scalars.update(extra or {})
        if result.error is not None:
            scalars["error"] = str(result.error)[-2000:]
        trial_id = metrics.get("trial_id") or (_trial_id_from_dir(result.path) if result.path else "")
        rows.append(
            {
                "run_id": run_id, "study": study, "trial_id": str(trial_id),
                "model": model, "dataset": dataset,
                "params_json": json.dumps({k: _finite(_flat_get(config, k)) for k in names}, sort_keys=True),
                "objective": objective, "value": _finite(metrics.get(objective)),
                "metrics_json": json.dumps(scalars, sort_keys=True, default=str),
                "status": "error" if result.error is not None else "ok", "finished_at": now,
            }
        )
    return rows


def _trial_id_from_dir(path: str) -> str:
    """``<trainable>_<exp>_<index>_<i>_<params>_<date>`` → ``<exp>_<index>`` (Tune's trial directory name)."""
    parts = str(path).rstrip("/").rsplit("/", 1)[-1].split("_")
    for i in range(len(parts) - 1):
        if len(parts[i]) == 5 and parts[i + 1].isdigit() and len(parts[i + 1]) == 5:
            return f"{parts[i]}_{parts[i + 1]}"
    return ""


def _flat_get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def write_trials(store: ResultsStore, run_id: str, study: str, rows: list[dict[str, Any]]) -> str:
    """Atomically write one study's ``trials`` part (rewritten, not duplicated, when a study is resumed)."""
    return store.write_part("trials", safe_key(run_id, study), rows)


def logdir_hints(store: ResultsStore, experiment_dir: str, run_id: str, study: str, mode: str = "max",
                 where: str = "") -> str:
    """How to look at a search: TensorBoard, the Ray dashboard and a DuckDB one-liner for the best trial
    (``where``: an extra SQL condition on the trials row ``t``)."""
    order = "DESC" if mode == "max" else "ASC"
    query = (
        f"SELECT t.trial_id, t.value, t.params_json, r.job FROM '{store.base}/trials/*.parquet' t "
        f"JOIN '{store.base}/runs/*.parquet' r USING (run_id) "
        f"WHERE t.run_id = '{run_id}' AND t.study = '{study}'{' AND ' + where if where else ''} "
        f"ORDER BY t.value {order} LIMIT 1"
    )
    return "\n".join(
        [
            f"TensorBoard  : tensorboard --logdir {experiment_dir}",
            "Ray dashboard: http://127.0.0.1:8265 while the job runs (a cluster: the head's :8265) → Jobs and Actors "
            "(one actor per running trial); export RAY_TRAIN_ENABLE_STATE_TRACKING=1 before `ray start` / the job to "
            "also list each loss trial's Train run under 'Train'",
            f'Best trial   : python -c "import duckdb; print(duckdb.sql(\\"{query}\\"))"',
        ]
    )


# ------------------------------------------------------------------------------------------------------------------
# Ray helpers
# ------------------------------------------------------------------------------------------------------------------


def init_ray(address: str = "", num_cpus: int = 0):
    """Connect to ``address`` / ``$RAY_ADDRESS`` or start a local Ray (dashboard on, so Train's State-API cleanup
    and the dashboard work); reuses an initialised Ray (tests)."""
    import os

    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"configure_logging": False}
    if address is None and num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(address=address, **kwargs)
    return ray


def reap_orphan_placement_groups() -> int:
    """Remove placement groups whose creator actor is dead (leaked by killed Ray Train controllers); returns how
    many. Driver-created groups (no creator actor) and detached ones are left alone."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached or not pg.creator_actor_dead:
            continue
        if not pg.creator_actor_id or ray.ActorID(pg.creator_actor_id).is_nil():
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    return removed


def reap_until_clean(timeout_s: float = 15.0, poll_s: float = 0.5) -> int:
    """After a search: keep reaping until no actor-created placement group is left or ``timeout_s`` passes (the
    last stopped trial's Train controller dies only after ``Tuner.fit`` has returned); returns how many went."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    removed, deadline = 0, time.monotonic() + timeout_s
    while True:
        removed += reap_orphan_placement_groups()
        left = 0
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if (pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and not pg.is_detached and pg.creator_actor_id
                    and not ray.ActorID(pg.creator_actor_id).is_nil()):
                left += 1
        if not left or time.monotonic() > deadline:
            return removed
        time.sleep(poll_s)


def placement_group_reaper(interval_s: float = 2.0):
    """A Tune callback running :func:`reap_orphan_placement_groups` at most every ``interval_s`` seconds of the
    Tune loop (see the module docstring for why)."""
    from ray import tune

    class PlacementGroupReaper(tune.Callback):
        def __init__(self) -> None:
            self.last = 0.0
            self.removed = 0

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            if time.monotonic() - self.last >= interval_s:
                self.last = time.monotonic()
                self.removed += reap_orphan_placement_groups()

    return PlacementGroupReaper()


def log(msg: str) -> None:
    import sys

    print(f"[oodseg tune {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
