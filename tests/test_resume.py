"""Which rerun resumes a fine-tuning run: the checkpoint's recorded fingerprint (``run.json``: the strategy and every
``TrainConfig`` field) must match except for what a resume may change (``steps``, ``log_every``); a refusal is one
line naming every differing key. The checkpoint directories here hold what a Ray Train run writes (``run.json`` from
``run_fingerprint``, ``history.json`` rows) and nothing else; ``tests/test_finetune.py`` resumes real runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from oodseg.config import ConfigError
from oodseg.platform.trainer import FinetuneConfig, check_resume, checkpoint_step, export_model
from oodseg.training.config import TrainConfig
from oodseg.training.loop import HISTORY, MODEL, RUN, run_fingerprint


def make_run(tmp_path: Path, step: int = 20, **train) -> FinetuneConfig:
    """A run config and, under its run directory, a checkpoint of it at ``step``."""
    cfg = FinetuneConfig(train=TrainConfig(data_root="/data/suite", init="/ckpt/demo.safetensors", steps=40,
                                           task_cfg={"a": 1}, **train),
                         name="run", storage_path=str(tmp_path))
    ckpt = tmp_path / "run" / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    (ckpt / RUN).write_text(json.dumps(run_fingerprint(cfg.train, cfg.strategy), default=list))
    (ckpt / HISTORY).write_text(json.dumps([{"step": s, "loss": 1.0} for s in range(10, step + 1, 10)]))
    return cfg


def changed(cfg: FinetuneConfig, **train) -> FinetuneConfig:
    return replace(cfg, train=replace(cfg.train, **train))


@pytest.mark.parametrize("change,named", [
    ({"task": "saom"}, "train.task 'segmentation' (this run: 'saom')"),
    ({"task_cfg": {"a": 2}}, "train.task_cfg {'a': 1} (this run: {'a': 2})"),
    ({"seed": 1}, "train.seed 0 (this run: 1)"),
    ({"train_split": "train_extra"}, "train.train_split 'train' (this run: 'train_extra')"),
    ({"global_batch": 4}, "train.global_batch 8 (this run: 4)"),
    ({"accum": 2}, "train.accum 1 (this run: 2)"),
    ({"crop": (64, 128)}, "train.crop [128, 256] (this run: [64, 128])"),
    ({"lr": 2e-3}, "train.lr 0.001 (this run: 0.002)"),
    ({"schedule": "poly"}, "train.schedule 'cosine' (this run: 'poly')"),
    ({"loss_cfg": {"weight": 0.1}}, "train.loss_cfg {} (this run: {'weight': 0.1})"),
    ({"init": "/ckpt/other.safetensors"}, "train.init '/ckpt/demo.safetensors'"),
    ({"data_root": "/data/other"}, "train.data_root '/data/suite' (this run: '/data/other')"),
])
def test_a_changed_key_is_refused_naming_it(tmp_path, change, named):
    cfg = make_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_resume(changed(cfg, **change))
    text = str(err.value)
    assert named in text and "\n" not in text and text.endswith("instead of resuming it")


def test_every_differing_key_is_named_in_one_line(tmp_path):
    cfg = make_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_resume(replace(changed(cfg, seed=3, lr=0.5), strategy="ddp"))
    text = str(err.value)
    assert "strategy 'deepspeed' (this run: 'ddp'), train.lr 0.001 (this run: 0.5), train.seed 0 (this run: 3)" \
        in text and "\n" not in text


def test_only_steps_and_log_every_may_change(tmp_path):
    cfg = make_run(tmp_path)
    last = check_resume(cfg)
    assert last is not None and checkpoint_step(last) == 20
    assert check_resume(changed(cfg, steps=80, log_every=5)) == last  # train on to 80 steps
    assert check_resume(changed(cfg, steps=20)) == last  # the checkpoint's own step: finished there
    with pytest.raises(ConfigError, match="has trained 20 steps; --steps 10 cannot resume it"):
        check_resume(changed(cfg, steps=10))
    assert check_resume(replace(cfg, name="another")) is None  # a new run


def test_a_checkpoint_of_an_older_fingerprint_compares_the_keys_it_recorded(tmp_path):
    """Checkpoints written before the fingerprint held every field (17 keys) still resume, and are still checked
    on those keys."""
    cfg = make_run(tmp_path)
    run_json = next((tmp_path / "run").glob("checkpoint_*")) / RUN
    old = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({k: old[k] for k in ("strategy", "task", "task_cfg", "model", "seed", "steps")}))
    assert check_resume(changed(cfg, lr=0.5)) is not None
    with pytest.raises(ConfigError, match="train.seed 0"):
        check_resume(changed(cfg, seed=1))


def test_storage_given_as_a_uri_resumes_and_exports_through_its_filesystem(tmp_path):
    """``storage_path`` as a URI (``file://`` here; ``s3://bucket/prefix`` goes through the same ``pyarrow.fs`` calls):
    the checkpoint is found and checked there, and the model is exported from it to a path or another URI."""
    cfg = make_run(tmp_path)
    ckpt = next((tmp_path / "run").glob("checkpoint_*"))
    (ckpt / MODEL).write_bytes(b"weights")
    uri = replace(cfg, storage_path=f"file://{tmp_path}")
    last = check_resume(uri)
    assert last is not None and checkpoint_step(last) == 20 and last.has(MODEL) and str(last) == str(ckpt)
    with pytest.raises(ConfigError, match=f"{tmp_path}/run: a run named 'run' exists with train.seed 0"):
        check_resume(changed(uri, seed=1))
    assert uri.export_path == f"file://{tmp_path}/run.safetensors"
    assert export_model(last, uri.export_path) == uri.export_path
    assert export_model(last, str(tmp_path / "out" / "m.safetensors")) == str(tmp_path / "out" / "m.safetensors")
    assert (tmp_path / "run.safetensors").read_bytes() == (tmp_path / "out" / "m.safetensors").read_bytes() == b"weights"
    assert not list(tmp_path.glob("out/.*"))  # the local copy went through a temporary name
