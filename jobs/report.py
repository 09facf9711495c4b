"""Print the standard tables and draw PR/ROC plots (and heatmaps) from a results store.

    python jobs/report.py --results ./results [--runs A,B] [--heatmap demo:fs_static:<image id>]

Same as ``python -m oodseg report``; options: ``--help``.
"""

import sys

from oodseg.process import apply_job_settings

apply_job_settings()  # before anything imports torch

from oodseg.platform.jobs.report import main

if __name__ == "__main__":
    sys.exit(main())
