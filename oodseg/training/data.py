"""Training data: deterministic augmentation, the OE outlier paste, and a rank-sliced global batch schedule.

Data order (``step_items``): optimizer step ``s`` consumes global positions ``[s·B, (s+1)·B)`` of an endless
stream made of per-epoch permutations ``perm_e = default_rng([seed, e]).permutation(n)``; rank ``r`` of ``W``
takes the contiguous slice ``[r·B/W, (r+1)·B/W)`` and splits it into ``accum`` micro-batches. Every sample's
augmentation draws from ``default_rng([seed, epoch, index])``. Hence

* the *global* batch of step ``s`` is the same for any worker count (two workers × b ≡ one worker × 2b);
* a run resumed at step ``k`` sees exactly the data the uninterrupted run would have seen from step ``k`` on;
* each worker decodes only its own files (a DistributedSampler-style split, chosen over Ray Data's streaming
  split because that one's order depends on scheduling and would need its own checkpointing to resume exactly).

Augmentation (``SegAugment``): random rescale of the source by ``s ~ U(scale)``, random crop ``crop`` (padding
with ignore=255 when the rescaled frame is smaller), horizontal flip, then — when an ``OutlierPaste`` is given —
the OE paste (Hendrycks et al., "Deep Anomaly Detection with Outlier Exposure", ICLR 2019; COCO objects pasted
into Cityscapes as in Chan et al., "Entropy Maximization and Meta Classification", ICCV 2021), applied after the
crop so pasted objects are never cropped away. Pasted pixels carry ``OUTLIER_ID = 254`` in the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from oodseg.labels import IGNORE_ID


@dataclass(frozen=True)
class SegAugment:
    """Train-time geometry: crop ``(h, w)``, source rescale range, horizontal flip."""

    crop: tuple[int, int] = (128, 256)
    scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True


def _resize(image: np.ndarray, label: np.ndarray, size_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = size_hw
    if image.shape[:2] == (h, w):
        return image, label
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    lab = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return img, lab


def augment(image: np.ndarray, label: np.ndarray, aug: SegAugment, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rescale, crop (pad with 0 / ignore), flip; ``image`` uint8 HxWx3, ``label`` uint8 HxW."""
    s = float(rng.uniform(*aug.scale))
    h0, w0 = label.shape
    image, label = _resize(image, label, (max(1, round(h0 * s)), max(1, round(w0 * s))))
    ch, cw = aug.crop
    h, w = label.shape
    if h < ch or w < cw:
        ph, pw = max(0, ch - h), max(0, cw - w)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_ID)
        h, w = label.shape
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    image, label = image[top : top + ch, left : left + cw], label[top : top + ch, left : left + cw]
    if aug.hflip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack samples: ``images`` uint8 [B,H,W,3], ``target`` int64 [B,H,W], ``outlier_mask`` uint8 [B,H,W]."""
    return {
        "images": torch.from_numpy(np.stack([s["image"] for s in samples])),
        "target": torch.from_numpy(np.stack([s["target"] for s in samples]).astype(np.int64)),
        "outlier_mask": torch.from_numpy(np.stack([s["outlier_mask"] for s in samples])),
    }


class TrainSamples:
    """Augmented (and optionally outlier-pasted) training samples of a semantic dataset, addressed by (index, epoch).

    ``cache=True`` keeps decoded source frames in memory (only for small sets such as the synthetic suite).
    """

    def __init__(self, dataset: Any, aug: SegAugment, *, seed: int, paste: Any = None, cache: bool = False,
                 collate: Callable[[list[dict[str, np.ndarray]]], dict[str, torch.Tensor]] = collate) -> None:
        if len(dataset) == 0:
            raise ValueError(f"training dataset {getattr(dataset, 'name', dataset)!r} is empty")
        self.dataset, self.aug, self.seed, self.paste = dataset, aug, seed, paste
        self.collate = collate
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.dataset)

    def _source(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sample = self.dataset[index]
        pair = (sample["image"], sample["label"])
        if self._cache is not None:
            self._cache[index] = pair
        return pair

    def get(self, index: int, epoch: int) -> dict[str, np.ndarray]:
        """``image`` uint8 [h,w,3], ``target`` uint8 [h,w] (254 = pasted outlier), ``outlier_mask`` 0/1/255."""
        rng = np.random.default_rng([self.seed, epoch, index])
        image, label = augment(*self._source(index), self.aug, rng)
        if self.paste is not None:
            image, label, mask = self.paste.paste(image, label, rng)
            mask = np.asarray(mask, dtype=np.uint8)
        else:
            mask = np.where(label == IGNORE_ID, IGNORE_ID, 0).astype(np.uint8)
        return {"image": np.asarray(image, dtype=np.uint8), "target": np.asarray(label, dtype=np.uint8),
                "outlier_mask": mask}


def step_items(
    step: int, *, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1, accum: int = 1
) -> list[list[tuple[int, int]]]:
    """``(index, epoch)`` pairs this rank uses at optimizer ``step``, split into ``accum`` micro-batches.

    The run reads one endless stream of epochs, each a permutation of ``range(n)`` seeded by ``(seed, epoch)``; step
    ``s`` takes stream positions ``[s·global_batch, (s + 1)·global_batch)`` and rank ``r`` its ``r``-th equal slice.

    Args:
        n: number of training samples.
        global_batch: samples per optimizer step over all ranks (divisible by ``world · accum``).
        seed: shuffling seed.
        rank, world: this process's index and the number of processes.
        accum: micro-batches per step (gradient accumulation).

    Returns:
        ``accum`` lists of ``global_batch / (world · accum)`` pairs each.
    """
    if global_batch % (world * accum):
        raise ValueError(f"global batch {global_batch} is not divisible by world ({world}) × accum ({accum})")
    per_rank = global_batch // world
    micro = per_rank // accum
    start = step * global_batch + rank * per_rank
    perms: dict[int, np.ndarray] = {}
    items = []
    for pos in range(start, start + per_rank):
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        items.append((int(perms[epoch][pos % n]), epoch))
    return [items[i : i + micro] for i in range(0, per_rank, micro)]


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``k`` is the list of micro-batches for optimizer step ``start + k``
    (``samples.get(index, epoch)`` per item, ``samples.collate`` per micro-batch).

    Wrap it in ``DataLoader(..., batch_size=None, num_workers=…)`` to decode/augment ahead of the compute.
    """

    def __init__(self, samples: TrainSamples, *, start: int, stop: int, global_batch: int, seed: int,
                 rank: int = 0, world: int = 1, accum: int = 1) -> None:
        self.samples, self.start, self.stop = samples, start, stop
        self.kw = dict(n=len(samples), global_batch=global_batch, seed=seed, rank=rank, world=world, accum=accum)
        step_items(start, **self.kw)  # validate divisibility eagerly

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, k: int) -> list[dict[str, torch.Tensor]]:
        micro = step_items(self.start + k, **self.kw)
        return [self.samples.collate([self.samples.get(i, e) for i, e in mb]) for mb in micro]
