"""Trainer settings that express SAOM's release recipe (configs/saom_released.yaml): AdamW epsilon, weight decay on
every parameter, a cosine schedule stepped once an epoch, fp16 autocast with a GradScaler. Each against an
independent reference: torch's own AdamW update rule, ``CosineAnnealingLR`` stepped per epoch, an fp32 gradient."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from oodseg.training.config import TrainConfig
from oodseg.training.data import step_items
from oodseg.training.strategy import LocalStrategy, build_optimizer


class Affine(nn.Module):
    """A 2-d weight and a 1-d bias: the two kinds of tensor weight decay treats differently."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_adamw_eps_and_weight_decay_on_every_parameter():
    model = Affine()
    default = build_optimizer(list(model.parameters()), TrainConfig(weight_decay=0.01))
    assert [(g["weight_decay"], g["eps"], len(g["params"])) for g in default.param_groups] == [(0.01, 1e-8, 1),
                                                                                              (0.0, 1e-8, 1)]
    released = build_optimizer(list(model.parameters()), TrainConfig(weight_decay=0.01, adam_eps=1e-4, decay_1d=True))
    assert [(g["weight_decay"], g["eps"], len(g["params"])) for g in released.param_groups] == [(0.01, 1e-4, 2)]
    # with a zero gradient AdamW only decays: p ← p · (1 − lr · wd), the bias included
    bias = model.lin.bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    released.step()
    torch.testing.assert_close(model.lin.bias.detach(), bias * (1 - 1e-3 * 0.01))
    with pytest.raises(ValueError, match="adam_eps"):
        TrainConfig(adam_eps=0.0)


def _lrs(cfg: TrainConfig, epoch_len: int) -> list[float]:
    strategy = LocalStrategy(device="cpu")
    strategy.setup(Affine(), list(Affine().parameters()), cfg, epoch_len=epoch_len)
    seen = []
    for _ in range(cfg.steps):
        seen.append(strategy.lr)
        strategy.optimizer.step()
        strategy.scheduler.step()
    return seen


def test_cosine_per_epoch_equals_cosine_annealing_stepped_each_epoch():
    # 12 samples, 4 per step: 3 steps an epoch, 5 epochs; the reference is torch's CosineAnnealingLR(T_max=5)
    cfg = TrainConfig(lr=0.1, schedule="cosine", warmup=0, steps=15, global_batch=4, lr_per="epoch")
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=5)
    per_epoch = []
    for _ in range(5):
        per_epoch.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    lrs = _lrs(cfg, epoch_len=12)
    assert lrs == pytest.approx([per_epoch[k // 3] for k in range(15)], rel=1e-12, abs=1e-15)
    assert lrs != pytest.approx(_lrs(replace(cfg, lr_per="step"), 12))  # per optimizer step: another curve


def test_cosine_per_epoch_follows_the_data_epochs_when_they_split_a_step():
    # 10 samples, 4 per step: epochs end inside steps; a step's LR is that of the epoch its first sample is in
    cfg = TrainConfig(lr=1.0, schedule="cosine", warmup=0, steps=10, global_batch=4, lr_per="epoch")
    epochs = [step_items(k, n=10, global_batch=4, seed=0)[0][0][1] for k in range(10)]
    assert epochs == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    expected = [0.5 * (1 + math.cos(math.pi * e / 4)) for e in epochs]  # 10 steps × 4 / 10 = 4 epochs
    assert _lrs(cfg, epoch_len=10) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="lr_per"):
        TrainConfig(lr_per="epochs")


def _step(precision: str) -> tuple[LocalStrategy, list[torch.dtype]]:
    strategy = LocalStrategy(device="cpu")
    model = Affine()
    strategy.setup(model, list(model.parameters()), TrainConfig(lr=1e-3, weight_decay=0.0, precision=precision))
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    dtypes = []

    def loss(module: nn.Module, mb: dict) -> torch.Tensor:  # a task's loss: the strategy chose the precision
        out = module(mb["x"])
        dtypes.append(out.dtype)
        return out.float().square().mean()

    strategy.step([{"x": x}], loss)
    return strategy, dtypes


def test_fp16_autocast_steps_through_a_grad_scaler():
    default, dtypes = _step("auto")
    assert default.scaler is None and dtypes == [torch.float32]  # CPU: fp32 unless asked (CUDA: bf16)
    fp16, dtypes = _step("fp16")
    assert isinstance(fp16.scaler, torch.amp.GradScaler) and dtypes == [torch.float16]
    assert fp16.scaler.get_scale() == 2.0 ** 16  # the loss was scaled, and no overflow skipped the step
    # the gradient the optimizer saw is unscaled: it matches the fp32 gradient to fp16 precision
    reference = Affine()
    reference(torch.linspace(-1, 1, 8).reshape(2, 4)).square().mean().backward()
    torch.testing.assert_close(fp16.model.lin.weight.grad, reference.lin.weight.grad, rtol=1e-2, atol=1e-3)
    assert not torch.equal(fp16.model.lin.weight.detach(), reference.lin.weight.detach())  # the step was taken


def test_fp16_scaler_state_is_checkpointed(tmp_path):
    strategy, _ = _step("fp16")
    strategy.scaler.update(1024.0)
    strategy.save(tmp_path, step=1)
    resumed = LocalStrategy(device="cpu")
    model = Affine()
    resumed.setup(model, list(model.parameters()), TrainConfig(lr=1e-3, precision="fp16"))
    assert resumed.load(tmp_path) == 1 and resumed.scaler.get_scale() == 1024.0
