"""Print the standard table and draw PR/ROC plots (and heatmaps) from a results store.

    python jobs/report.py --results ./results [--run-id ID] [--heatmap demo:fs_static:<image id>]

Same as ``python -m oodseg report``; options: ``--help``.
"""

from oodseg.report import main

if __name__ == "__main__":
    raise SystemExit(main())
