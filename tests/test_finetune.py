"""Ray Train fine-tuning (DeepSpeed ZeRO-1 / DDP on CPU + gloo): data-parallel equivalence, fault recovery, resume.

Runs share one tiny Cityscapes-format dataset written here in the real layout (trainId labels without void, so
every image has the same number of labelled pixels) and a tiny ERFNet with BatchNorm on running statistics and no
dropout (``frozen_stats``): then one optimizer step on a global batch of 4 is the same computation whether one
worker sees 4 images or two workers see 2 each (DeepSpeed / DDP average the per-rank mean gradients), and the
loss curves must agree up to float rounding. TDOS (tiny random CLIP, its own loss) trains on the same trainer with
two DeepSpeed workers and resumes from its checkpoint when rerun with more steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch
from PIL import Image

from oodseg.config import ConfigError
from oodseg.platform.trainer import FinetuneConfig, check_resume, run_finetune
from oodseg.training.config import TrainConfig
from oodseg.training.strategy import DeepSpeedStrategy

pytestmark = pytest.mark.slow
STEPS = 6
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the step hook runs inside Ray workers


class FaultAt:
    """Test-only step hook: rank ``rank`` exits at ``step`` unless ``marker`` exists (so only on the first attempt).
    It waits until the checkpoints reported before are committed: a report still in flight when the worker group
    fails is dropped by Ray Train, which would make "resume from the step-k checkpoint" a race."""

    def __init__(self, step: int, rank: int, marker: Path) -> None:
        self.step, self.rank, self.marker = step, rank, Path(marker)

    def __call__(self, step: int, rank: int) -> None:
        import ray.train

        if step != self.step or rank != self.rank or self.marker.exists():
            return
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                               timeout_s=120)
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"rank {rank} exited at step {step}\n")
        os._exit(1)


@pytest.fixture(scope="module")
def city_root(tmp_path_factory) -> Path:
    """8 train images 32x64 with smooth random trainId maps (no 255) in Cityscapes file naming."""
    root = tmp_path_factory.mktemp("cs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        img_dir, gt_dir = root / "leftImg8bit" / split / "tiny", root / "gtFine" / split / "tiny"
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        for i in range(n):
            coarse = rng.integers(0, 19, (4, 8), dtype=np.uint8)
            label = np.kron(coarse, np.ones((8, 8), dtype=np.uint8))
            image = (label[..., None] * np.array([13, 7, 3], dtype=np.uint8) + rng.integers(0, 40, (32, 64, 3))
                     ).astype(np.uint8)
            Image.fromarray(image).save(img_dir / f"tiny_{i:06d}_000000_leftImg8bit.png")
            Image.fromarray(label).save(gt_dir / f"tiny_{i:06d}_000000_gtFine_labelTrainIds.png")
    return root


def _cfg(city_root: Path, storage: Path, name: str, workers: int, **kw) -> FinetuneConfig:
    tc = TrainConfig(model_cfg={"width": 0.25, "input_size": None}, data_root=str(city_root), val_split="",
                     anomaly_set=None, steps=STEPS, global_batch=4, crop=(32, 64), scale=(1.0, 1.0), hflip=False,
                     frozen_stats=True, lr=5e-3, warmup=1, log_every=1)
    return FinetuneConfig(train=tc, name=name, storage_path=str(storage), num_workers=workers, zero_stage=1,
                          checkpoint_every=2, extensions_dir=str(storage / "ext"), **kw)


def _tdos_cfg(city_root: Path, storage: Path, steps: int) -> FinetuneConfig:
    """TDOS (tiny random CLIP) with its own loss, two DeepSpeed workers (issue: TDOS trains on the same trainer)."""
    tc = TrainConfig(model="tdos", model_cfg={"clip": "tiny", "window": 64}, loss="tdos",
                     loss_cfg={"num_points": 64, "align_pixels": 256}, data_root=str(city_root), val_split="",
                     anomaly_set=None, steps=steps, global_batch=4, crop=(32, 64), scale=(1.0, 1.0), lr=1e-3,
                     warmup=1, log_every=1)
    return FinetuneConfig(train=tc, name="tdos", storage_path=str(storage), num_workers=2, zero_stage=1,
                          checkpoint_every=2, extensions_dir=str(storage / "ext"))


@pytest.fixture(scope="module")
def runs(ray_session, city_root, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    marker = storage / "fault.marker"
    out = {
        "one": run_finetune(_cfg(city_root, storage, "one", 1)),
        "fault": run_finetune(_cfg(city_root, storage, "fault", 2, export=str(storage / "export" /
                                                                                "model.safetensors")),
                              step_hook=FaultAt(4, 1, marker)),
    }
    out["ddp"] = run_finetune(_cfg(city_root, storage, "ddp", 2, strategy="ddp"))
    tdos = _tdos_cfg(city_root, storage, steps=2)
    out["tdos"] = run_finetune(tdos)
    longer = replace(tdos, train=replace(tdos.train, steps=4))
    assert check_resume(longer) is not None  # same run, more steps: resumes
    out["tdos_rerun"] = run_finetune(longer)
    out["marker"] = marker
    out["storage"] = storage
    return out


def _losses(result) -> np.ndarray:
    rows = sorted(result.history, key=lambda r: r["step"])
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return np.array([r["loss"] for r in rows])


def test_zero1_two_workers_match_one_worker_with_the_same_global_batch(runs):
    """Steps 1-2 of the two-worker run precede the injected fault: pure data-parallel equivalence."""
    one, two = _losses(runs["one"]), _losses(runs["fault"])
    assert len(one) == len(two) == STEPS
    assert one[-1] < one[0]  # it trains
    np.testing.assert_allclose(two[:2], one[:2], rtol=2e-4, atol=1e-5)


def test_two_worker_ddp_matches_one_worker_deepspeed(runs):
    """The plain DDP strategy computes the same updates (AdamW, LambdaLR) as DeepSpeed ZeRO-1 in fp32."""
    np.testing.assert_allclose(_losses(runs["ddp"]), _losses(runs["one"]), rtol=2e-4, atol=1e-5)


def test_killed_worker_resumes_from_last_checkpoint_and_continues_the_same_curve(runs):
    assert runs["marker"].read_text().startswith("rank 1 exited at step 4")
    rows = sorted(runs["fault"].history, key=lambda r: r["step"])
    resumed = [r for r in rows if r["step"] > 2]
    assert resumed and all(r["start_step"] == 2 for r in resumed)  # restarted from the step-2 checkpoint
    assert rows[-1]["step"] == STEPS
    # exact data order + restored weights/ZeRO optimizer partitions/scheduler: steps 3-6 equal the reference
    np.testing.assert_allclose(_losses(runs["fault"])[2:], _losses(runs["one"])[2:], rtol=2e-4, atol=1e-5)


def test_fault_run_exports_to_the_given_path(runs):
    from oodseg.models import create_model
    from oodseg.models.checkpoint import read_safetensors_metadata

    export = Path(runs["fault"].model_path)
    assert export.name == "model.safetensors" and "export" in export.parts
    model = create_model(checkpoint=export)
    assert json.loads(read_safetensors_metadata(export)["oodseg.finetune.config"])["train"]["steps"] == STEPS
    assert torch.isfinite(model.predict(torch.zeros(1, 32, 64, 3, dtype=torch.uint8)).logits).all()


def test_tdos_two_deepspeed_workers_resume_and_export_a_p_ood_model(runs):
    """TDOS trains with DeepSpeed on two workers; a rerun with more steps resumes from the step-2 checkpoint; the
    export rebuilds TDOS alone and its ``ood`` channel feeds ``p_ood``."""
    from oodseg.models import create_model
    from oodseg.scoring import create_scorer

    first = sorted(runs["tdos"].history, key=lambda r: r["step"])
    assert [r["step"] for r in first] == [1, 2] and all(np.isfinite(r["loss"]) for r in first)
    rows = sorted(runs["tdos_rerun"].history, key=lambda r: r["step"])
    assert [r["start_step"] for r in rows if r["step"] > 2] == [2, 2]
    assert rows[-1]["step"] == 4
    model = create_model(checkpoint=runs["tdos_rerun"].model_path).eval()
    assert type(model).__name__ == "TDOS" and model.ood_channels == (19,)
    with torch.inference_mode():
        p = create_scorer("p_ood")(model.predict(torch.zeros(1, 32, 64, 3, dtype=torch.uint8)))
    assert p.shape == (1, 32, 64) and bool(((p >= 0) & (p <= 1)).all())


def test_resume_refuses_another_loss_model_or_strategy(runs, city_root):
    """The README trap: a rerun under an existing name with another loss or strategy must not silently resume."""
    base = _cfg(city_root, runs["storage"], "fault", 2)
    for other, what in ((replace(base, train=replace(base.train, loss="logitnorm")), "loss 'ce'"),
                        (replace(base, strategy="ddp"), "strategy 'deepspeed'"),
                        (replace(base, train=replace(base.train, model_cfg={"width": 0.5, "input_size": None})),
                         "model_cfg")):
        with pytest.raises(ConfigError, match=what):
            check_resume(other)
    assert check_resume(replace(base, name="fresh")) is None


def test_deepspeed_config_batch_arithmetic(city_root, tmp_path):
    cfg = _cfg(city_root, tmp_path, "x", 2)
    cfg = replace(cfg, train=replace(cfg.train, global_batch=8, accum=2))
    ds = DeepSpeedStrategy(device="cpu", rank=0, world=2).config(cfg.train)
    # DeepSpeed requires train_batch_size = micro_batch * accum * world
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == ds["train_batch_size"] == 8
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"] is False
    with pytest.raises(ValueError, match="divisible"):
        replace(cfg, num_workers=3)
    assert not any(f.name.startswith("fault") for f in dataclasses.fields(FinetuneConfig))  # test hooks stay out
    with pytest.raises(ValueError, match="zero_stage"):
        replace(cfg, zero_stage=3)
