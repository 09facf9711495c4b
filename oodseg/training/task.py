"""What a training run optimises, behind one small interface, so every system trains with the one loop.

The loop (:func:`oodseg.training.loop.fit`) and its strategies (local / DDP / DeepSpeed) know nothing of
segmentation: they ask a :class:`Task` for the model, its trainable parameters, the per-sample data, the loss of a
micro-batch, a mergeable validation state and the export. Tasks are registered by name (``TrainConfig.task``):

* ``segmentation`` (:class:`SegmentationTask`) — a registered ``SegModel`` with a registered loss on Cityscapes-format
  crops, optionally with COCO objects pasted as outliers (OE); validation mIoU + anomaly AuPRC / FPR95;
* ``s2m_detector`` (:mod:`oodseg.training.detector_task`) — S2M's box detector on the score maps of a frozen model;
* ``saom`` (:mod:`oodseg.training.saom_task`) — SAOM fine-tuning of SAM on instance masks.

A new system that trains is one Task subclass plus its registration; its settings come from ``TrainConfig.task_cfg``
(parsed into the task's own frozen dataclass, so a typo is an error naming the key).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from oodseg.data import create_dataset
from oodseg.data.coco import CocoObjects
from oodseg.data.paste import OutlierPaste
from oodseg.losses import create_loss, loss_info
from oodseg.models import create_model, save_safetensors
from oodseg.scoring import create_scorer
from oodseg.scoring.metrics import MetricSet
from oodseg.training.config import TrainConfig
from oodseg.training.data import SegAugment, TrainSamples, collate
from oodseg.training.evaluate import eval_datasets, segmentation_state, summarize, update_segmentation
from oodseg.training.params import merge_lora, select_parameters, train_mode
from oodseg.training.step import forward_loss
from oodseg.training.tasks import register_task


class Task:
    """The training contract. ``samples`` must be addressable by ``(index, epoch)`` and carry a
    ``collate``; ``loss`` gets one collated micro-batch and returns a scalar."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    @classmethod
    def resolve(cls, cfg: TrainConfig, cache_dir: Any) -> TrainConfig:
        """``cfg`` with the task's named checkpoint sources turned into files, on the driver before any worker
        starts (``train.init`` is resolved by the caller)."""
        return cfg

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        cfg = self.cfg
        return select_parameters(model, cfg.params, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)

    def setup(self, device: torch.device) -> None:
        """Build what the loss needs besides the model (a loss module, a frozen scoring model) on ``device``."""

    def samples(self) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The loss of one micro-batch. ``model`` is what the strategy trains — the model, its DDP wrapper or a
        DeepSpeed engine —: call it for the forward pass (so the wrapper sees the pass whose gradients it reduces)
        and reach the network's own attributes through :func:`oodseg.training.step.unwrap`. The strategy has already
        entered its autocast; a task sees no distribution or precision setting."""
        raise NotImplementedError

    def train_mode(self, model: nn.Module) -> None:
        train_mode(model, frozen_stats=self.cfg.frozen_stats)

    def eval_data(self) -> Any:
        """The validation data (None: the task does not validate): ``{set name: items}``, each set cut to
        :func:`~oodseg.training.evaluate.val_indices`."""
        return None

    def eval_state(self, data: Any) -> MetricSet:
        """Empty validation metrics for ``data``."""
        raise NotImplementedError

    def eval_sample(self, model: nn.Module, state: MetricSet, name: str, sample: Any) -> None:
        """Add one validation item of set ``name`` to ``state``."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Any, rank: int = 0, world: int = 1) -> MetricSet:
        """This rank's share of the validation state: the model in eval mode, every ``world``-th item of each set
        from ``rank`` on through :meth:`eval_sample`, the model's mode restored (the one evaluation loop)."""
        state = self.eval_state(data)
        was = model.training
        model.eval()
        try:
            for name, items in data.items():
                for k in range(rank, len(items), world):
                    self.eval_sample(model, state, name, items[k])
        finally:
            model.train(was)
        return state

    def summarize(self, state: MetricSet) -> dict[str, float]:
        raise NotImplementedError

    def export(self, model: nn.Module, path: Any, metadata: dict[str, Any]) -> Any:
        raise NotImplementedError


@register_task("segmentation")
class SegmentationTask(Task):
    """A registered segmentation model trained with a registered loss on augmented crops (optionally with pasted COCO
    outliers); validated by val mIoU and the held-out anomaly set's AuPRC / FPR95."""

    def build_model(self) -> nn.Module:
        """``create_model(cfg.model, checkpoint=cfg.init, seed=cfg.seed, ...)`` with the model changes the loss's
        registration declares (``model_cfg`` unless ``cfg.model_cfg`` sets them; ``fresh`` parts start untrained)."""
        cfg = self.cfg
        info = loss_info(cfg.loss)
        model_cfg = {**info.model_cfg, **cfg.model_cfg}
        fresh = info.fresh if any(model_cfg.get(k) == v for k, v in info.model_cfg.items()) else ()
        return create_model(cfg.model, checkpoint=cfg.init, fresh=fresh, seed=cfg.seed, **model_cfg)

    def setup(self, device: torch.device) -> None:
        self.loss_fn = create_loss(self.cfg.loss, **self.cfg.loss_cfg).to(device)

    def samples(self) -> TrainSamples:
        """The training split with augmentation and, when ``cfg.coco_root`` is set, the OE outlier paste."""
        cfg = self.cfg
        dataset = create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.train_split)
        paste = None
        if cfg.coco_root:
            paste = OutlierPaste(CocoObjects(cfg.coco_root, cfg.coco_ann), ood_prob=cfg.ood_prob,
                                 road_only=cfg.paste_road_only, seed=cfg.seed)
        aug = SegAugment(crop=tuple(cfg.crop), scale=tuple(cfg.scale), hflip=cfg.hflip)
        return TrainSamples(dataset, aug, seed=cfg.seed, paste=paste, cache=cfg.cache_data, collate=collate)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return forward_loss(model, batch, self.loss_fn, combine=loss_info(self.cfg.loss).combine)

    def eval_data(self) -> Any:
        return eval_datasets(self.cfg) or None

    def eval_state(self, data: Any) -> MetricSet:
        self.scorer = create_scorer(self.cfg.scorer)
        return segmentation_state(data)

    def eval_sample(self, model: nn.Module, state: MetricSet, name: str, sample: Any) -> None:
        update_segmentation(model, state, self.scorer, name, sample)

    def summarize(self, state: MetricSet) -> dict[str, float]:
        return summarize(state)

    def export(self, model: nn.Module, path: Any, metadata: dict[str, Any]) -> Any:
        """Self-describing safetensors (fp32 copy; LoRA adapters merged into plain layers)."""
        plain = _cpu_copy(model)
        merge_lora(plain)
        return save_safetensors(plain, path, metadata)


def _cpu_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).float().cpu()
