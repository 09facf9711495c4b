"""TDOS's K → C merge of the ``ood`` query with the negative-prompt queries (``mask_pred_method='max'``).

Source: ``song1248/TextDrivenOODSegmentation:mmseg/models/decode_heads/tqdm_head.py`` (``forward`` with a
``seg_mask``, ``forward_test``) and ``models/segmentors/text_driven_ood_seg.py`` (``score_map_method='max'``). The
queries are ordered ``C − 1`` in-distribution classes, then ``ood`` (index ``C − 1``), then the negative slots; the
last ``K − C + 1`` (``ood`` + negatives) merge into one ``ood`` entry: mask logits (and pixel–text scores) by
**max**, class logits by **mean**. Masked attention inside the decoder still uses all ``K`` queries.
"""

from __future__ import annotations

import torch


def merge_queries(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                  n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K, C+1]``, ``[N, K, h, w]`` → ``[N, C, C+1]``, ``[N, C, h, w]`` (``C = n_classes``)."""
    k = n_classes - 1
    cls = torch.cat([class_logits[:, :k], class_logits[:, k:].mean(1, keepdim=True)], dim=1)
    masks = torch.cat([mask_logits[:, :k], mask_logits[:, k:].amax(1, keepdim=True)], dim=1)
    return cls, masks


def merge_score_map(score_map: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Pixel–text scores ``[N, K, h, w]`` → ``[N, C, h, w]``: channel ``C − 1`` = max over ``ood`` + negatives."""
    k = n_classes - 1
    return torch.cat([score_map[:, :k], score_map[:, k:].amax(1, keepdim=True)], dim=1)
