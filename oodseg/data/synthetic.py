"""Procedural road-scene suite in the real on-disk formats, deterministic from a seed.

``build_suite(out, seed)`` writes, under ``out``:

* ``cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/<city>_<6d>_<6d>_{leftImg8bit,gtFine_labelIds}.png`` with real
  Cityscapes labelIds (road=7, sidewalk=8, building=11, wall=12, fence=13, pole=17, traffic light=19, sign=20,
  vegetation=21, terrain=22, sky=23, person=24, car=26, ego vehicle=1), so the reader's official table yields trainIds.
* ``Validation_Dataset/{RoadAnomaly21 (png), RoadObsticle21 (webp), FS_LostFound_full (png), fs_static (jpg),
  RoadAnomaly (jpg, anomaly=2)}/{images,labels_masks}`` with 0/1/255 labels; the obstacle set marks everything off
  the road as 255 (SMIYC obstacle-track convention); every 5th frame has no anomaly; the ego-vehicle hood is void.
* ``coco/annotations/instances_train2017.json`` + ``coco/train2017/*.jpg``: objects with polygon and RLE masks in
  categories both excluded (person, car, ...) and kept by ``oodseg.data.coco`` (COCO ids/names are the real ones).

Scenes are a street canyon in one-point perspective. For a vertical plane parallel to the street at lateral distance
``D`` seen by a camera at height ``h_c``, a point at height ``Y`` projects with ``(y - y_h)/(x - x_v) = (h_c - Y)/D``
(pinhole model), so facades, walls and fences are bands of constant ``(y - y_h)/|x - x_v|``; objects standing on the
ground at row ``y_b`` scale with ``y_b - y_h``. Colours of road, sidewalk, buildings, overcast sky and cars overlap
(greys), so texture, shape and position are needed to segment them. Every image draws from its own
``SeedSequence([seed, set, index])``, so outputs do not depend on counts or order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SUITE_VERSION = 2  # bump whenever generated content changes: invalidates cached suites
MARKER = ".oodseg_suite.json"
CITIES = {"train": ("synthtown", "synthville"), "val": ("synthburg",)}
ANOMALY_SETS = {  # folder: (image ext, anomaly value, track)
    "RoadAnomaly21": (".png", 1, "anomaly"),
    "RoadObsticle21": (".webp", 1, "obstacle"),
    "FS_LostFound_full": (".png", 1, "anomaly"),
    "fs_static": (".jpg", 1, "anomaly"),
    "RoadAnomaly": (".jpg", 2, "anomaly"),
}
# Real COCO 2017 category ids/names: the first five are excluded by oodseg.data.coco, the rest are kept.
COCO_CATEGORIES = [(1, "person", "person"), (3, "car", "vehicle"), (2, "bicycle", "vehicle"),
                   (10, "traffic light", "outdoor"), (15, "bench", "outdoor"), (17, "cat", "animal"),
                   (22, "elephant", "animal"), (25, "giraffe", "animal"), (28, "umbrella", "accessory"),
                   (38, "kite", "sports"), (88, "teddy bear", "indoor")]

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN = 7, 8, 11, 12, 13, 17, 19, 20
VEGETATION, TERRAIN, SKY, PERSON, CAR, EGO = 21, 22, 23, 24, 26, 1


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
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


def _bank(h: int, w: int, cell: float) -> np.ndarray:
    """A (2h, 2w) noise field per (size, scale), built once per process from a fixed seed; scenes take random
    h x w windows of it (a view, no copy), which is what keeps a scene to a few milliseconds."""
    key = (h, w, cell)
    if key not in _BANK:
        rng = np.random.default_rng(np.random.SeedSequence([h, w, int(round(cell * 100))]))
        _BANK[key] = _noise(rng, 2 * h, 2 * w, cell)
    return _BANK[key]


class _Canvas:
    """Labels and *materials* painted back to front, composed into a float RGB image once at the end.

    Painting a layer only writes a uint8 material index (cheap); ``compose`` then evaluates every material
    (``base + amp·noise_cell + grad·y/H``) with a few whole-image gathers instead of per-layer colour writes.
    After ``compose`` full HxWx3 colour fields can be painted directly (anomaly/object textures).
    """

    def __init__(self, h: int, w: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = h, w, rng
        self.img: np.ndarray | None = None
        self.lab = np.zeros((h, w), np.uint8)
        self.mat = np.zeros((h, w), np.uint8)
        self.materials: list[_Tex] = [_Tex(np.zeros(3, np.float32), 0.0, 0.0)]
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self._noise: dict[float, np.ndarray] = {}

    def noise(self, cell: float) -> np.ndarray:
        if cell not in self._noise:
            oy, ox = self.rng.integers(self.h), self.rng.integers(self.w)
            self._noise[cell] = _bank(self.h, self.w, cell)[oy:oy + self.h, ox:ox + self.w]
        return self._noise[cell]

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        """Pixel slices of the box clipped to the image (objects are painted inside their box only)."""
        ys = slice(int(np.clip(np.floor(y0), 0, self.h)), int(np.clip(np.ceil(y1) + 1, 0, self.h)))
        xs = slice(int(np.clip(np.floor(x0), 0, self.w)), int(np.clip(np.ceil(x1) + 1, 0, self.w)))
        return ys, xs

    def paint(self, mask: np.ndarray, color: Any, label: int | None,
              box: tuple[slice, slice] = (slice(None), slice(None))) -> None:
        """Paint ``color`` (``_Tex`` / RGB vector before ``compose``; HxWx3 field after) and ``label`` under the
        box-local ``mask``."""
        if self.img is None:
            tex = color if isinstance(color, _Tex) else _Tex(np.asarray(color, np.float32), 0.0, 0.0)
            if len(self.materials) == 256:
                raise RuntimeError("more than 255 materials in one scene")
            self.materials.append(tex)
            np.copyto(self.mat[box], np.uint8(len(self.materials) - 1), where=mask)
        else:
            np.copyto(self.img[box], np.asarray(color, np.float32)[box], where=mask[..., None])
        if label is not None:
            np.copyto(self.lab[box], np.uint8(label), where=mask)

    def fill(self, shape: tuple[np.ndarray, tuple[slice, slice]], color: Any, label: int) -> None:
        """Paint a box-local ``(mask, box)`` shape from ``_rect`` / ``_ellipse``."""
        self.paint(shape[0], color, label, shape[1])

    def compose(self) -> np.ndarray:
        mats = self.materials
        cells = sorted({m.cell for m in mats if m.amp != 0.0}) or [0.0]
        stack = np.stack([self.noise(c) if c else np.zeros((self.h, self.w), np.float32) for c in cells])
        base = np.stack([m.base for m in mats]).astype(np.float32)
        amp = np.array([m.amp for m in mats], np.float32)
        grad = np.array([m.grad for m in mats], np.float32)
        cell_idx = np.array([cells.index(m.cell) if m.amp != 0.0 else 0 for m in mats], np.intp)
        noise = np.take_along_axis(stack, cell_idx[self.mat][None], 0)[0]
        shade = amp[self.mat] * noise + grad[self.mat] * (self.yy / self.h)
        self.img = base[self.mat] + shade[..., None]
        return self.img


@dataclass(frozen=True)
class _Tex:
    """Material: RGB ``base`` + ``amp`` × the scene's smooth noise at scale ``cell`` px + ``grad`` × y/H."""

    base: np.ndarray
    amp: float
    cell: float
    grad: float = 0.0


