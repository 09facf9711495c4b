"""``RunRecord.running``: the one start/finish block of every job writes the ``runs`` row's final status."""

from __future__ import annotations

import contextlib
import errno
import os

import pytest

from oodseg.platform.results import ResultsStore
from oodseg.platform.runs import RunRecord


def _status(store: ResultsStore, run_id: str) -> str:
    runs = store.read("runs")
    return runs.loc[runs["run_id"] == run_id, "status"].item()


@pytest.mark.parametrize("error,status", [(None, "finished"), (ValueError("bad"), "failed"),
                                          (KeyboardInterrupt(), "interrupted")])
def test_running_records_the_outcome_and_reraises(tmp_path, error, status):
    store = ResultsStore(str(tmp_path))
    record = RunRecord(store, "r1", "finetune", "{}")
    with pytest.raises(type(error)) if error is not None else contextlib.nullcontext():
        with record.running() as inside:
            assert inside is record and _status(store, "r1") == "running"
            if error is not None:
                raise error
    assert _status(store, "r1") == status and record.row["wall_s"] >= 0


def test_a_status_row_that_cannot_be_written_does_not_hide_the_error(tmp_path):
    store = ResultsStore(str(tmp_path))
    record = RunRecord(store, "r1", "benchmark", "{}")

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RuntimeError, match="the body's error"):
        with record.running():
            store.write_part = full  # the disk fills up during the run
            raise RuntimeError("the body's error")



@pytest.mark.parametrize("option,env,expected", [("", None, "local"), ("", "ray://head:10001", "ray://head:10001"),
                                                 ("auto", "ray://head:10001", "auto")])
def test_init_ray_starts_its_own_ray_unless_given_an_address(monkeypatch, option, env, expected):
    """No ``--ray-address`` and no ``$RAY_ADDRESS``: a new local Ray with the job's CPUs, never the cluster someone
    started on this machine (plain ``ray.init()`` joins that one and then refuses ``num_cpus``)."""
    import ray

    from oodseg.platform.runs import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append({**kw, "arena": os.environ.get("MALLOC_ARENA_MAX")}))
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    init_ray(option, num_cpus=2)
    assert calls[0]["address"] == expected
    assert calls[0].get("num_cpus") == (2 if expected == "local" else None)
    # a local Ray's processes start with one malloc arena (oodseg.process); this process's environment is unchanged
    assert calls[0]["arena"] == ("1" if expected == "local" else None) and "MALLOC_ARENA_MAX" not in os.environ


def test_local_ray_env_keeps_what_the_user_set(monkeypatch):
    from oodseg.process import local_ray_env

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    with local_ray_env():
        assert os.environ["MALLOC_ARENA_MAX"] == "4"
    assert os.environ["MALLOC_ARENA_MAX"] == "4"


def test_session_ray_workers_get_the_local_ray_environment(ray_session):
    """The test session's Ray starts as a job's local Ray does: its workers see ``MALLOC_ARENA_MAX=1`` and Ray Train's
    0.5 s health-check interval (where Train's controller, itself a worker, reads it)."""

    @ray_session.remote(num_cpus=0)
    def env() -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in ("MALLOC_ARENA_MAX", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}

    assert ray_session.get(env.remote()) == {"MALLOC_ARENA_MAX": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
