"""Painting primitives of the synthetic suite: smooth value noise, materials, and a label/instance-aware canvas.

Layers are painted back to front as uint8 *material* indices (cheap); :meth:`Canvas.compose` evaluates every
material (``base + amp·noise_cell + grad·y/H``) in a few whole-image gathers, after which full HxWx3 colour fields can
be painted directly (anomalies, OE objects). Labels (Cityscapes labelIds) and instance ids (Cityscapes encoding
``labelId·1000 + k``) are written alongside, so occlusion is consistent between the three maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Shape = tuple[np.ndarray, tuple[slice, slice]]  # box-local bool mask + the box it lives in


def noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise: a Gaussian grid with spacing ``cell`` px, bilinearly upsampled (zero mean, ~unit std)."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    y = np.arange(h, dtype=np.float32) / cell
    x = np.arange(w, dtype=np.float32) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    rows = grid[:, x0] * (1 - fx) + grid[:, x0 + 1] * fx  # separable bilinear: along x, then along y
    return rows[y0] * (1 - fy) + rows[y0 + 1] * fy


_BANK: dict[tuple[int, int, float], np.ndarray] = {}


def noise_bank(h: int, w: int, cell: float) -> np.ndarray:
    """A (2h, 2w) noise field per (size, scale), built once per process from a fixed seed; scenes take random
    h x w windows of it (a view, no copy), which keeps a scene to a few milliseconds."""
    key = (h, w, cell)
    if key not in _BANK:
        rng = np.random.default_rng(np.random.SeedSequence([h, w, int(round(cell * 100))]))
        _BANK[key] = noise(rng, 2 * h, 2 * w, cell)
    return _BANK[key]


@dataclass(frozen=True)
class Tex:
    """Material: RGB ``base`` + ``amp`` × the scene's smooth noise at scale ``cell`` px + ``grad`` × y/H."""

    base: np.ndarray
    amp: float
    cell: float
    grad: float = 0.0


def textured(rng: np.random.Generator, base: Any, amp: float, cell: float) -> Tex:
    """A material with noise of random sign (so two layers with the same noise scale do not move together)."""
    return Tex(np.asarray(base, np.float32), float(amp * rng.choice([-1.0, 1.0])), cell)


def tinted(rng: np.random.Generator, lo: float, hi: float, tint: float = 8.0) -> np.ndarray:
    """A grey level in [lo, hi] with a small random colour tint per channel."""
    g = rng.uniform(lo, hi)
    return np.clip(g + rng.uniform(-tint, tint, 3), 0, 255)


class Canvas:
    """Labels, instance ids and materials painted back to front, composed into a float RGB image once at the end."""

    def __init__(self, h: int, w: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = h, w, rng
        self.img: np.ndarray | None = None
        self.lab = np.zeros((h, w), np.uint8)
        self.inst = np.zeros((h, w), np.uint16)
        self.mat = np.zeros((h, w), np.uint8)
        self.materials: list[Tex] = [Tex(np.zeros(3, np.float32), 0.0, 0.0)]
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self._noise: dict[float, np.ndarray] = {}

    def noise(self, cell: float) -> np.ndarray:
        """This scene's window of the shared noise field at scale ``cell`` (one random offset per scale)."""
        if cell not in self._noise:
            oy, ox = self.rng.integers(self.h), self.rng.integers(self.w)
            self._noise[cell] = noise_bank(self.h, self.w, cell)[oy:oy + self.h, ox:ox + self.w]
        return self._noise[cell]

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        """Pixel slices of the box clipped to the image (objects are painted inside their box only)."""
        ys = slice(int(np.clip(np.floor(y0), 0, self.h)), int(np.clip(np.ceil(y1) + 1, 0, self.h)))
        xs = slice(int(np.clip(np.floor(x0), 0, self.w)), int(np.clip(np.ceil(x1) + 1, 0, self.w)))
        return ys, xs

    def paint(self, mask: np.ndarray, color: Any, label: int | None,
              box: tuple[slice, slice] = (slice(None), slice(None)), instance: int | None = None) -> None:
        """Paint ``color`` (``Tex`` / RGB vector before ``compose``; HxWx3 field after) under the box-local ``mask``;
        with a ``label``, also the label and the instance id (``instance``, else the plain label)."""
        if self.img is None:
            tex = color if isinstance(color, Tex) else Tex(np.asarray(color, np.float32), 0.0, 0.0)
            if len(self.materials) == 256:
                raise RuntimeError("more than 255 materials in one scene")
            self.materials.append(tex)
            np.copyto(self.mat[box], np.uint8(len(self.materials) - 1), where=mask)
        else:
            np.copyto(self.img[box], np.asarray(color, np.float32)[box], where=mask[..., None])
        if label is not None:
            np.copyto(self.lab[box], np.uint8(label), where=mask)
            np.copyto(self.inst[box], np.uint16(label if instance is None else instance), where=mask)

    def fill(self, shape: Shape, color: Any, label: int, instance: int | None = None) -> None:
        """Paint a box-local ``(mask, box)`` shape from :func:`rect` / :func:`ellipse`."""
        self.paint(shape[0], color, label, shape[1], instance)

    def compose(self) -> np.ndarray:
        """Turn the painted material indices into the float ``[H, W, 3]`` RGB image, each pixel ``base + amp·noise +
        grad·y/H`` of its material, in a few whole-image gathers; colour fields are painted on top afterwards."""
        mats = self.materials
        cells = sorted({m.cell for m in mats if m.amp != 0.0}) or [0.0]
        stack = np.stack([self.noise(c) if c else np.zeros((self.h, self.w), np.float32) for c in cells])
        base = np.stack([m.base for m in mats]).astype(np.float32)
        amp = np.array([m.amp for m in mats], np.float32)
        grad = np.array([m.grad for m in mats], np.float32)
        cell_idx = np.array([cells.index(m.cell) if m.amp != 0.0 else 0 for m in mats], np.intp)
        field = np.take_along_axis(stack, cell_idx[self.mat][None], 0)[0]
        shade = amp[self.mat] * field + grad[self.mat] * (self.yy / self.h)
        self.img = base[self.mat] + shade[..., None]
        return self.img


def ellipse(c: Canvas, cx: float, cy: float, rx: float, ry: float) -> Shape:
    """Filled axis-aligned ellipse."""
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    box = c.box(cx - rx, cy - ry, cx + rx, cy + ry)
    return ((c.xx[box] - cx) / rx) ** 2 + ((c.yy[box] - cy) / ry) ** 2 <= 1, box


def rect(c: Canvas, x0: float, y0: float, x1: float, y1: float) -> Shape:
    """Filled rectangle ``[x0, x1) × [y0, y1)``."""
    box = c.box(x0, y0, x1, y1)
    xx, yy = c.xx[box], c.yy[box]
    return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1), box
