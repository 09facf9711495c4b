"""Training SAM with the one training loop (``TrainConfig(task="saom")``): SAOM fine-tuning, and the promptable
pre-training a from-scratch demo SAM needs first.

Data: Cityscapes-format frames with ``gtFine/*_instanceIds.png`` (:class:`~oodseg.data.instances.CityscapesInstances`:
one mask per object of a class with instances, one per evaluated stuff class), one image per sample; a micro-batch
of images averages their per-image losses. Model: a :class:`~oodseg.models.sam.SamSegmenter` plus SAOM's class head
on the IoU token (:class:`SaomModel`). ``prompts`` selects the objective:

* ``grid`` — SAOM (Khan et al., ICIP 2024; ``mariiak2021/SAOMv1-SAOMv2-and-PanoSAM``): one positive point per GT mask
  by nearest-neighbour assignment on the everything-mode grid, best of 3 masks by predicted IoU, Dice + focal +
  class CE; image encoder frozen unless ``train_encoder`` (:mod:`oodseg.models.saom`, :mod:`oodseg.losses.saom`).
* ``box`` — SAM's own promptable objective (Kirillov et al., ICCV 2023), for a SAM trained from scratch: each object
  mask (classes with instances only: a box around a stuff region says nothing about it) prompted by its box (one mask)
  and by a random interior point (3 masks, the lowest-loss one trained), Dice + per-pixel BCE; every part trains.
  BCE rather than SAM's focal term: from scratch, with whole frames prompted (stuff included) and focal α 0.25, the
  tiny model's loss never left its start value (1.7–1.8 over 200 steps); objects only with Dice + BCE reach a
  validation box mIoU of 0.48 in 2,400 images. SAM's class-agnostic masks come from SA-1B's variety; a from-scratch
  SAM that saw only persons and cars does not carry over to other objects, so with ``train.coco_root`` set up to
  ``outliers`` COCO-format objects per frame are pasted (:class:`~oodseg.data.paste.OutlierPaste`, one at a time,
  later pastes occluding earlier masks) and prompted like the frame's own objects.

Validation: the SAOM protocol (:class:`~oodseg.scoring.metrics.SaomEval`: per-class pooled IoU and pixel recall over
instances, prompts from the same GT-based grid assignment). Export: the SAM as self-describing safetensors
(``create_sam(path)``), which S2M loads with one config line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from oodseg.config import from_dict
from oodseg.data.coco import CocoObjects
from oodseg.data.instances import CityscapesInstances
from oodseg.data.paste import OutlierPaste
from oodseg.labels import IGNORE_ID
from oodseg.losses.saom import promptable_mask_loss, saom_loss
from oodseg.models import resolve_checkpoint
from oodseg.models.sam import SamSegmenter, check_sam, create_sam, save_sam
from oodseg.models.saom import (
    SaomHead,
    best_of_three,
    point_grid,
    saom_predict,
    saom_prompts,
    select_saom_parameters,
)
from oodseg.scoring.metrics import MetricSet, SaomEval
from oodseg.training.evaluate import val_indices
from oodseg.training.task import Task
from oodseg.training.tasks import register_task

PROMPTS = ("grid", "box")


@dataclass(frozen=True)
class SaomTaskConfig:
    """``TrainConfig.task_cfg`` of the ``saom`` task."""

    sam: str = "tiny"  # the SAM to start from: tiny (random) | a file | hub id | local dir | a named source
    sam_cfg: dict[str, Any] = field(default_factory=dict)
    prompts: str = "grid"
    grid: tuple[int, int] = (32, 32)
    eval_grid: tuple[int, int] | None = None  # validation prompts' grid (None: grid); SAOM trains 320×64, tests 32×32
    train_encoder: bool = False
    num_classes: int = 19
    min_fraction: float = 0.5
    outliers: int = 0  # box objective: up to this many COCO objects pasted per frame as extra objects

    def __post_init__(self) -> None:
        if self.prompts not in PROMPTS:
            raise ValueError(f"task_cfg.prompts must be one of {PROMPTS}, got {self.prompts!r}")


class SaomModel(nn.Module):
    """SAM + SAOM's class head, as one module whose ``forward(batch)`` is the training loss, so DDP / DeepSpeed
    wrappers see the forward pass that produces the gradients they reduce."""

    def __init__(self, sam: SamSegmenter, head: SaomHead, opts: SaomTaskConfig, seed: int) -> None:
        super().__init__()
        self.sam, self.head, self.opts, self.seed = sam, head, opts, seed
        self.grid = point_grid(*opts.grid)

    def forward(self, batch: Sequence[dict[str, Any]]) -> torch.Tensor:
        grad_encoder = any(p.requires_grad for p in self.sam.param_groups()["encoder"])
        terms = []
        for s in batch:
            if self.opts.prompts == "box":
                rng = np.random.default_rng([self.seed, s["epoch"], s["index"], 7])
                t = box_prompt_loss(self.sam, s["image"], s["masks"], rng, grad_encoder)
            else:
                out = saom_image_loss(self.sam, self.head, s["image"], s["masks"], s["classes"], self.grid,
                                      self.opts.min_fraction)
                t = None if out is None else out["loss"]
            if t is not None:
                terms.append(t)
        if not terms:  # no usable mask in the micro-batch: a zero loss that still touches the parameters
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        return torch.stack(terms).mean()


def _sample_collate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return samples


class InstanceSamples:
    """Instance samples addressable by ``(index, epoch)`` (whole frames; horizontal flip drawn per sample; with
    ``paste``, 0..``outliers`` pasted objects added as instances)."""

    def __init__(self, dataset: CityscapesInstances, seed: int, hflip: bool, paste: OutlierPaste | None = None,
                 outliers: int = 0) -> None:
        if len(dataset) == 0:
            raise ValueError(f"{dataset!r}: no frames with instance masks")
        self.dataset, self.seed, self.hflip, self.paste, self.outliers = dataset, seed, hflip, paste, outliers
        self.collate = _sample_collate

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int, epoch: int) -> dict[str, Any]:
        s = self.dataset[index]
        image, masks = s["image"], s["masks"]
        classes = s["classes"]
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.hflip and rng.random() < 0.5:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        if self.paste is not None and self.outliers:
            image, masks, classes = self._paste(rng, np.ascontiguousarray(image), masks, classes)
        return {"image": np.ascontiguousarray(image), "masks": np.ascontiguousarray(masks), "classes": classes,
                "index": index, "epoch": epoch}

    def _paste(self, rng: np.random.Generator, image: np.ndarray, masks: np.ndarray, classes: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Paste objects one by one; each new one occludes the masks before it (class ``IGNORE_ID``: no class)."""
        free = np.zeros(image.shape[:2], np.uint8)  # every pixel may take an object
        masks, classes = list(masks), list(classes)
        for _ in range(int(rng.integers(0, self.outliers + 1))):
            image, _, new = self.paste.paste(image, free, rng)
            new = new == 1
            masks = [m & ~new for m in masks] + [new]
            classes.append(IGNORE_ID)
        stacked = np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), bool)
        return image, stacked, np.asarray(classes, np.int64)


