"""TDOS's released test protocol (``song1248/TextDrivenOODSegmentation``), as ``TDOS(protocol="release")``.

1. **Per-dataset keep-ratio resize** (mmseg ``Resize(keep_ratio=True)`` with the test ``img_scale`` of
   ``configs/_base_/datasets/city2*.py``): scale ``s = min(long / max(H, W), short / min(H, W))``, size
   ``int(W·s + 0.5) × int(H·s + 0.5)`` (``mmcv.rescale_size``); :data:`RELEASE_TEST_SCALES` holds the release's
   ``(long, short)`` per benchmark, keyed by our dataset names. The release resizes with cv2 bilinear (no
   antialiasing); here torchvision bilinear with ``antialias=False`` (equal up to cv2's fixed-point rounding).
2. **Sliding windows** (``TextDrivenOODSeg.slide_inference``, ``test_cfg = dict(mode='slide', crop_size=(512, 512),
   stride=(341, 341))``): ``n = max(L − crop + stride − 1, 0) // stride + 1`` starts per side at ``i·stride``, the last
   ones shifted back so the window ends at the border; a side shorter than the crop gets one window of its own length
   (:func:`slide_windows`). 2048×1024 → 3×6 windows, 1280×720 → 2×4, 512×288 → 1 window of 288×512.
3. **Probabilities upsampled, then the softmax**: per window the release forms ``seg = Σ_q softmax(cls_q)[:20] ·
   sigmoid(mask_q)`` at the mask resolution, resizes ``seg`` bilinearly to the window, averages overlapping windows,
   resizes to the original image and applies ``softmax`` over the 20 channels (``inference``). Bilinear resizing is
   linear, so resizing ``seg`` equals resizing each ``sigmoid(mask_q)``; :func:`window_mask_logits` does that and
   returns ``logit(p)`` (``eps`` 1e-6) at the window size, so the standard mask-output scoring (sigmoid, the
   per-query sum, window averaging, resize to the image) reproduces the release's map and ``p_ood`` its softmax.
   Ours by default (``protocol="windows"``) upsamples mask *logits* before the sigmoid (the EoMT / RbA order).

Cost: the mask logits of every window come back at the window resolution (``20 × 512²`` floats per window, 18
windows for a 2048×1024 image: 0.38 GB), where the default protocol returns them at a quarter of it.
A window side that is not a multiple of the patch size (the release's ViT floors it) is zero-padded after
normalisation to the next multiple and the padded part of its output cut off.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

#: the release's test ``img_scale`` (long, short) per benchmark (``configs/_base_/datasets/city2*.py``)
RELEASE_TEST_SCALES = {
    "cityscapes": (2048, 1024),
    "fs_lost_found": (2048, 1024),
    "fs_static": (2048, 1024),
    "road_anomaly": (512, 512),
    "road_anomaly_21": (1280, 720),  # SMIYC Anomaly Track
    "road_obstacle_21": (1920, 1080),  # SMIYC Obstacle Track
}
PROTOCOLS = ("windows", "release")
LOGIT_EPS = 1e-6


def resolve_test_scale(scale: str | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """A ``(long, short)`` pair, a benchmark name of :data:`RELEASE_TEST_SCALES`, or ``None`` (no resize)."""
    if scale is None:
        return None
    if isinstance(scale, str):
        if scale not in RELEASE_TEST_SCALES:
            raise ValueError(f"test_scale {scale!r}: not a benchmark of the release's test protocol "
                             f"({sorted(RELEASE_TEST_SCALES)}); or give [long, short]")
        return RELEASE_TEST_SCALES[scale]
    pair = tuple(int(v) for v in scale)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"test_scale must be [long, short] positive sizes or a benchmark name, got {scale!r}")
    return (max(pair), min(pair))


def keep_ratio_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """``(H', W')`` of mmcv's keep-ratio rescale of an ``H × W`` image into ``scale = (long, short)``."""
    s = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * s + 0.5), int(w * s + 0.5)


def _starts(length: int, crop: int, stride: int) -> list[int]:
    n = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(n)]


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's ``slide_inference`` layout: ``(top, left, height, width)`` per window, row by row."""
    if not 0 < stride <= crop:
        raise ValueError(f"stride must be in 1..crop={crop} so that windows cover the frame, got {stride}")
    ch, cw = min(crop, h), min(crop, w)
    return [(top, left, ch, cw) for top in _starts(h, crop, stride) for left in _starts(w, crop, stride)]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad ``[N, C, h, w]`` at the bottom / right to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple))


def window_mask_logits(mask_logits: torch.Tensor, padded: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """``[N, Q, h, w]`` mask logits of (padded) windows → ``logit(resize(sigmoid(·)))`` at the window size: the
    release upsamples probabilities, not logits, and the standard sigmoid-then-sum scoring then reproduces it."""
    p = F.interpolate(mask_logits.float().sigmoid(), size=padded, mode="bilinear", align_corners=False)
    return torch.logit(p[..., : window[0], : window[1]], eps=LOGIT_EPS)
