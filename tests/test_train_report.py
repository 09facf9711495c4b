"""What a Ray Train worker reports of ``fit``'s rows (``oodseg.platform.trainer.report_row``): every row reaches the
driver's progress queue from rank 0, but only validation and checkpoint rows are ``ray.train.report`` calls. A Train
report waits until the controller has collected the previous one at its next poll of the workers, so one per progress
line throttled training to a line per health-check interval (Ray's default 2 s)."""

from __future__ import annotations

import queue

import ray.train

from oodseg.platform.trainer import report_row


def test_progress_rows_go_to_the_queue_and_only_validation_or_checkpoint_rows_to_ray_train(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: calls.append((metrics, checkpoint)))
    saved, empty = tmp_path / "saved", tmp_path / "empty"
    saved.mkdir()
    empty.mkdir()
    (saved / "model.pt").write_bytes(b"x")
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9, "val_auprc": 0.4}, {"step": 3, "loss": 0.8},
            {"step": 4, "loss": 0.7}]
    dirs = [None, None, None, saved]
    for rank in (0, 1):
        calls.clear()
        progress: queue.Queue = queue.Queue()
        for row, directory in zip(rows, dirs):
            report_row(row, directory, rank, progress)
        assert [progress.get_nowait() for _ in range(progress.qsize())] == (rows if rank == 0 else [])
        assert [m for m, _ in calls] == [rows[1], rows[3]]
        assert calls[0][1] is None and calls[1][1].path == str(saved)
    calls.clear()
    report_row(rows[3], empty, 1)  # a rank that saved nothing this time still reports (Train's reports are in step)
    assert calls == [(rows[3], None)]