def saom_image_loss(sam: Any, head: nn.Module, image: np.ndarray, masks: torch.Tensor | np.ndarray,
                    classes: torch.Tensor | np.ndarray, grid: np.ndarray,
                    min_fraction: float = 0.5) -> dict[str, torch.Tensor] | None:
    """SAOM's loss terms on one image with all its GT masks ``[K, H, W]`` (classes ``[K]``) as one prompt batch
    (the ``[0, 1]`` ``grid`` comes from :func:`point_grid`); None when no mask is usable.

    Args:
        sam: a :class:`SamSegmenter`; the encoder keeps its graph when any encoder parameter is trainable.
        head: the :class:`SaomHead` (its ``num_classes`` bounds ``classes``).
        image: uint8 ``[H, W, 3]`` RGB.
        masks: bool / {0, 1} GT object masks, one prompt each.
        classes: their integer class ids, in ``[0, head.num_classes)``.
        min_fraction: as in :func:`oodseg.models.saom.mask_cells`.

    Returns:
        :func:`saom_loss`'s scalar ``dice``, ``focal``, ``ce``, ``loss`` plus ``n_masks`` (masks prompted, float).
    """
    encoder_grad = any(p.requires_grad for p in sam.param_groups()["encoder"])
    img = sam.embed(image, grad=encoder_grad)
    points, keep = saom_prompts(sam, img, masks, grid, min_fraction)
    if not keep.any():
        return None
    dev = img.embeddings.device
    gt = torch.as_tensor(masks, device=dev)[torch.as_tensor(keep, device=dev)]
    cls = torch.as_tensor(classes, device=dev).long()[torch.as_tensor(keep, device=dev)]
    n_cls = getattr(head, "num_classes", None)
    if n_cls is not None and (cls.min() < 0 or cls.max() >= n_cls):
        raise ValueError(f"SAOM classes must be in [0, {n_cls}), got {sorted(set(cls.tolist()))}")
    logits, token = best_of_three(sam, img, points[keep])
    return {**saom_loss(logits, gt, head(token), cls), "n_masks": torch.tensor(float(keep.sum()))}


