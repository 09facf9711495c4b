"""Training S2M's box detector with the one training loop (``TrainConfig(task="s2m_detector")``).

The data is generated on the fly, as S2M's offline set was (``tools/data_loader.py``: Cityscapes crops with one
pasted COCO object): every training crop of the Cityscapes-format split gets exactly one COCO object pasted
(:class:`~oodseg.data.paste.OutlierPaste`, ``ood_prob=1``); a *frozen* registered segmentation model and a registered
scorer turn the crop into its anomaly score map inside the loss (batched, on the training device); the pasted
object's mask gives the single target box. Losses are torchvision's Faster R-CNN losses (RPN objectness + box, RoI
classification + box), summed.

Calibration: before training, the scorer's maps of ``calibration_images`` pasted training crops fix the detector's
normalisation (:class:`~oodseg.scoring.calibration.ScoreCalibration`: inlier median and IQR scale), stored in its
config and so in the exported checkpoint. Validation: held-out val-split frames, each with one pasted object
(deterministic per index), scored the same way; :class:`BoxMetrics` gives box recall and AP at IoU 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from oodseg.config import from_dict
from oodseg.data import create_dataset
from oodseg.data.coco import CocoObjects
from oodseg.data.paste import OutlierPaste
from oodseg.models import create_model, resolve_checkpoint
from oodseg.models.detector import build_detector, detector_targets, save_detector
from oodseg.scoring import create_scorer
from oodseg.scoring.calibration import ScoreCalibration
from oodseg.scoring.metrics import MetricSet
from oodseg.scoring.metrics.boxes import BoxMetrics
from oodseg.training.data import SegAugment, TrainSamples, collate
from oodseg.training.evaluate import val_indices
from oodseg.training.step import unwrap
from oodseg.training.task import Task
from oodseg.training.tasks import register_task


@dataclass(frozen=True)
class DetectorTaskConfig:
    """``TrainConfig.task_cfg`` of the ``s2m_detector`` task."""

    scorer: str = "msp"
    scoring_model: str = "demo"  # checkpoint of the frozen segmentation model (a file or a named source)
    scoring_cfg: dict[str, Any] = field(default_factory=dict)
    detector: dict[str, Any] = field(default_factory=lambda: {"backbone": "tiny"})
    calibration_images: int = 16


@register_task("s2m_detector")
class DetectorTask(Task):
    """Trains S2M's Faster R-CNN box detector on the score maps a frozen segmentation model + scorer give for
    training crops with one pasted COCO object each (that object's box is the single target)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.opts: DetectorTaskConfig = from_dict(DetectorTaskConfig, cfg.task_cfg, prefix="task_cfg.")
        checkpoint = resolve_checkpoint(self.opts.scoring_model, data_root=cfg.data_root, seed=cfg.seed)
        self.scoring = create_model(checkpoint=checkpoint, **self.opts.scoring_cfg).eval().requires_grad_(False)
        self.scorer = create_scorer(self.opts.scorer)

    @classmethod
    def resolve(cls, cfg: Any, cache_dir: Any) -> Any:
        """Named checkpoint sources of the frozen scoring model → files (before any worker starts)."""
        opts = from_dict(DetectorTaskConfig, cfg.task_cfg, prefix="task_cfg.")
        path = resolve_checkpoint(opts.scoring_model, cache_dir=cache_dir, data_root=cfg.data_root, seed=cfg.seed)
        return replace(cfg, task_cfg={**cfg.task_cfg, "scoring_model": path})

    def _paste(self, seed: int) -> OutlierPaste:
        return OutlierPaste(CocoObjects(self.cfg.coco_root, self.cfg.coco_ann), ood_prob=1.0, n_objects=(1, 1),
                            road_only=self.cfg.paste_road_only, seed=seed)

    def samples(self, split: str | None = None, seed_offset: int = 0) -> TrainSamples:
        cfg = self.cfg
        if not cfg.coco_root:
            raise ValueError("the s2m_detector task pastes COCO objects: train.coco_root must be set")
        dataset = create_dataset(cfg.dataset, root=cfg.data_root, split=split or cfg.train_split)
        aug = SegAugment(crop=tuple(cfg.crop), scale=tuple(cfg.scale), hflip=cfg.hflip)
        return TrainSamples(dataset, aug, seed=cfg.seed + seed_offset, paste=self._paste(cfg.seed + seed_offset),
                            cache=cfg.cache_data, collate=collate)

    @torch.no_grad()
    def score_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen model's anomaly scores ``[B, H, W]`` of uint8 images ``[B, H, W, 3]``."""
        return self.scorer(self.scoring.predict(images), size=tuple(images.shape[1:3])).float()

    def build_model(self) -> nn.Module:
        samples = self.samples(seed_offset=10_000)  # a stream of its own: calibration never sees training crops
        batch = samples.collate([samples.get(i % len(samples), 0) for i in range(self.opts.calibration_images)])
        calibration = ScoreCalibration.from_scores(self.score_maps(batch["images"]), batch["outlier_mask"])
        torch.manual_seed(self.cfg.seed)
        size = {"min_size": min(self.cfg.crop), "max_size": max(self.cfg.crop)}
        return build_detector(**{**size, "location": calibration.location, "scale": calibration.scale,
                                 **self.opts.detector})

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def setup(self, device: torch.device) -> None:
        self.scoring.to(device)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        maps = self.score_maps(batch["images"])
        targets = [detector_targets(m == 1) for m in batch["outlier_mask"]]
        return sum(model(maps, targets).values())

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def eval_data(self) -> Any:
        if not self.cfg.val_split:
            return None
        samples = self.samples(split=self.cfg.val_split, seed_offset=20_000)
        return {"boxes": [samples.get(i, 0) for i in val_indices(len(samples), self.cfg.val_images)]}

    def eval_state(self, data: Any) -> MetricSet:
        return MetricSet({"boxes": BoxMetrics()})

    def eval_sample(self, model: nn.Module, state: MetricSet, name: str, sample: dict[str, np.ndarray]) -> None:
        score = self.score_maps(torch.from_numpy(sample["image"])[None])[0]
        boxes = unwrap(model).detect(score.cpu().numpy())
        state["boxes"].update(boxes, detector_targets(sample["outlier_mask"] == 1)["boxes"])

    def summarize(self, state: MetricSet) -> dict[str, float]:
        values = state["boxes"].compute()
        return {"val_box_recall": values["recall"], "val_box_ap": values["ap"]}

    def export(self, model: nn.Module, path: Any, metadata: dict[str, Any]) -> Any:
        return save_detector(model, path, {**metadata, "scorer": self.opts.scorer})
