"""``knn``: deep nearest neighbours (Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors",
ICML 2022; deeplearning-wisc/knn-ood, OpenOOD's ``knn_postprocessor``).

Features are L2-normalised, ``f̂ = f / (‖f‖₂ + 1e-10)`` (the reference's normaliser), and the score of a feature
pixel is its squared Euclidean distance to the ``k``-th nearest neighbour in a bank of training features (the
reference's ``faiss.IndexFlatL2`` returns squared distances; its confidence is ``−D[:, k−1]``). The score map at
feature resolution is resized to the label size.

Bank (:class:`FeatureBank`): a seeded subsample of at most ``cap`` labelled training feature pixels (labels sampled
nearest on the feature grid; void / outlier pixels left out). Every pixel gets a 64-bit key from a hash of
``(seed, image id, pixel index)`` (BLAKE2b of the id, splitmix64 of the index) and the bank keeps the ``cap``
smallest keys: a uniform random subsample whose merge is exact and order-independent (shards' banks unite and keep
the ``cap`` smallest), memory bounded by ``cap × D`` float32.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from oodseg.scoring.context import ScoreContext
from oodseg.scoring.posthoc.fit import FitState, feature_rows, register_fit, valid_classes
from oodseg.scoring.scorers import register_scorer

EPS = 1e-10
QUERY_CHUNK = 256  # queries per matrix product on a CPU: the [chunk, cap] scores stay in cache
_M = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vigna's splitmix64 finaliser over uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _M[0]
        z = (z ^ (z >> np.uint64(30))) * _M[1]
        z = (z ^ (z >> np.uint64(27))) * _M[2]
        return z ^ (z >> np.uint64(31))


def image_key(seed: int, image_id: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}/{image_id}".encode(), digest_size=8).digest(), "little"))


def normalise(f: torch.Tensor) -> torch.Tensor:
    """Rows ``[N, D]`` divided by ``‖row‖₂ + 1e-10`` (float32)."""
    f = f.float()
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + EPS)


@register_fit("feature_bank", features=True)
class FeatureBank(FitState):
    """At most ``cap`` normalised training feature pixels with the smallest seeded keys."""

    def __init__(self, num_classes: int = 19, cap: int = 8192, seed: int = 0) -> None:
        if cap < 1:
            raise ValueError(f"feature_bank: cap must be ≥ 1, got {cap}")
        self.num_classes, self.cap, self.seed = int(num_classes), int(cap), int(seed)
        self.keys = np.zeros(0, np.uint64)
        self.images = np.zeros(0, np.uint64)
        self.pixels = np.zeros(0, np.int64)
        self.features = np.zeros((0, 0), np.float32)

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "cap": self.cap, "seed": self.seed}

    def _update(self, outputs: Any, labels: torch.Tensor, ids: list[str]) -> None:
        f, y, ids = feature_rows(outputs, labels, ids)
        b, d = f.shape[:2]
        y = y.reshape(b, -1)
        for i in range(b):
            idx = torch.nonzero(valid_classes(y[i], self.num_classes)).flatten()
            if len(idx) == 0:
                continue
            pix = idx.cpu().numpy().astype(np.int64)
            key = image_key(self.seed, ids[i])
            prio = splitmix64(splitmix64(pix.astype(np.uint64)) ^ key)
            take = np.argsort(prio, kind="stable")[: self.cap]  # only the image's own smallest can survive
            feats = normalise(f[i].reshape(d, -1)[:, idx[torch.from_numpy(take).to(idx.device)]].T)
            self._add(prio[take], np.full(len(take), key, np.uint64), pix[take], feats.cpu().numpy())

    def _add(self, keys: np.ndarray, images: np.ndarray, pixels: np.ndarray, features: np.ndarray) -> None:
        if len(self.keys) and features.shape[1] != self.features.shape[1]:
            raise ValueError(f"feature_bank: {features.shape[1]}-dim features cannot merge into "
                             f"{self.features.shape[1]}")
        keys, images = np.concatenate([self.keys, keys]), np.concatenate([self.images, images])
        pixels = np.concatenate([self.pixels, pixels])
        feats = np.concatenate([self.features.reshape(-1, features.shape[1]), features])
        order = np.lexsort((pixels, images, keys))[: self.cap]  # unique (key, image, pixel): a total order
        self.keys, self.images, self.pixels, self.features = keys[order], images[order], pixels[order], feats[order]

    def _merge(self, other: FeatureBank) -> None:
        if len(other.keys):
            self._add(other.keys, other.images, other.pixels, other.features)

    def _state(self) -> dict[str, Any]:
        return {"keys": self.keys.copy(), "images": self.images.copy(), "pixels": self.pixels.copy(),
                "features": self.features.copy()}

    def _load(self, state: Any) -> None:
        self.keys = np.asarray(state["keys"], np.uint64)
        self.images = np.asarray(state["images"], np.uint64)
        self.pixels = np.asarray(state["pixels"], np.int64)
        self.features = np.asarray(state["features"], np.float32).reshape(len(self.keys), -1)

    def bank(self, device: torch.device) -> torch.Tensor:
        if len(self.keys) == 0:
            raise ValueError("feature_bank: empty fit (no labelled training pixels)")
        return self.cached(f"bank:{device}", lambda: torch.from_numpy(self.features).to(device))


def kth_sq_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Squared L2 distance of each query row to its ``k``-th nearest bank row.

    ``‖q − b‖² = ‖q‖² − 2 (q·b − ‖b‖²/2)``: one matrix product of ``[q, 1]`` with ``[b, −‖b‖²/2]`` per chunk of
    queries ranks the bank, the ``k``-th largest value gives the distance (clamped at 0)."""
    k = min(k, bank.shape[0])
    aug = torch.cat([bank, -0.5 * (bank * bank).sum(1, keepdim=True)], dim=1).T.contiguous()
    out = torch.empty(queries.shape[0], dtype=torch.float32, device=queries.device)
    chunk = QUERY_CHUNK if queries.device.type == "cpu" else 1 << 14
    for s in range(0, queries.shape[0], chunk):
        q = queries[s : s + chunk]
        top = (torch.cat([q, torch.ones_like(q[:, :1])], dim=1) @ aug).topk(k, dim=1).values[:, -1]
        out[s : s + chunk] = ((q * q).sum(1) - 2.0 * top).clamp_(min=0.0)
    return out


@register_scorer("knn", space={"k": {"type": "choice", "values": [1, 5, 10, 20, 50]}}, reads="map",
                 fit="feature_bank", needs=("features",))
def knn(ctx: ScoreContext, temperature: float, k: int = 10) -> torch.Tensor:
    """Squared distance of each normalised feature pixel to its ``k``-th nearest training feature."""
    f = ctx.features("knn")
    bank = ctx.fitted("knn").bank(f.device)
    b, d, h, w = f.shape
    if bank.shape[1] != d:
        raise ValueError(f"knn: the bank has {bank.shape[1]}-dim features, the model {d}")
    queries = normalise(f.permute(0, 2, 3, 1).reshape(-1, d))
    return ctx.to_size(kth_sq_distance(queries, bank, int(k)).reshape(b, h, w))
