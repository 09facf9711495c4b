"""The main job: benchmark every model × dataset × scorer on Ray Data; Parquet results, tables and plots.

    python jobs/benchmark.py                       # synthetic road suite + demo model (built/cached on first run)
    python jobs/benchmark.py --config configs/benchmark.yaml --set run_id=my-run --results s3://bucket/results
    python jobs/benchmark.py --refine s2m          # + the S2M object-level refine stage (SAM on box prompts)
    ray job submit --working-dir . -- python jobs/benchmark.py --results s3://…   # on a cluster ($RAY_ADDRESS)

Every option: ``python jobs/benchmark.py --help``. The job: ``oodseg/platform/jobs/benchmark.py``.
"""

from oodseg.process import apply_job_settings

apply_job_settings()  # before anything imports torch

from oodseg.platform.cli import exit_fast
from oodseg.platform.jobs.benchmark import main

if __name__ == "__main__":
    exit_fast(main())