def _textured(rng: np.random.Generator, base: Any, amp: float, cell: float) -> _Tex:
    return _Tex(np.asarray(base, np.float32), float(amp * rng.choice([-1.0, 1.0])), cell)


def _grey(rng: np.random.Generator, lo: float, hi: float, tint: float = 8.0) -> np.ndarray:
    g = rng.uniform(lo, hi)
    return np.clip(g + rng.uniform(-tint, tint, 3), 0, 255)


def render_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One street scene: float RGB image, uint8 Cityscapes labelIds, and geometry (horizon, vanishing x, slopes)."""
    c = _Canvas(h, w, rng)
    yy, xx = c.yy, c.xx
    yh, vx = rng.uniform(0.34, 0.48) * h, rng.uniform(0.4, 0.6) * w
    dy = yy - yh
    adx = np.abs(xx - vx)
    k_road = rng.uniform(0.35, 0.6) * w / (h - yh)  # road half-width per row below horizon
    k_walk = k_road * rng.uniform(1.3, 1.7)  # sidewalk outer edge = foot of the facades
    ground = dy > 0
    # sky: blue gradient or overcast grey (overlaps road/building greys); terrain below the horizon
    sky = np.array([rng.uniform(90, 150), rng.uniform(140, 190), rng.uniform(200, 250)]) if rng.random() < 0.6 \
        else _grey(rng, 120, 210, 4)
    c.paint(~ground, _Tex(sky.astype(np.float32), 10.0, 40, grad=40.0), SKY)
    terr = np.array([rng.uniform(70, 120), rng.uniform(90, 140), rng.uniform(40, 80)])
    c.paint(ground, _textured(rng, terr, 18, 6), TERRAIN)
    # per side a street-canyon plane; h_rel = (y - yh)/|x - vx| is linear in world height, = k_walk on the ground
    for side in (-1, 1):
        dx = np.maximum(side * (xx - vx), 1e-3)
        h_rel = dy / dx
        u = 180.0 / dx  # depth coordinate along the street
        region = (dx > rng.uniform(0.02, 0.12) * w) & (h_rel < k_walk)
        if rng.random() < 0.7:
            heights = rng.uniform(2.5, 7.0, 64)  # building heights in camera heights (~1.5 m)
            top = k_walk * (1 - heights[np.clip((u / rng.uniform(1.5, 3.5)).astype(int), 0, 63)])
            facade = region & (h_rel > top)
            base = _grey(rng, 90, 200, 25) if rng.random() < 0.6 else np.array([rng.uniform(130, 180), 80, 60.0])
            c.paint(facade, _textured(rng, base, 10, 3), BUILDING)
            storey = h_rel / (0.6 * k_walk)  # storeys compressed vs. a real camera so several fit in view
            win = facade & (np.modf(u * 2.5)[0] < 0.45) & (np.modf(storey + 20)[0] < 0.5) & \
                (h_rel < 0.1 * k_walk) & (h_rel > top + 0.2 * k_walk)
            c.paint(win, _textured(rng, base * 0.4 + np.array([15, 30, 50]), 12, 2), BUILDING)
            if rng.random() < 0.3:  # a low wall (~1.2 m) in front of parts of the facade
                wall = region & (h_rel > 0.2 * k_walk) & (np.modf(u / 7)[0] < 0.5)
                c.paint(wall, _textured(rng, _grey(rng, 110, 180), 6, 6), WALL)
        else:  # tree line above a terrain verge, optionally behind a fence
            crowns = region & (h_rel > k_walk * (1 - rng.uniform(2, 5) + 0.6 * c.noise(12))) & \
                (h_rel < k_walk * rng.uniform(0.3, 0.7))
            veg = np.array([rng.uniform(30, 90), rng.uniform(80, 140), rng.uniform(20, 70)])
            c.paint(crowns, _textured(rng, veg, 28, 2), VEGETATION)
            if rng.random() < 0.6:  # fence (~1.5 m) of vertical bars
                fence = region & (h_rel > 0.0) & (np.modf(u * 3)[0] < 0.35)
                c.paint(fence, _textured(rng, _grey(rng, 60, 160), 5, 4), FENCE)
    # sidewalk with perspective tile seams, then the road with lane markings (labels stay road)
    walk = ground & (adx <= k_walk * dy)
    wbase = _grey(rng, 110, 190)
    c.paint(walk, _textured(rng, wbase, 8, 3), SIDEWALK)
    depth = 60.0 / np.maximum(dy, 1.0)
    seams = walk & ((np.modf(depth * 3)[0] < 0.08) | (np.modf((xx - vx) / np.maximum(dy, 1) * 4)[0] < 0.06))
    c.paint(seams, _textured(rng, wbase * 0.8, 8, 3), SIDEWALK)
    road = ground & (adx <= k_road * dy)
    c.paint(road, _textured(rng, _grey(rng, 70, 150), 10, 1.5), ROAD)
    rel = adx / np.maximum(k_road * dy, 1e-3)
    marks = road & (((rel < 0.025) & (np.modf(depth)[0] < 0.5)) | ((rel > 0.93) & (rel < 0.97)))
    c.paint(marks, np.full(3, rng.uniform(200, 240), np.float32), ROAD)
    # objects standing on the ground, far to near
    objects = [("car", rng.uniform(yh + 0.04 * h, h - 2)) for _ in range(rng.integers(0, 5))]
    objects += [("person", rng.uniform(yh + 0.04 * h, h - 2)) for _ in range(rng.integers(0, 5))]
    objects += [("pole", rng.uniform(yh + 0.04 * h, h - 2)) for _ in range(rng.integers(1, 4))]
    for kind, yb in sorted(objects, key=lambda o: o[1]):
        d = yb - yh
        if kind == "car":
            _draw_car(rng, c, vx + rng.choice([-1, 1]) * rng.uniform(0.25, 0.65) * k_road * d, yb, 0.8 * k_road * d)
        else:
            xb = vx + rng.choice([-1, 1]) * rng.uniform(1.05, 0.98 * k_walk / k_road) * k_road * d
            unit = 0.8 * k_road * d  # ~1.8 m at this depth
            (_draw_person if kind == "person" else _draw_pole)(rng, c, xb, yb, unit)
    if rng.random() < 0.3:  # ego-vehicle hood: Cityscapes labelId 1 (ignored)
        hood = yy > h - rng.uniform(0.06, 0.12) * h + 0.15 * h * ((xx - w / 2) / w) ** 2
        c.paint(hood, _textured(rng, _grey(rng, 20, 80), 4, 20), EGO)
    # lighting: global gain + colour cast + smooth shadows
    gain = (rng.uniform(0.65, 1.25) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    img = c.compose()
    img *= gain[None, None, :]
    img *= (1.0 + 0.18 * c.noise(50))[..., None]
    return img, c.lab, {"yh": yh, "vx": vx, "k_road": k_road, "k_walk": k_walk}


def _ellipse(c: _Canvas, cx: float, cy: float, rx: float, ry: float) -> tuple[np.ndarray, tuple[slice, slice]]:
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    box = c.box(cx - rx, cy - ry, cx + rx, cy + ry)
    return ((c.xx[box] - cx) / rx) ** 2 + ((c.yy[box] - cy) / ry) ** 2 <= 1, box


def _rect(c: _Canvas, x0: float, y0: float, x1: float, y1: float) -> tuple[np.ndarray, tuple[slice, slice]]:
    box = c.box(x0, y0, x1, y1)
    xx, yy = c.xx[box], c.yy[box]
    return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1), box


def _draw_car(rng: np.random.Generator, c: _Canvas, xc: float, yb: float, cw: float) -> None:
    body = np.array([rng.uniform(20, 230)] * 3) if rng.random() < 0.5 else rng.uniform(20, 220, 3)
    col = _textured(rng, body, 4, 8)
    bh, ch = 0.42 * cw, 0.3 * cw
    c.fill(_rect(c, xc - cw / 2, yb - bh - 0.1 * cw, xc + cw / 2, yb - 0.1 * cw), col, CAR)
    c.fill(_rect(c, xc - 0.35 * cw, yb - bh - ch, xc + 0.35 * cw, yb - bh), col, CAR)
    c.fill(_rect(c, xc - 0.3 * cw, yb - bh - 0.9 * ch, xc + 0.3 * cw, yb - bh - 0.1 * ch),
            np.array([30, 40, 55.0]) + rng.uniform(0, 40), CAR)
    for sx in (-0.33, 0.33):
        c.fill(_ellipse(c, xc + sx * cw, yb - 0.12 * cw, 0.11 * cw, 0.12 * cw), np.array([15, 15, 15.0]), CAR)
    for sx in (-0.4, 0.4):
        c.fill(_ellipse(c, xc + sx * cw, yb - 0.35 * cw, 0.05 * cw, 0.03 * cw), np.array([230, 220, 150.0]), CAR)


def _draw_person(rng: np.random.Generator, c: _Canvas, xb: float, yb: float, unit: float) -> None:
    hgt = unit * rng.uniform(0.85, 1.05)
    shirt, pants = rng.uniform(10, 240, 3), rng.uniform(10, 120, 3)
    skin = np.array([rng.uniform(120, 230), rng.uniform(90, 170), rng.uniform(70, 140)])
    for sx in (-0.06, 0.06):
        c.fill(_rect(c, xb + (sx - 0.04) * hgt, yb - 0.47 * hgt, xb + (sx + 0.04) * hgt, yb), pants, PERSON)
    c.fill(_ellipse(c, xb, yb - 0.65 * hgt, 0.13 * hgt, 0.2 * hgt), _textured(rng, shirt, 8, 2), PERSON)
    c.fill(_ellipse(c, xb, yb - 0.92 * hgt, 0.065 * hgt, 0.08 * hgt), skin, PERSON)


def _draw_pole(rng: np.random.Generator, c: _Canvas, xb: float, yb: float, unit: float) -> None:
    hgt, pw = unit * rng.uniform(1.6, 2.4), max(1.0, 0.05 * unit)
    c.fill(_rect(c, xb - pw / 2, yb - hgt, xb + pw / 2, yb), _textured(rng, _grey(rng, 60, 140), 5, 2), POLE)
    s = 0.25 * unit
    if rng.random() < 0.5:  # traffic sign: white-rimmed disc or square with a coloured centre
        col = [np.array([200, 30, 30.0]), np.array([30, 70, 190.0]), np.array([230, 200, 40.0])][rng.integers(3)]
        shape = _ellipse(c, xb, yb - hgt, s, s) if rng.random() < 0.5 else _rect(c, xb - s, yb - hgt - s, xb + s,
                                                                                  yb - hgt + s)
        c.fill(shape, np.array([235, 235, 235.0]), SIGN)
        c.fill(_ellipse(c, xb, yb - hgt, 0.7 * s, 0.7 * s), col, SIGN)
    else:  # traffic light: dark box with three lamps, one lit
        box = _rect(c, xb - 0.4 * s, yb - hgt - 1.4 * s, xb + 0.4 * s, yb - hgt + 0.2 * s)
        c.fill(box, np.array([25, 25, 30.0]), LIGHT)
        lit = rng.integers(3)
        for i, lamp in enumerate(([220, 30, 30], [230, 180, 30], [40, 210, 80])):
            on = np.array(lamp, np.float32) * (1.0 if i == lit else 0.25)
            c.fill(_ellipse(c, xb, yb - hgt - 1.1 * s + i * 0.5 * s, 0.22 * s, 0.22 * s), on, LIGHT)


def _shape(rng: np.random.Generator, kind: str, hh: int, ww: int) -> np.ndarray:
    """Anomaly/object silhouette in an ``hh x ww`` box: blob, star, animal-like, or filled box."""
    y, x = np.mgrid[0:hh, 0:ww].astype(np.float32)
    ny, nx = (y + 0.5) / hh * 2 - 1, (x + 0.5) / ww * 2 - 1
    if kind == "blob":
        return nx**2 + ny**2 < 0.75 + 0.35 * _noise(rng, hh, ww, max(hh, ww) / 3)
    if kind == "star":
        n = rng.integers(4, 9)
        r, th = np.hypot(nx, ny), np.arctan2(ny, nx) + rng.uniform(0, np.pi)
        return r < 0.4 + 0.55 * np.abs(np.cos(n * th / 2)) ** 3
    if kind == "animal":
        body = ((nx + 0.1) / 0.6) ** 2 + ((ny + 0.1) / 0.35) ** 2 < 1
        head = ((nx - 0.65) / 0.25) ** 2 + ((ny + 0.45) / 0.25) ** 2 < 1
        legs = (ny > 0.1) & (np.any([np.abs(nx - p) < 0.07 for p in (-0.55, -0.3, 0.1, 0.35)], axis=0))
        tail = (np.abs(ny + 0.15 + 0.5 * (nx + 0.7)) < 0.06) & (nx < -0.6)
        return body | head | legs | tail
    return (np.abs(nx) < 0.9) & (np.abs(ny) < 0.9)


def _texture(rng: np.random.Generator, hh: int, ww: int) -> np.ndarray:
    """Colours/patterns no training class has: saturated hues, checkerboards, stripes, hue ramps."""
    y, x = np.mgrid[0:hh, 0:ww].astype(np.float32)
    hues = np.array([[230, 30, 220], [30, 230, 230], [255, 120, 0], [140, 255, 40], [250, 240, 20], [120, 0, 220]],
                    np.float32)
    a, b = hues[rng.choice(len(hues), 2, replace=False)]
    kind = rng.integers(4)
    period = rng.uniform(3, 9)
    if kind == 0:
        sel = ((x // period + y // period) % 2 == 0)[..., None]
    elif kind == 1:
        sel = (np.modf((x + y * rng.uniform(-1, 1)) / (2 * period))[0] < 0.5)[..., None]
    elif kind == 2:
        t = (x / max(ww - 1, 1))[..., None]
        return a * (1 - t) + b * t
    else:
        return a[None, None, :] + 25 * _noise(rng, hh, ww, 4)[..., None]
    return np.where(sel, a, b)


def _paste_anomalies(rng: np.random.Generator, img: np.ndarray, lab_ids: np.ndarray, geom: dict[str, Any],
                     obstacle: bool) -> np.ndarray:
    """Paint anomalies into ``img`` in place; return the bool anomaly mask."""
    h, w = lab_ids.shape
    yh, vx, k = geom["yh"], geom["vx"], geom["k_road"]
    out = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 4) if obstacle else rng.integers(1, 3)):
        for _try in range(20):  # obstacles must stand on visible road (bottom-centre pixel is road)
            d = rng.uniform(0.15, 0.75 if obstacle else 0.9) * (h - yh)
            yb, xc = yh + d, vx + rng.uniform(-0.7, 0.7) * k * d
            if not obstacle or lab_ids[min(int(yb), h - 1), int(np.clip(xc, 0, w - 1))] == ROAD:
                break
        else:
            continue
        size = k * d * (rng.uniform(0.06, 0.14) if obstacle else rng.uniform(0.35, 0.75))
        bw = max(4, int(size))
        bh = max(4, int(size * rng.uniform(0.6, 1.2)))
        kind = rng.choice(["blob", "star", "animal", "box"])
        m = _shape(rng, kind, bh, bw)
        tex = _texture(rng, bh, bw) * rng.uniform(0.7, 1.1)
        y0, x0 = int(yb) - bh, int(xc - bw / 2)
        ys, xs = slice(max(y0, 0), min(y0 + bh, h)), slice(max(x0, 0), min(x0 + bw, w))
        ly, lx = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
        mm = m[ly, lx]
        img[ys, xs][mm] = tex[ly, lx][mm]
        out[ys, xs] |= mm
    return out


def _to_uint8(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 7))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def _save(arr: np.ndarray, path: Path) -> None:
    ext = path.suffix.lower()
    im = Image.fromarray(arr)
    if ext == ".png":
        im.save(path, compress_level=1)
    elif ext == ".jpg":
        im.save(path, quality=92)
    elif ext == ".webp":
        im.save(path, quality=90, method=4)
    else:
        raise ValueError(f"unsupported extension {ext}")


def _city_frame(out: Path, seed: int, size: tuple[int, int], split: str, i: int) -> None:
    """Cityscapes-format frame ``i`` of ``split`` (streams 1 = train, 2 = val)."""
    rng = _rng(seed, 1 if split == "train" else 2, i)
    img, lab, _ = render_scene(rng, *size)
    cities = CITIES[split]
    city = cities[i % len(cities)]
    prefix = f"{city}_{i // len(cities):06d}_{(i * 19) % 1000000:06d}"
    for sub, arr, tail in (("leftImg8bit", _to_uint8(rng, img), "leftImg8bit"), ("gtFine", lab, "gtFine_labelIds")):
        d = out / "cityscapes" / sub / split / city
        d.mkdir(parents=True, exist_ok=True)
        _save(arr, d / f"{prefix}_{tail}.png")


def _anomaly_frame(out: Path, seed: int, size: tuple[int, int], folder: str, i: int) -> None:
    """Frame ``i`` of anomaly set ``folder`` (streams 10..14); every 5th frame has no anomaly."""
    ext, value, track = ANOMALY_SETS[folder]
    rng = _rng(seed, 10 + list(ANOMALY_SETS).index(folder), i)
    img, lab_ids, geom = render_scene(rng, *size)
    obstacle = track == "obstacle"
    anomaly = _paste_anomalies(rng, img, lab_ids, geom, obstacle) if i % 5 != 4 else np.zeros(lab_ids.shape, bool)
    label = np.zeros(lab_ids.shape, np.uint8)
    if obstacle:
        label[lab_ids != ROAD] = 255
    label[lab_ids == EGO] = 255
    label[anomaly] = value
    base = out / "Validation_Dataset" / folder
    stem = f"validation_{i:04d}"
    _save(_to_uint8(rng, img), base / "images" / f"{stem}{ext}")
    _save(label, base / "labels_masks" / f"{stem}.png")


def _run_frame(task: tuple[Any, ...]) -> None:
    kind, *args = task
    (_city_frame if kind == "city" else _anomaly_frame)(*args)


def _write_coco(out: Path, seed: int, n_images: int) -> None:
    from pycocotools import mask as mask_utils

    img_dir, ann_dir = out / "coco" / "train2017", out / "coco" / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images, anns, obj = [], [], 0
    for i in range(n_images):
        rng = _rng(seed, 30, i)
        hh, ww = 160, 192
        canvas = _Canvas(hh, ww, rng)
        canvas.paint(np.ones((hh, ww), bool), _textured(rng, rng.uniform(60, 200, 3), 20, 12), None)
        canvas.compose()
        image_id = 1000 + i
        for _ in range(rng.integers(1, 4)):
            cat_id = COCO_CATEGORIES[obj % len(COCO_CATEGORIES)][0]
            obj += 1
            bh, bw = int(rng.integers(24, 80)), int(rng.integers(24, 80))
            y0, x0 = int(rng.integers(0, hh - bh)), int(rng.integers(0, ww - bw))
            if obj % 2:  # polygon annotation (a star polygon rasterised by PIL)
                n = int(rng.integers(5, 9))
                ang = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False) + rng.uniform(0, np.pi)
                rad = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.35, 0.7))
                px = x0 + bw / 2 + rad * np.cos(ang) * bw / 2
                py = y0 + bh / 2 + rad * np.sin(ang) * bh / 2
                poly = [round(float(v), 2) for xy in zip(px, py) for v in xy]
                pim = Image.new("L", (ww, hh), 0)
                ImageDraw.Draw(pim).polygon(poly, fill=1)
                mask = np.asarray(pim).astype(bool)
                segmentation: Any = [poly]
            else:  # RLE annotation of a blob / animal silhouette
                mask = np.zeros((hh, ww), bool)
                mask[y0:y0 + bh, x0:x0 + bw] = _shape(rng, str(rng.choice(["blob", "animal"])), bh, bw)
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"size": [hh, ww], "counts": rle["counts"].decode("ascii")}
            if not mask.any():
                continue
            canvas.paint(mask, _texture(rng, hh, ww), None)
            ys, xs = np.nonzero(mask)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id,
                         "segmentation": segmentation, "area": float(mask.sum()), "iscrowd": 0,
                         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                  float(ys.max() - ys.min() + 1)]})
        name = f"{image_id:012d}.jpg"
        _save(_to_uint8(rng, canvas.img), img_dir / name)
        images.append({"id": image_id, "file_name": name, "height": hh, "width": ww})
    data = {"info": {"description": "oodseg synthetic COCO-format objects", "version": str(SUITE_VERSION)},
            "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": i, "name": n, "supercategory": s} for i, n, s in COCO_CATEGORIES]}
    (ann_dir / "instances_train2017.json").write_text(json.dumps(data))


def _params(seed: int, size: tuple[int, int], n_train: int, n_val: int, n_anomaly: int, n_coco: int) -> dict[str, Any]:
    return {"version": SUITE_VERSION, "seed": int(seed), "size": [int(size[0]), int(size[1])],
            "n_train": int(n_train), "n_val": int(n_val), "n_anomaly": int(n_anomaly), "n_coco": int(n_coco)}


def build_suite(out: str | os.PathLike[str], seed: int = 0, size: tuple[int, int] = (256, 512), n_train: int = 120,
                n_val: int = 30, n_anomaly: int = 20, n_coco: int = 24, workers: int = 1) -> Path:
    """Write the whole suite to ``out`` (must be absent or empty); built in a sibling temp dir and renamed atomically,
    so an interrupted build never leaves a partial suite. ``workers`` > 1 renders frames in that many processes
    (identical output). Returns ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: suite output folder exists and is not empty")
    params = _params(seed, size, n_train, n_val, n_anomaly, n_coco)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        size = (int(size[0]), int(size[1]))
        for folder in ANOMALY_SETS:
            (tmp / "Validation_Dataset" / folder / "images").mkdir(parents=True)
            (tmp / "Validation_Dataset" / folder / "labels_masks").mkdir(parents=True)
        tasks = [("city", tmp, seed, size, split, i) for split, n in (("train", n_train), ("val", n_val))
                 for i in range(n)]
        tasks += [("anomaly", tmp, seed, size, folder, i) for folder in ANOMALY_SETS for i in range(n_anomaly)]
        if workers > 1:  # frames are independent (own SeedSequence), so the output does not depend on workers
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_run_frame, tasks, chunksize=4))
        else:
            for task in tasks:
                _run_frame(task)
        _write_coco(tmp, seed, n_coco)
        (tmp / MARKER).write_text(json.dumps({**params, "build_seconds": round(time.perf_counter() - t0, 2)}))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def suite_matches(root: str | os.PathLike[str], **params: Any) -> bool:
    """True when ``root`` holds a completed suite built with exactly ``params`` (see ``_params``)."""
    marker = Path(root) / MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in params.items())


