"""``RunRecord.running``: the one start/finish block of every job writes the ``runs`` row's final status."""

from __future__ import annotations

import contextlib
import errno

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

