"""oodseg: benchmark and fine-tune anomaly (out-of-distribution) segmentation models for road scenes.

Importing oodseg (or any of its modules) changes nothing in the process; the settings a job process wants (the
OpenMP wait policy) are applied by the job entry points, :mod:`oodseg.process`.
"""

__version__ = "0.1.0"
