"""Search a scorer's temperature on the benchmark's cached model outputs with Ray Tune (no forward passes).

    python jobs/tune_temperature.py                                   # MSP, AuPRC on RoadAnomaly21, Optuna TPE
    python jobs/tune_temperature.py --objective fpr95 --t-low 0.1 --t-high 50
    python jobs/tune_temperature.py --search grid --grid 0.5,0.75,1.1 # the published rows

Reuses the output cache of the newest matching ``jobs/benchmark.py --cache-outputs true`` run, or runs that
benchmark once to create it. Every option: ``python jobs/tune_temperature.py --help``.
"""

import sys

from oodseg.process import apply_job_settings

apply_job_settings()  # before anything imports torch

from oodseg.platform.jobs.tune_temperature import main

if __name__ == "__main__":
    sys.exit(main())
