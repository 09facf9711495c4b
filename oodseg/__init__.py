"""oodseg: benchmark and fine-tune anomaly (out-of-distribution) segmentation models for road scenes."""

__version__ = "0.1.0"
