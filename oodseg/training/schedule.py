"""Learning-rate schedules: linear warmup followed by cosine or polynomial decay.

``lr(step) = base_lr · f(step)`` with

* warmup (``step < warmup``): ``f = (step + 1) / warmup`` (linear ramp, never exactly 0 so step 0 already learns);
* cosine (Loshchilov & Hutter, "SGDR", ICLR 2017): ``f = m + (1 - m) · ½ (1 + cos(π · p))``;
* poly (Chen et al., DeepLab, TPAMI 2018; the usual schedule for ERFNet/Cityscapes): ``f = m + (1 - m) · (1 - p)^power``;

where ``p = (step - warmup) / max(1, total - warmup)`` clipped to ``[0, 1]`` and ``m = min_ratio``. Stepped per epoch
(``steps_per_epoch`` given; a torch scheduler stepped once an epoch, as SAOM's release ``CosineAnnealingLR``), the
decay is held through an epoch: ``step`` is taken back to the start of its epoch, ``⌊step / E⌋ · E`` with ``E``
optimizer steps per epoch (a fraction when the training set is not a multiple of the global batch), so with no
warmup ``p = epoch / epochs``.
The same multiplier drives the plain-torch loop (``torch.optim.lr_scheduler.LambdaLR``) and DeepSpeed (a client
``LambdaLR`` passed to ``deepspeed.initialize``), so both strategies follow an identical curve.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import partial

import torch

SCHEDULES = ("cosine", "poly", "constant")
LR_PER = ("step", "epoch")


def lr_factor(
    step: int, *, total: int, warmup: int = 0, kind: str = "cosine", power: float = 0.9, min_ratio: float = 0.0,
    steps_per_epoch: Fraction | None = None,
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based); per epoch when ``steps_per_epoch``
    is given.

    Args:
        total: optimizer steps of the whole run (``p`` reaches 1 there).
        warmup: steps of the linear ramp; 0: none.
        kind: ``"cosine"``, ``"poly"`` or ``"constant"`` (1 after warmup).
        power: exponent of ``"poly"``.
        min_ratio: ``m``, the factor the decay ends at.
        steps_per_epoch: ``E`` (may be fractional) to hold the decay through each epoch; None: decay every step.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if steps_per_epoch is not None:
        step = (step // steps_per_epoch) * steps_per_epoch
    p = min(1.0, max(0.0, float(step - warmup) / max(1, total - warmup)))
    decay = 0.5 * (1.0 + math.cos(math.pi * p)) if kind == "cosine" else (1.0 - p) ** power
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total: int,
    warmup: int = 0,
    kind: str = "cosine",
    power: float = 0.9,
    min_ratio: float = 0.0,
    steps_per_epoch: Fraction | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every parameter group (stepped once per optimizer step; the
    factor itself moves once an epoch when ``steps_per_epoch`` is given).

    Args:
        total, warmup, kind, power, min_ratio, steps_per_epoch: as in :func:`lr_factor`.
    """
    fn = partial(lr_factor, total=total, warmup=warmup, kind=kind, power=power, min_ratio=min_ratio,
                 steps_per_epoch=steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
