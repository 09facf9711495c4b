"""ASHA search over loss hyper-parameters (OE weight, τ_in/τ_out, LogitNorm τ, EIM scale, TDOS weights, lr) with Ray
Tune, one Ray Train fine-tuning run per trial.

    python jobs/tune_loss.py --config configs/tune_loss.yaml
    python jobs/tune_loss.py --config configs/tune_loss.yaml --run-id my-search    # rerun: resumes (Tuner.restore)

Every option: ``python jobs/tune_loss.py --help``.
"""

import sys

from oodseg.process import apply_job_settings

apply_job_settings()  # before anything imports torch

from oodseg.platform.jobs.tune_loss import main

if __name__ == "__main__":
    sys.exit(main())
