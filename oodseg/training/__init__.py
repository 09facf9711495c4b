"""Plain-torch training pieces (no Ray), shared by the single-process loop, the demo model and the Ray trainer.

* ``config.TrainConfig``                       one run's model / data / objective / optimisation / validation
* ``params.select_parameters(model, spec)``    full | head | last_k:N | queries | lora (peft); ``merge_lora``
* ``schedule.lr_factor`` / ``build_scheduler`` linear warmup + cosine / poly decay
* ``data``                                     deterministic augmentation, OE paste, rank-sliced global batches
* ``step.torch_step`` / ``deepspeed_step``     one optimizer step (plain/DDP or a DeepSpeed engine)
* ``loop``                                     builders, ``evaluate`` (mergeable mIoU + AuPRC/FPR95), ``train_local``
* ``demo.get_demo_checkpoint``                 the cached demo ERFNet of the benchmark job
* ``acceptance``                               OE / LogitNorm / EIM fine-tuning check on the synthetic suite
"""

from oodseg.training.config import TrainConfig
from oodseg.training.params import merge_lora, select_parameters, train_mode
from oodseg.training.schedule import build_scheduler, lr_factor

__all__ = ["TrainConfig", "build_scheduler", "lr_factor", "merge_lora", "select_parameters", "train_mode"]
