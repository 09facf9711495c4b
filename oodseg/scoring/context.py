"""What a whole-map scorer reads: :class:`ScoreContext` (one per model batch, shared by all its scorers).

Pixel-wise scorers (``fn(z, temperature)``) see class scores only. Scorers registered with ``reads="map"`` get a
context instead, ``fn(ctx, temperature, **params) -> [B, H, W]``, that hands out, computed once per batch:

* ``ctx.class_scores(t_cl)``: in-distribution per-pixel class scores ``[B, C, H, W]`` at the label size (cached);
* ``ctx.features()``: the model's features (``outputs.features``, set by ``model.predict(images, features=True)``);
* ``ctx.fit``: the scorer's fitted train-split state (:mod:`oodseg.scoring.posthoc.fit`);
* ``ctx.network()`` / ``ctx.images``: the model itself and the uint8 input batch, for scorers that run the network
  again (ODIN's input gradient) or a part of it (ReAct's classifier). They are given by the scoring actor.
* ``ctx.to_size(map)``: a ``[B, h, w]`` map (e.g. at feature resolution) bilinearly resized to the label size.

Pixel-wise scorers share the per-pixel reductions of their input instead: :class:`SharedStats` (class max,
``exp(z − max)``, its sum, logsumexp, the mass off the top class) is computed once per block of class scores while
:func:`sharing` is active for that block (:func:`~oodseg.scoring.scorers.score_many`), and on demand otherwise, by
the same ops, so a scorer's map is the same bits either way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from oodseg.outputs import inlier_channels
from oodseg.scoring.class_scores import Outputs, pixel_class_scores, resize
from oodseg.scoring.metrics.base import all_finite


class ScorerInputError(ValueError):
    """A scorer lacks what it reads (features, a fit, the network); the message names what to provide."""


@dataclass
class ScoreContext:
    """What a ``reads="map"`` scorer gets for one model batch, shared by all its scorers: ``outputs`` (model outputs
    at their own resolution), label ``size``, the ``model`` and uint8 ``images`` (for scorers that rerun the
    network) and the scorer's ``fit``; derived inputs are computed on first use and cached."""

    outputs: Outputs
    size: tuple[int, int] | None
    model: Any = None
    images: torch.Tensor | None = None
    fit: Any = None
    _cache: dict[float, torch.Tensor] = field(default_factory=dict)

    @property
    def target_size(self) -> tuple[int, int] | None:
        return self.size if self.size is not None else getattr(self.outputs, "size", None)

    def class_scores(self, t_cl: float = 1.0) -> torch.Tensor:
        """In-distribution class scores ``[B, C, H, W]`` (float32) at the label size, OOD channels dropped."""
        if t_cl not in self._cache:
            z = pixel_class_scores(self.outputs, t_cl, self.size)
            if getattr(self.outputs, "ood_channels", ()):
                z = z[:, inlier_channels(self.outputs)]
            self._cache[t_cl] = z
        return self._cache[t_cl]

    def logits_at_size(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits the scorer recomputed (e.g. ReAct, ODIN), resized like the model's, inlier channels."""
        z = resize(logits.float(), self.target_size)
        ood = set(getattr(self.outputs, "ood_channels", ()))
        return z[:, [c for c in range(z.shape[1]) if c not in ood]] if ood else z

    def features(self, scorer: str) -> torch.Tensor:
        f = getattr(self.outputs, "features", None)
        if f is None:
            raise ScorerInputError(f"scorer {scorer!r} reads model features: predict with model.predict(images, "
                                   "features=True) (models with has_features)")
        return f

    def network(self, scorer: str, images: bool = True) -> Any:
        """The model (and, with ``images``, a check that the input batch is there too)."""
        if self.model is None or (images and self.images is None):
            raise ScorerInputError(f"scorer {scorer!r} runs the network: pass model= and images= to score_many")
        return self.model

    def fitted(self, scorer: str) -> Any:
        if self.fit is None:
            raise ScorerInputError(f"scorer {scorer!r} needs a fit on the training split: "
                                   f"create_scorer({scorer!r}, fit=<fitted state>)")
        return self.fit

    def to_size(self, scores: torch.Tensor) -> torch.Tensor:
        """A feature-grid map ``[N, h, w]`` → ``[B, H, W]`` at the label size (bilinear, ``align_corners=False``);
        with sliding windows (``outputs.crops``) each crop's map is first resized to its box in the frame and the
        crops are averaged where they overlap, as the class scores are."""
        x = scores.float().unsqueeze(1)
        if getattr(self.outputs, "crops", None) is not None:
            x = stitch_windows(x, self.outputs)
        return resize(x, self.target_size).squeeze(1)


def stitch_windows(maps: torch.Tensor, outputs: Any) -> torch.Tensor:
    """Per-crop maps ``[N, K, h, w]`` → frames ``[B, K, fh, fw]`` (each resized to its box, overlaps averaged)."""
    fh, fw = (int(v) for v in outputs.frame_size)
    out = maps.new_zeros((outputs.batch_size, maps.shape[1], fh, fw))
    count = maps.new_zeros((outputs.batch_size, 1, fh, fw))
    for n, (img, top, left, h, w) in enumerate(outputs.crops.detach().to("cpu", torch.long).tolist()):
        out[img, :, top : top + h, left : left + w] += resize(maps[n : n + 1], (h, w))[0]
        count[img, :, top : top + h, left : left + w] += 1
    return out / count.clamp(min=1)


#: What each shared reduction is computed from (``"z"``: the class scores themselves).
INPUTS: dict[str, tuple[str, ...]] = {
    "max": ("z",), "shifted": ("z", "max"), "exp": ("shifted",), "sumexp": ("exp",), "logsumexp": ("max", "sumexp"),
    "below": ("shifted",), "exp_below": ("exp", "below"), "rest": ("below", "exp_below"),
}


@functools.lru_cache(maxsize=64)
def _last_uses(uses: frozenset[str], owns_z: bool) -> dict[str, float] | None:
    """How often each entry will be read while computing the reductions in ``uses`` (those, and ``z`` unless it is
    owned, are kept: infinite); None when every entry is kept. Cached: callers copy it."""
    unknown = set(uses) - {"z", *INPUTS}
    if unknown:
        raise ValueError(f"unknown shared reductions {sorted(unknown)}; known: {['z', *INPUTS]}")
    needed, todo = set(), list(uses)
    while todo:
        if (name := todo.pop()) not in needed:
            needed.add(name)
            todo.extend(INPUTS.get(name, ()))
    left: dict[str, float] = {e: sum(e in INPUTS.get(y, ()) for y in needed) for e in needed}
    for kept in (*uses, *(() if owns_z else ("z",))):
        left[kept] = math.inf
    return left if any(n < math.inf for n in left.values()) else None


class SharedStats:
    """Per-pixel reductions over the class dim of one class-score tensor ``z [B, C, H, W]``, each computed once.

    * ``max()`` is ``m = z.amax(1, keepdim=True)``, ``shifted()`` is ``d = z − m``, ``exp()`` is ``e = exp(d)``;
    * ``sumexp()`` is ``S = Σ_c e_c`` and ``logsumexp()`` is ``log S + m``, the op sequence of ``torch.logsumexp``
      (and, as it, ``m`` where the max is infinite or NaN);
    * ``below()`` is ``1`` where ``d < 0`` and ``0`` at the maxima (``−sign(d)``: float ops, several times faster on
      the CPU than a boolean mask and ``masked_fill``);
    * ``exp_below()`` is ``e·below`` and ``rest()`` is ``Σ_c e_c`` over every class but one maximal one,
      ``Σ_c e_c·below_c + (#maxima − 1)``: the softmax mass off the top class is ``rest / (1 + rest)``, exact where
      ``1 − p_max`` would round to 0.

    Scorers must not modify what they read in place. ``uses``: every reduction (and ``"z"``) the scorers of this
    block will read (their registrations' ``uses``); with it, an entry is released after its last use as an input
    and that use may write its result into the entry's storage (``d = z − m`` into ``z``'s where ``owns_z``: ``z``
    is this object's own, e.g. the temperature-divided copy): the same bits, and ``msp`` alone writes one fresh
    ``[C, P]`` tensor instead of four. None keeps every entry. Reading a released entry raises.
    """

    def __init__(self, z: torch.Tensor, uses: Collection[str] | None = None, owns_z: bool = False) -> None:
        self.z = z
        self._memo: dict[str, torch.Tensor] = {}
        left = None if uses is None else _last_uses(frozenset(uses), owns_z)
        self._left = None if left is None else dict(left)
        self._spent: set[str] = set()

    def _get(self, name: str, make: Any) -> torch.Tensor:
        if name not in self._memo:
            if name in self._spent:
                raise RuntimeError(f"SharedStats.{name}() read after its last declared use (its storage may hold "
                                   f"another reduction now): declare {name!r} in register_scorer(uses=...)")
            self._memo[name] = make()
        return self._memo[name]

    def _input(self, name: str) -> tuple[torch.Tensor, bool]:
        """Entry ``name`` read as an input, and whether this was its last use (its storage may then be reused)."""
        value = self.z if name == "z" else getattr(self, name)()
        if self._left is None:
            return value, False
        self._left[name] = self._left.get(name, math.inf) - 1  # an entry no declared use needs: kept
        last = self._left[name] == 0
        if last and name != "z":
            self._spent.add(name)
            del self._memo[name]
        return value, last

    def max(self) -> torch.Tensor:
        return self._get("max", lambda: self._input("z")[0].amax(dim=1, keepdim=True))

    def shifted(self) -> torch.Tensor:
        def make() -> torch.Tensor:
            m = self._input("max")[0]
            z, last = self._input("z")
            return z.sub_(m) if last else z - m

        return self._get("shifted", make)

    def exp(self) -> torch.Tensor:
        def make() -> torch.Tensor:
            d, last = self._input("shifted")
            return d.exp_() if last else d.exp()

        return self._get("exp", make)

    def sumexp(self) -> torch.Tensor:
        """``[B, H, W]``."""
        return self._get("sumexp", lambda: self._input("exp")[0].sum(dim=1))

    def logsumexp(self) -> torch.Tensor:
        def make() -> torch.Tensor:
            m = self._input("max")[0].squeeze(1)
            lse = self._input("sumexp")[0].log().add_(m)
            return lse if all_finite(m) else torch.where(torch.isfinite(m), lse, m)

        return self._get("logsumexp", make)

    def below(self) -> torch.Tensor:
        """``[B, C, H, W]`` float: 1 below the pixel's max, 0 at it (NaN where ``z`` is NaN)."""
        def make() -> torch.Tensor:
            d, last = self._input("shifted")
            return (d.sign_() if last else d.sign()).neg_()

        return self._get("below", make)

    def exp_below(self) -> torch.Tensor:
        """``[B, C, H, W]``: ``e_c · below_c``, the exponentials off the maxima (0 at them)."""
        def make() -> torch.Tensor:
            (e, e_last), (b, b_last) = self._input("exp"), self._input("below")
            return b.mul_(e) if b_last else e.mul_(b) if e_last else e * b

        return self._get("exp_below", make)

    def rest(self) -> torch.Tensor:
        """``[B, H, W]``: ``Σ_c e_c`` over all classes but one maximal one."""
        def make() -> torch.Tensor:
            off = self._input("exp_below")[0].sum(dim=1)  # first: e to fresh memory, below into d's (the faster way)
            ties = self._input("below")[0].sum(dim=1).neg_().add_(self.z.shape[1] - 1)  # #maxima − 1, exact
            return off.add_(ties)

        return self._get("rest", make)


_ACTIVE: ContextVar[SharedStats | None] = ContextVar("oodseg_shared_stats", default=None)


@contextmanager
def sharing(shared: SharedStats) -> Iterator[SharedStats]:
    """Make ``stats(shared.z)`` return ``shared`` inside the block, so every pixel-wise scorer of one block of class
    scores reuses the same max / argmax / exp / logsumexp reductions instead of recomputing them."""
    token = _ACTIVE.set(shared)
    try:
        yield shared
    finally:
        _ACTIVE.reset(token)


def stats(z: torch.Tensor) -> SharedStats:
    """The active :class:`SharedStats` of ``z`` (same tensor object), else a fresh one."""
    active = _ACTIVE.get()
    return active if active is not None and active.z is z else SharedStats(z)
