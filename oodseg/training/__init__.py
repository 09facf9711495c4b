"""Plain-torch training pieces (no Ray), shared by the single-process loop, the demo model and the Ray trainer.

* ``config.TrainConfig``                       one run's model / data / objective / optimisation / validation
* ``params.select_parameters(model, spec)``    full | head | last_k:N | queries | lora (peft); ``merge_lora``
* ``schedule.lr_factor`` / ``build_scheduler`` linear warmup + cosine / poly decay
* ``data``                                     deterministic augmentation, OE paste, rank-sliced global batches
* ``step``                                     one optimizer step (plain/DDP or a DeepSpeed engine)
* ``strategy``                                 local | ddp | deepspeed behind one interface
* ``task`` / ``tasks``                         what is trained (segmentation; S2M detector and SAOM in refine/)
* ``loop.fit``                                 the one training loop; ``train_local`` for a single process
* ``evaluate``                                 mergeable validation (mIoU + AuPRC/FPR95)
* ``demo`` / ``demo_tdos`` / ``demo_mask``      the cached demo ERFNet / TDOS / Mask2Former (their sources)
* ``cached``                                   train a named demo model once per config hash
"""

from oodseg.training.config import TrainConfig
from oodseg.training.loop import fit, train_local
from oodseg.training.params import merge_lora, select_parameters, train_mode
from oodseg.training.schedule import build_scheduler, lr_factor
from oodseg.training.strategy import create_strategy
from oodseg.training.task import SegmentationTask, Task
from oodseg.training.tasks import create_task, list_tasks, register_task

__all__ = ["SegmentationTask", "Task", "TrainConfig", "build_scheduler", "create_strategy", "create_task", "fit",
           "list_tasks", "lr_factor", "merge_lora", "register_task", "select_parameters", "train_local",
           "train_mode"]
