"""``TrainConfig``: everything one fine-tuning / training run needs, independent of how it is distributed.

Batch semantics: ``global_batch`` images per optimizer step over all workers; each worker runs
``accum`` micro-batches of ``global_batch / (workers · accum)`` images. ``steps`` counts optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from oodseg.config import help_meta as _h
from oodseg.data import list_datasets
from oodseg.losses import list_losses
from oodseg.models import list_models
from oodseg.models.runtime import PRECISIONS
from oodseg.scoring import list_scorers
from oodseg.training.schedule import LR_PER, SCHEDULES
from oodseg.training.tasks import list_tasks


@dataclass(frozen=True)
class TrainConfig:
    """Model, data, objective, optimisation and validation settings of a training run."""

    task: str = field(default="segmentation", metadata=_h("what is trained (segmentation | s2m_detector | saom)",
                                                          choices=list_tasks))
    task_cfg: dict[str, Any] = field(default_factory=dict, metadata=_h("settings of a non-segmentation task"))
    model: str = field(default="erfnet", metadata=_h("registered model", choices=list_models))
    model_cfg: dict[str, Any] = field(default_factory=dict, metadata=_h("model keyword arguments, e.g. {width: "
                                                                        "0.375} (erfnet), {clip: tiny} (tdos)"))
    init: str | None = field(default=None, metadata=_h("checkpoint (.safetensors/.pth) to start from, or demo | "
                                                        "scratch (default on the synthetic suite: demo)"))
    data_root: str | None = field(default=None, metadata=_h("data root (the synthetic suite dir or $OODSEG_DATA)"))
    dataset: str = field(default="cityscapes", metadata=_h("semantic training dataset (Cityscapes format)",
                                                           choices=list_datasets))
    train_split: str = field(default="train", metadata=_h("training split"))
    val_split: str = field(default="val", metadata=_h("in-distribution validation split (mIoU)"))
    anomaly_set: str | None = field(default="road_anomaly_21", metadata=_h("held-out anomaly set (AuPRC/FPR95)"))
    coco_root: str | None = field(default=None, metadata=_h("COCO root for the OE paste (None: no paste)"))
    coco_ann: str = field(default="annotations/instances_train2017.json", metadata=_h("COCO annotation file"))
    ood_prob: float = field(default=0.5, metadata=_h("probability that a training crop gets a pasted outlier"))
    paste_road_only: bool = field(default=True, metadata=_h("pasted objects stand on road/sidewalk pixels"))
    loss: str = field(default="ce", metadata=_h("registered loss", choices=list_losses))
    loss_cfg: dict[str, Any] = field(default_factory=dict, metadata=_h("loss keyword arguments, e.g. {weight: 0.03, "
                                                                       "tau_in: 15} (oe), {temperature: 0.5} "
                                                                       "(logitnorm)"))
    params: str = field(default="full", metadata=_h("trainable params: full | head | last_k:N | queries | lora"))
    lora_rank: int = field(default=8, metadata=_h("LoRA rank r"))
    lora_alpha: float = field(default=16.0, metadata=_h("LoRA alpha (scaling alpha / r)"))
    lr: float = field(default=1e-3, metadata=_h("peak learning rate (AdamW)"))
    weight_decay: float = field(default=1e-4, metadata=_h("AdamW weight decay"))
    adam_eps: float = field(default=1e-8, metadata=_h("AdamW epsilon (SAOM's release: 1e-4)"))
    decay_1d: bool = field(default=False, metadata=_h("weight decay on 1-d tensors (norm scales, biases) too, as "
                                                      "SAOM's release; off: on ≥ 2-d weights only"))
    schedule: str = field(default="cosine", metadata=_h("LR decay after warmup", choices=SCHEDULES))
    lr_per: str = field(default="step", metadata=_h("the LR schedule moves every optimizer step or once an epoch "
                                                    "(a torch scheduler stepped per epoch, as SAOM's release)",
                                                    choices=LR_PER))
    precision: str = field(default="auto", metadata=_h("auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16 | "
                                                       "fp16 (autocast + GradScaler, as SAOM's release)",
                                                       choices=PRECISIONS))
    warmup: int = field(default=10, metadata=_h("linear warmup steps"))
    steps: int = field(default=200, metadata=_h("optimizer steps"))
    global_batch: int = field(default=8, metadata=_h("images per optimizer step over all workers"))
    accum: int = field(default=1, metadata=_h("gradient accumulation micro-batches per step"))
    crop: tuple[int, int] = field(default=(128, 256), metadata=_h("training crop (h, w)"))
    scale: tuple[float, float] = field(default=(0.5, 1.0), metadata=_h("random source rescale range"))
    hflip: bool = field(default=True, metadata=_h("random horizontal flip"))
    frozen_stats: bool = field(default=False, metadata=_h("BatchNorm on running stats, dropout off"))
    grad_clip: float | None = field(default=None, metadata=_h("max gradient norm (None: no clipping)"))
    seed: int = field(default=0, metadata=_h("seed of init, data order and augmentation"))
    val_every: int = field(default=0, metadata=_h("validate every N steps (0: only at the end)"))
    val_images: int = field(default=0, metadata=_h("images per validation set (0: all)"))
    scorer: str = field(default="rba", metadata=_h("anomaly scorer for validation AuPRC/FPR95",
                                                   choices=list_scorers))
    cache_data: bool = field(default=True, metadata=_h("keep decoded training frames in memory (small sets)"))
    data_workers: int = field(default=0, metadata=_h("DataLoader worker processes per training worker"))
    log_every: int = field(default=10, metadata=_h("progress line every N steps"))

    def __post_init__(self) -> None:
        if self.steps < 1 or self.global_batch < 1 or self.accum < 1:
            raise ValueError("steps, global_batch and accum must be positive")
        rules = (("lr", self.lr > 0, "> 0"), ("adam_eps", self.adam_eps > 0, "> 0"),
                 ("weight_decay", self.weight_decay >= 0, "≥ 0"), ("warmup", self.warmup >= 0, "≥ 0"))
        bad = [f"{key} must be {rule}, got {getattr(self, key)}" for key, ok, rule in rules if not ok]
        if bad:
            raise ValueError("; ".join(bad))
        for key, allowed in (("lr_per", LR_PER), ("precision", PRECISIONS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if self.global_batch % self.accum:
            raise ValueError(f"global_batch {self.global_batch} not divisible by accum {self.accum}")
