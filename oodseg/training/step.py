"""One optimizer step, shared by the single-process loop, Ray DDP and Ray DeepSpeed workers.

A step consumes ``accum`` micro-batches (dicts from ``oodseg.training.data.collate``) and performs one optimizer
update on their mean loss (each micro-loss is scaled by ``1/accum`` before backward; DeepSpeed applies the same
scaling itself when ``gradient_accumulation_steps = accum``). Returns the mean unscaled micro-batch loss.

``compute(micro_batch)`` is the micro-batch loss as the strategy runs it: a task's ``loss(module, batch)`` on the
module the strategy trains (the model, its DDP wrapper or a DeepSpeed engine: in the style of Ray's DeepSpeed
example, the engine is the model) inside the strategy's autocast. A task reaches the network's own attributes
(``preprocess``, ``own_loss``) through :func:`unwrap`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper or a DeepSpeed engine (both keep it as ``.module``); a plain model as is."""
    return getattr(module, "module", module)


def forward_loss(module: nn.Module, batch: dict[str, torch.Tensor], loss_fn: Callable[..., torch.Tensor], *,
                 combine: str = "sum") -> torch.Tensor:
    """Preprocess ``batch['images']`` with the network, run ``module`` (the network or the wrapper that distributes
    it) and return the loss against the batch targets. ``combine`` is the loss's registered rule with a network that
    computes a loss of its own (:class:`oodseg.losses.LossInfo`): ``model_loss`` returns that loss, ``sum`` adds
    ``loss_fn``'s term to it."""
    net = unwrap(module)
    device = net.device if hasattr(net, "device") else next(net.parameters()).device
    x = net.preprocess(batch["images"].to(device, non_blocking=True))
    target = batch["target"].to(device, non_blocking=True)
    mask = batch.get("outlier_mask")
    mask = None if mask is None else mask.to(device, non_blocking=True)
    if not getattr(net, "own_loss", False):
        kwargs = {"target": target, "outlier_mask": mask} if getattr(net, "wants_targets", False) else {}
        return loss_fn(module(x, **kwargs), target, mask)
    # A model with a loss of its own (EoMT's mask-classification loss, computed in its forward pass): the loss's
    # registration says whether it *is* that objective (``ce``) or adds a term to it (``oe``); per-pixel-only
    # losses raise a TypeError naming themselves.
    out, own = module(x, target=target)
    return own if combine == "model_loss" else own + loss_fn(out, target, mask)


def torch_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    micro_batches: list[dict[str, torch.Tensor]],
    compute: Callable[[Any], torch.Tensor],
    *,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    grad_clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Plain torch / DDP step: gradients of all micro-batches accumulate locally; DDP all-reduces on the last one
    (``no_sync``: the DDP wrapper's, entered for the others). With a ``scaler`` (fp16) the loss is scaled before
    backward and the gradients unscaled before clipping; the scaler skips a step whose gradients overflowed.

    Args:
        model: the module being trained (plain or DDP-wrapped); the gradients of its trainable parameters are clipped.
        scheduler: LR scheduler stepped once per optimizer step, or None.
        micro_batches: the step's ``accum`` micro-batches (``collate`` dicts); each loss is divided by their number.
        compute: micro-batch → scalar loss tensor (the strategy's forward + loss, inside its autocast).
        grad_clip: max global L2 norm of the trainable gradients; None or 0: no clipping.

    Returns:
        The mean unscaled micro-batch loss.
    """
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    total = 0.0
    for i, mb in enumerate(micro_batches):
        sync = no_sync() if no_sync is not None and i < n - 1 else contextlib.nullcontext()
        with sync:
            loss = compute(mb)
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


def deepspeed_step(engine: Any, micro_batches: list[dict[str, torch.Tensor]],
                   compute: Callable[[Any], torch.Tensor]) -> float:
    """DeepSpeed step: ``engine.backward`` + ``engine.step`` per micro-batch; the engine updates (and steps its LR
    scheduler) at the accumulation boundary, which ``len(micro_batches) == gradient_accumulation_steps`` makes the
    last micro-batch."""
    total = 0.0
    for mb in micro_batches:
        loss = compute(mb)
        engine.backward(loss)
        engine.step()
        total += float(loss.detach())
    return total / len(micro_batches)