def box_prompt_loss(sam: SamSegmenter, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                    grad_encoder: bool) -> torch.Tensor | None:
    """SAM's promptable objective on one image: per GT mask a box prompt (one mask) and a random interior point
    (3 masks, the lowest-loss one counts), Dice + BCE (:func:`promptable_mask_loss`; None without masks).

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        masks: bool GT masks ``[K, H, W]``; empty ones are skipped.
        rng: draws each interior point.
        grad_encoder: keep the encoder's graph (from-scratch training of the encoder).

    Returns:
        Scalar: mean box-prompt loss + mean best-of-3 point-prompt loss over the masks.
    """
    keep = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, bool)
    if not keep.any():
        return None
    masks = masks[keep]
    img = sam.embed(image, grad=grad_encoder)
    gt = torch.as_tensor(masks, device=img.embeddings.device)
    boxes = np.stack([_box(m) for m in masks])
    box_logits, _ = sam.mask_logits_from_boxes(img, boxes)
    points = np.stack([_random_point(m, rng) for m in masks])[:, None, :]
    pt_logits, _, _ = sam.mask_logits_from_points(img, points, np.ones((len(masks), 1), np.int64), multimask=True)
    per = torch.stack([promptable_mask_loss(pt_logits[:, j], gt) for j in range(pt_logits.shape[1])], dim=1)
    return promptable_mask_loss(box_logits[:, 0], gt).mean() + per.min(dim=1).values.mean()


def _box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def _random_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    k = int(rng.integers(len(ys)))
    return np.array([xs[k] + 0.5, ys[k] + 0.5], dtype=np.float32)


@register_task("saom")
class SaomTask(Task):
    """SAM trained on instance masks: SAOM's grid-point fine-tuning (``prompts="grid"``) or SAM's own box / point
    objective from scratch (``prompts="box"``); validated with SAOM's per-class pooled mask IoU (:class:`SaomEval`);
    exported as a self-describing SAM."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.opts: SaomTaskConfig = from_dict(SaomTaskConfig, cfg.task_cfg, prefix="task_cfg.")
        self.grid = point_grid(*(self.opts.eval_grid or self.opts.grid))

    @classmethod
    def resolve(cls, cfg: Any, cache_dir: Any) -> Any:
        opts = from_dict(SaomTaskConfig, cfg.task_cfg, prefix="task_cfg.")
        path = resolve_checkpoint(opts.sam, cache_dir=cache_dir, data_root=cfg.data_root, seed=cfg.seed)
        check_sam(path)  # a SAM file that cannot load fails here, before Ray starts, in one line naming it
        return replace(cfg, task_cfg={**cfg.task_cfg, "sam": path})

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        sam = create_sam(self.opts.sam, **{"seed": self.cfg.seed, **self.opts.sam_cfg} if self.opts.sam == "tiny"
                         else self.opts.sam_cfg)
        return SaomModel(sam, SaomHead(sam.hidden_size, self.opts.num_classes), self.opts, self.cfg.seed)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        if self.opts.prompts == "box":  # from-scratch promptable training: everything but the head learns
            model.head.requires_grad_(False)
            return [p for p in model.sam.parameters() if p.requires_grad]
        return select_saom_parameters(model.sam, self.opts.train_encoder, model.head)

    def samples(self, split: str | None = None) -> InstanceSamples:
        ds = CityscapesInstances(self.cfg.data_root, split=split or self.cfg.train_split, strict=False,
                                 stuff=self.opts.prompts != "box")
        train = split is None
        paste = None
        if train and self.opts.outliers and self.opts.prompts == "box":
            if not self.cfg.coco_root:
                raise ValueError("task_cfg.outliers pastes COCO objects: train.coco_root must be set")
            paste = OutlierPaste(CocoObjects(self.cfg.coco_root, self.cfg.coco_ann), ood_prob=1.0, n_objects=(1, 1),
                                 scale=(0.1, 0.6), seed=self.cfg.seed)
        return InstanceSamples(ds, self.cfg.seed, self.cfg.hflip and train, paste, self.opts.outliers)

    def loss(self, model: nn.Module, batch: Sequence[dict[str, Any]]) -> torch.Tensor:
        return model(batch)

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def eval_data(self) -> Any:
        if not self.cfg.val_split:
            return None
        samples = self.samples(split=self.cfg.val_split)
        return {"saom": [samples.get(i, 0) for i in val_indices(len(samples), self.cfg.val_images)]}

    def eval_state(self, data: Any) -> MetricSet:
        return MetricSet({"saom": SaomEval(self.opts.num_classes)})

    def eval_sample(self, model: nn.Module, state: MetricSet, name: str, sample: Any) -> None:
        pred, _ = saom_predict(model.sam, model.head, sample["image"], sample["masks"], self.grid,
                               self.opts.min_fraction)
        state["saom"].update(pred.cpu(), sample["masks"], sample["classes"])

    def summarize(self, state: MetricSet) -> dict[str, float]:
        values = state["saom"].compute()
        return {"val_saom_miou": values["miou"], "val_saom_macc": values["macc"]}

    def export(self, model: nn.Module, path: Any, metadata: dict[str, Any]) -> Any:
        return save_sam(model.sam, path, {**metadata, "oodseg.saom.prompts": self.opts.prompts})
