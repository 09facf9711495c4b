"""Label conventions shared by every layer (data, losses, scoring, training), defined once.

* Anomaly labels: ``INLIER = 0``, ``ANOMALY = 1``, ``IGNORE_ID = 255`` (void: not evaluated).
* Semantic targets: class ids ``0..C-1`` (Cityscapes trainIds 0..18), ``IGNORE_ID = 255`` (void) and
  ``OUTLIER_ID = 254`` for pixels of a pasted outlier object (Outlier Exposure); cross-entropy ignores both.
"""

from __future__ import annotations

INLIER = 0
ANOMALY = 1
OUTLIER_ID = 254
IGNORE_ID = 255
