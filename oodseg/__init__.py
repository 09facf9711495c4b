"""oodseg: benchmark and fine-tune anomaly (out-of-distribution) segmentation models for road scenes.

Importing oodseg sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set: torch's OpenMP threads then sleep instead of
spinning at barriers. With spinning (the GNU OpenMP default) a CPU process whose cores are shared — a laptop doing
other work, the benchmark's Ray actors beside the driver — slows down by an order of magnitude on small ops (a tiny
TDOS step on 2 busy cores: 15 s spinning, 0.9 s passive). It only takes effect when oodseg is imported before torch,
as in every job; the variable is inherited by Ray's workers. A process that has the cores to itself goes back to
OpenMP's brief spinning (``oodseg.training.background``: the demo trainer), unless the user set the policy.
"""

import os

OMP_WAIT_POLICY_FROM_USER = "OMP_WAIT_POLICY" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
