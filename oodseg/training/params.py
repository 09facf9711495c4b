"""Which parameters a fine-tuning run updates, chosen from ``SegModel.param_groups()`` (or LoRA adapters).

Specs (``select_parameters(model, spec)``):

* ``full``      every parameter in the model's top-level groups (they partition the trainable parameters; a
  parameter the model keeps frozen on purpose, such as ERFNet's unused ``encoder.output_conv``, stays frozen —
  DDP would otherwise wait forever for its gradient);
* ``head``      the ``head`` group only (the classifier; everything else frozen);
* ``last_k:N``  the ``head`` group plus the ``N`` highest-indexed ``blocks.<i>`` groups (the blocks next to the output);
* ``queries``   the ``queries`` group only (EoMT query embeddings; the "queries-only" recipe);
* ``lora``      LoRA (Hu et al., ICLR 2022: ``W x + (α/r) · B A x`` with ``B`` zero-initialised) injected with peft's
  ``inject_adapter_in_model`` into every ``nn.Linear`` and every non-dilated ``nn.Conv2d``; only ``lora_*`` tensors
  train. Dilated convolutions are skipped on purpose: peft's conv LoRA builds ``A`` with the base layer's kernel,
  stride and padding but *not* its dilation, so on ERFNet's dilated (padding = dilation) convs the adapter branch
  would return a larger map than the base branch. ``merge_lora`` folds the adapters back into plain layers so the
  exported safetensors load into an un-adapted model.

BatchNorm layers whose affine parameters are all frozen keep their running statistics fixed (``train_mode``), the
usual practice for partial fine-tuning (frozen features must see the statistics they were trained with).
"""

from __future__ import annotations

import re

from torch import nn

from oodseg.models.base import check_partition

LORA_PREFIX = "lora_"


def _groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    fn = getattr(model, "param_groups", None)
    if fn is None:
        raise TypeError(f"{type(model).__name__} has no param_groups(); parameter selection needs a SegModel")
    groups = fn()
    check_partition(model, groups)  # a trainable parameter outside every group would silently never train
    return groups


def _need_group(groups: dict[str, list[nn.Parameter]], key: str, spec: str) -> list[nn.Parameter]:
    if key not in groups or not groups[key]:
        raise ValueError(f"params spec {spec!r} needs a {key!r} parameter group; model has {sorted(groups)}")
    return groups[key]


def _block_index(key: str) -> int | None:
    m = re.fullmatch(r"blocks\.(\d+)", key)
    return int(m.group(1)) if m else None


def lora_target_names(model: nn.Module) -> list[str]:
    """Module names LoRA adapts: every ``nn.Linear`` and every ``nn.Conv2d`` with dilation 1 (peft's conv adapter
    ignores dilation, so on a dilated conv its branch would not match the base layer's output size)."""
    names = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear or (type(mod) is nn.Conv2d and all(d == 1 for d in mod.dilation)):
            names.append(name)
    return names


def apply_lora(model: nn.Module, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters in place (peft) and freeze every non-``lora_*`` parameter; returns the same module."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_target_names(model)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Linear / non-dilated Conv2d layer for LoRA")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_(LORA_PREFIX in name)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (in place; returns the module).
    A model without adapters is returned as it is (peft is only imported when there is something to merge)."""
    if not any(LORA_PREFIX in name for name, _ in model.named_parameters()):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, BaseTunerLayer)]
    for name, mod in adapted:
        mod.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod.get_base_layer())
    return model


def select_parameters(
    model: nn.Module, spec: str, *, lora_rank: int = 8, lora_alpha: float = 16.0
) -> list[nn.Parameter]:
    """Set ``requires_grad`` per ``spec`` and return the trainable parameters.

    Args:
        spec: ``full`` (every top-level ``param_groups`` group), ``head``, ``queries``, ``last_k:N`` (the head plus
            the ``N`` ``blocks.<i>`` nearest the output) or ``lora`` (adapters of rank ``lora_rank`` and scale
            ``lora_alpha / lora_rank`` injected in place; only they train).
    """
    if spec == "lora":
        apply_lora(model, rank=lora_rank, alpha=lora_alpha)
        return [p for p in model.parameters() if p.requires_grad]
    groups = _groups(model)
    if spec == "full":
        chosen = [p for key, params in groups.items() if not key.startswith("blocks.") for p in params]
    elif spec == "head":
        chosen = list(_need_group(groups, "head", spec))
    elif spec == "queries":
        chosen = list(_need_group(groups, "queries", spec))
    elif spec.startswith("last_k:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"params spec {spec!r}: expected last_k:<int>") from None
        blocks = sorted((i, key) for key in groups if (i := _block_index(key)) is not None)
        if k < 1 or k > len(blocks):
            raise ValueError(f"params spec {spec!r}: model has {len(blocks)} blocks.<i> groups")
        chosen = list(_need_group(groups, "head", spec))
        for _, key in blocks[-k:]:
            chosen += groups[key]
    else:
        raise ValueError(f"unknown params spec {spec!r}; use full | head | last_k:N | queries | lora")
    keep = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model: nn.Module, *, frozen_stats: bool = False) -> nn.Module:
    """``model.train()``, except BatchNorm layers whose parameters are all frozen stay in eval mode.

    ``frozen_stats=True`` keeps *every* BatchNorm on its running statistics and disables dropout while gradients
    still flow: the forward pass then no longer depends on how the global batch is split over workers, which makes
    data-parallel runs comparable to a single process up to float rounding (and is a common small-batch recipe).
    """
    model.train()
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            params = list(mod.parameters(recurse=False))
            if frozen_stats or (params and not any(p.requires_grad for p in params)):
                mod.eval()
        elif frozen_stats and isinstance(mod, nn.modules.dropout._DropoutNd):
            mod.eval()
    return model
