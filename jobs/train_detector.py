"""Train S2M's box detector on a frozen model's anomaly score maps (Ray Train, DDP).

    python jobs/train_detector.py                                            # demo ERFNet + MSP, synthetic suite
    python jobs/train_detector.py --set 'train.task_cfg={scorer: rba, scoring_model: demo}' --name detector-rba
    python jobs/benchmark.py --refine s2m --set 'refine_cfg.detectors={msp: <printed model path>}'

Every option: ``python jobs/train_detector.py --help``.
"""

import sys

from oodseg.process import apply_job_settings

apply_job_settings()  # before anything imports torch

from oodseg.platform.jobs.train_detector import main

if __name__ == "__main__":
    sys.exit(main())