def ensure_suite(root: str | os.PathLike[str], seed: int = 0, **kw: Any) -> Path:
    """Return ``root`` holding the suite for (``seed``, ``kw``), building it only when its completion marker is absent
    or has other parameters. A stale suite (our marker, other params) is replaced; a foreign non-empty folder is
    never deleted. Safe under concurrent callers: a loser of the final rename keeps the winner's identical suite."""
    root = Path(root)
    workers = int(kw.pop("workers", 1))
    defaults = {"size": (256, 512), "n_train": 120, "n_val": 30, "n_anomaly": 20, "n_coco": 24}
    cfg = {**defaults, **kw}
    params = _params(seed, **cfg)
    if suite_matches(root, **params):
        return root
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise FileExistsError(f"{root}: not empty and not an oodseg synthetic suite; refusing to overwrite")
        stale = root.parent / f".{root.name}.stale-{uuid.uuid4().hex[:8]}"
        os.replace(root, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        return build_suite(root, seed=seed, workers=workers, **cfg)
    except (FileExistsError, OSError):
        if suite_matches(root, **params):  # a concurrent builder finished first
            return root
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodseg.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (absent or empty; an existing suite is reused)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--n-val", type=int, default=30)
    p.add_argument("--n-anomaly", type=int, default=20)
    p.add_argument("--n-coco", type=int, default=24)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="rendering processes")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    root = ensure_suite(a.out, seed=a.seed, size=tuple(a.size), n_train=a.n_train, n_val=a.n_val,
                        n_anomaly=a.n_anomaly, n_coco=a.n_coco, workers=a.workers)
    print(f"synthetic suite ready at {root} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
