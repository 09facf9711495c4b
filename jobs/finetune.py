"""Fine-tune a segmentation model for anomaly segmentation on Ray Train (DeepSpeed ZeRO or DDP).

    python jobs/finetune.py --config configs/finetune.yaml                   # OE fine-tuning of the demo model
    python jobs/finetune.py --config configs/finetune.yaml --name ft-logitnorm --loss logitnorm \
        --set 'train.loss_cfg={temperature: 0.5}'
    python jobs/finetune.py --config configs/finetune.yaml --name ft-oe-ddp --strategy ddp
    python jobs/finetune.py --config configs/finetune_cityscapes.yaml --num-workers 8 --use-gpu true

Shortcuts: --model --loss --params --steps --init --lr --data-root (= --train.<field>). Without a data root the
synthetic suite is used (its COCO folder feeds the OE paste) and training starts from the demo model (--init demo;
--init scratch for random weights). Rerunning the same --name resumes; a different model / loss / data / strategy
under an existing name is an error. Every option: ``python jobs/finetune.py --help``.
"""

import sys

from oodseg.process import apply_job_settings

apply_job_settings()  # before anything imports torch

from oodseg.platform.jobs.finetune import main

if __name__ == "__main__":
    sys.exit(main())
