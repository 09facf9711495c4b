"""Model outputs → per-pixel class scores ``[B, C, H, W]``, the input of every scorer (and of OE-style losses).

* Per-pixel logits (``PixelLogits`` / a ``[B,C,h,w]`` tensor): the logits, bilinearly resized to the label size.
* :class:`MaskOutputs` (Mask2Former / EoMT / TDOS semantic inference, Cheng et al. CVPR 2022):
  ``L[c] = Σ_q softmax(class_logits_q / T_cl)[c] · sigmoid(up(mask_logits_q))`` with the no-object column dropped
  after the softmax. In both forms below the mask *logits* are bilinearly upsampled before the sigmoid, the order of
  the EoMT reference (``eval_semantic``) and of RbA's Mask2Former inference, whatever the model:

  - without ``crops`` the mask logits are upsampled straight to the requested ``size``;
  - with sliding windows (``crops``), each crop's mask logits are upsampled to its box in the resized frame, crops
    are averaged where they overlap in ``frame_size``, and the frame's class scores are resized to ``size``
    (the EoMT reference combines windows, then resizes to the image).

  Queries are combined in chunks (``QUERY_CHUNK``) so full-resolution memory stays at ``chunk × H × W`` floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oodseg.outputs import MaskOutputs, PixelLogits

Outputs = torch.Tensor | PixelLogits | MaskOutputs
QUERY_CHUNK = 16


def resize(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Bilinear resize of the last two dims (``align_corners=False``); a no-op at the same size or ``None``."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


def _check_mask_shapes(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> None:
    if class_logits.ndim != 3 or mask_logits.ndim != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"MaskOutputs: expected class_logits [N,Q,C+1] and mask_logits [N,Q,h,w] with equal N,Q; got "
            f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )


def class_probs(class_logits: torch.Tensor, temperature_cl: float) -> torch.Tensor:
    """``softmax(class_logits / T)`` over the C+1 columns, no-object column dropped: ``[N, Q, C]`` float32."""
    return torch.softmax(class_logits.float() / temperature_cl, dim=-1)[..., :-1]


def combine_masks(probs: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """``Σ_q probs[n,q,c] · sigmoid(up(mask_logits[n,q]))`` → ``[N, C, H, W]``, mask logits upsampled to ``size``
    (bilinear) before the sigmoid, in chunks of queries."""
    n, q = mask_logits.shape[:2]
    h, w = size if size is not None else mask_logits.shape[-2:]
    out = probs.new_zeros((n, probs.shape[-1], int(h), int(w)))
    for start in range(0, q, QUERY_CHUNK):
        masks = torch.sigmoid(resize(mask_logits[:, start : start + QUERY_CHUNK].float(), (int(h), int(w))))
        out += torch.einsum("nqc,nqhw->nchw", probs[:, start : start + QUERY_CHUNK], masks)
    return out


def _stitch_crops(out: MaskOutputs, temperature_cl: float) -> torch.Tensor:
    """Per-crop class scores (mask logits upsampled to each crop's box) stitched into the frame, overlaps averaged."""
    if out.frame_size is None:
        raise ValueError("MaskOutputs with crops needs frame_size")
    crops = out.crops.detach().to("cpu", torch.long)
    n_crops = out.class_logits.shape[0]
    if crops.ndim != 2 or crops.shape[1] != 5 or crops.shape[0] != n_crops:
        raise ValueError(f"MaskOutputs.crops must be [N,5] with N={n_crops}; got {tuple(crops.shape)}")
    _check_mask_shapes(out.class_logits, out.mask_logits)
    probs = class_probs(out.class_logits, temperature_cl)
    fh, fw = (int(s) for s in out.frame_size)
    n_img = out.batch_size
    frame = probs.new_zeros((n_img, probs.shape[-1], fh, fw))
    count = probs.new_zeros((n_img, 1, fh, fw))
    for n, (img, top, left, h, w) in enumerate(crops.tolist()):
        if not (0 <= img < n_img and 0 <= top and 0 <= left and top + h <= fh and left + w <= fw and h > 0 and w > 0):
            raise ValueError(f"crop {n} = {(img, top, left, h, w)} does not fit frame {(fh, fw)} x {n_img} images")
        frame[img, :, top : top + h, left : left + w] += combine_masks(probs[n : n + 1], out.mask_logits[n : n + 1],
                                                                       (h, w))[0]
        count[img, :, top : top + h, left : left + w] += 1
    if bool((count == 0).any()):
        raise ValueError("MaskOutputs.crops do not cover every pixel of the frame")
    return frame / count


def pixel_class_scores(
    outputs: Outputs, temperature_cl: float = 1.0, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Per-pixel class scores ``[B, C, H, W]`` (float32) for any model output at ``size`` (default
    ``outputs.size``; ``None``: keep the output resolution). All ``C`` channels, OOD channels included.
    ``temperature_cl`` divides mask-model class logits before the softmax (per-pixel logits are returned as they are).
    """
    if temperature_cl <= 0:
        raise ValueError(f"temperature_cl must be > 0, got {temperature_cl}")
    if isinstance(outputs, torch.Tensor):
        outputs = PixelLogits(outputs)
    if isinstance(outputs, PixelLogits):
        if outputs.logits.ndim != 4:
            raise ValueError(f"per-pixel logits must be [B,C,H,W]; got {tuple(outputs.logits.shape)}")
        return resize(outputs.logits.float(), size if size is not None else outputs.size)
    if not isinstance(outputs, MaskOutputs):
        raise TypeError(f"expected a Tensor, PixelLogits or MaskOutputs; got {type(outputs).__name__}")
    target = size if size is not None else outputs.size
    if outputs.crops is not None:
        return resize(_stitch_crops(outputs, temperature_cl), target)
    _check_mask_shapes(outputs.class_logits, outputs.mask_logits)
    return combine_masks(class_probs(outputs.class_logits, temperature_cl), outputs.mask_logits, target)


def semantic_prediction(outputs: Outputs, num_classes: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Closed-set prediction ``[B, H, W]`` (int64): argmax over the first ``num_classes`` in-distribution channels
    (OOD channels such as TDOS's ``ood`` never win; an ERFNet kept with its void channel 19 predicts 0..18)."""
    scores = pixel_class_scores(outputs, 1.0, size)
    ood = set(getattr(outputs, "ood_channels", ()))
    keep = [c for c in range(scores.shape[1]) if c not in ood][:num_classes]
    return scores[:, keep].argmax(1)
