"""One optimizer step, shared by the single-process loop, Ray DDP and Ray DeepSpeed workers.

A step consumes ``accum`` micro-batches (dicts from ``oodseg.training.data.collate``) and performs one optimizer
update on their mean loss (each micro-loss is scaled by ``1/accum`` before backward; DeepSpeed applies the same
scaling itself when ``gradient_accumulation_steps = accum``). Returns the mean unscaled micro-batch loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from oodseg.losses.base import loss_info


def forward_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    *,
    forward: Callable[[torch.Tensor], Any] | None = None,
    autocast_dtype: torch.dtype | None = None,
    input_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Preprocess ``batch['images']`` with ``model``, run ``forward`` (default ``model``; a DDP wrapper or a
    DeepSpeed engine in distributed runs) under optional autocast, and return the loss against the batch targets.
    ``input_dtype`` casts the network input (a bf16 DeepSpeed engine holds bf16 weights)."""
    device = model.device if hasattr(model, "device") else next(model.parameters()).device
    x = model.preprocess(batch["images"].to(device, non_blocking=True))
    if input_dtype is not None:
        x = x.to(input_dtype)
    ctx = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    target = batch["target"].to(device, non_blocking=True)
    mask = batch.get("outlier_mask")
    mask = None if mask is None else mask.to(device, non_blocking=True)
    if not getattr(model, "own_loss", False):
        kwargs = {"target": target, "outlier_mask": mask} if getattr(model, "wants_targets", False) else {}
        with ctx:
            out = (forward or model)(x, **kwargs)
        return loss_fn(out, target, mask)
    # A model with a loss of its own (EoMT's mask-classification loss, computed in its forward pass): the loss's
    # registration says whether it *is* that objective (``ce``) or adds a term to it (``oe``); per-pixel-only
    # losses raise a TypeError naming themselves.
    with ctx:
        out, own = (forward or model)(x, target=target)
    if loss_info(getattr(loss_fn, "registry_name", "")).combine == "model_loss":
        return own
    return own + loss_fn(out, target, mask)


def torch_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    micro_batches: list[dict[str, torch.Tensor]],
    compute: Callable[..., torch.Tensor],
    *,
    forward: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Plain torch / DDP step: gradients of all micro-batches accumulate locally; DDP all-reduces on the last one.
    ``compute(model, micro_batch, forward=…, autocast_dtype=…)`` is the micro-batch loss (a task's ``loss``). With
    a ``scaler`` (fp16) the loss is scaled before backward and the gradients unscaled before clipping; the scaler
    skips a step whose gradients overflowed."""
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    total = 0.0
    for i, mb in enumerate(micro_batches):
        sync = contextlib.nullcontext()
        if i < n - 1 and hasattr(forward, "no_sync"):
            sync = forward.no_sync()  # type: ignore[union-attr]
        with sync:
            loss = compute(model, mb, forward=forward, autocast_dtype=autocast_dtype)
            (loss / n if scaler is None else scaler.scale(loss / n)).backward()
        total += float(loss.detach())
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if scheduler is not None:
        scheduler.step()
    return total / n


def deepspeed_step(
    engine: Any,
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    compute: Callable[..., torch.Tensor],
) -> float:
    """DeepSpeed step: ``engine.backward`` + ``engine.step`` per micro-batch; the engine updates (and steps its LR
    scheduler) at the accumulation boundary, which ``len(micro_batches) == gradient_accumulation_steps`` makes the
    last micro-batch. Precision (bf16 / fp32) is the engine's, so no autocast here."""
    dtype = next(engine.module.parameters()).dtype
    total = 0.0
    for mb in micro_batches:
        loss = compute(model, mb, forward=engine, input_dtype=dtype)
        engine.backward(loss)
        engine.step()
        total += float(loss.detach())
    return total / len(micro_batches)
