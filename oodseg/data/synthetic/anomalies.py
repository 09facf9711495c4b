"""Test anomalies: large or small objects of saturated, unnaturally patterned material standing on the ground.

No in-distribution class has these colours (fully saturated magenta, cyan, lime, orange, violet, yellow, pink) or
patterns (patchworks, stripes, rings, checkerboards, hue ramps), and none of their silhouettes (blob, star,
four-legged animal, crate). The Outlier-Exposure objects of the COCO-format folder (``outliers``) come from a different generator
(polygons and ellipse clusters in smooth random colours), so OE never sees a test anomaly.

Each set has its own :class:`AnomalyStyle`, after the character of the real benchmark it stands in for: large
objects anywhere on the ground (RoadAnomaly21's fill up to 60 % of the frame width; Road Anomaly, and the pasted
objects of Fishyscapes Static), small obstacles on the road (RoadObstacle21, Lost&Found).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oodseg.data.synthetic.canvas import noise
from oodseg.data.synthetic.scene import ROAD, Scene

HUES = np.array([[240, 30, 220], [20, 225, 240], [150, 255, 30], [255, 130, 0], [140, 20, 255], [255, 240, 20],
                 [255, 90, 170]], np.float32)
KINDS = ("blob", "star", "animal", "crate")


@dataclass(frozen=True)
class AnomalyStyle:
    """Objects per frame (inclusive range), width as a fraction of the road half-width at the object's depth, depth
    of its foot as a fraction of the ground rows below the horizon, lateral extent in road half-widths, silhouettes,
    whether the foot must stand on a road pixel, the largest width as a fraction of the frame width, and every how
    many frames one has no anomaly (0: never)."""

    count: tuple[int, int]
    size: tuple[float, float]
    depth: tuple[float, float]
    lateral: float
    kinds: tuple[str, ...] = KINDS
    on_road: bool = False
    max_width: float = 0.35
    empty_every: int = 0


STYLES = {  # SMIYC's sets include frames without anomalies (component metrics reward predicting nothing there)
    "RoadAnomaly21": AnomalyStyle((1, 2), (1.4, 2.4), (0.35, 0.9), 1.1, max_width=0.6, empty_every=5),
    "RoadObsticle21": AnomalyStyle((1, 3), (0.1, 0.24), (0.3, 0.85), 0.75, on_road=True, empty_every=5),
    "FS_LostFound_full": AnomalyStyle((1, 3), (0.12, 0.26), (0.3, 0.9), 0.7, ("crate", "blob"), on_road=True),
    "fs_static": AnomalyStyle((1, 2), (0.8, 1.4), (0.3, 0.9), 1.3, max_width=0.45),
    "RoadAnomaly": AnomalyStyle((1, 2), (1.0, 1.6), (0.4, 0.9), 0.9, ("animal", "blob", "star", "crate")),
}


def silhouette(rng: np.random.Generator, kind: str, hh: int, ww: int) -> np.ndarray:
    """Bool mask of a ``kind`` silhouette filling an ``hh x ww`` box."""
    y, x = np.mgrid[0:hh, 0:ww].astype(np.float32)
    ny, nx = (y + 0.5) / hh * 2 - 1, (x + 0.5) / ww * 2 - 1
    if kind == "blob":
        return nx**2 + ny**2 < 0.75 + 0.35 * noise(rng, hh, ww, max(hh, ww) / 3)
    if kind == "star":
        n = rng.integers(4, 9)
        r, th = np.hypot(nx, ny), np.arctan2(ny, nx) + rng.uniform(0, np.pi)
        return r < 0.4 + 0.55 * np.abs(np.cos(n * th / 2)) ** 3
    if kind == "animal":
        body = ((nx + 0.1) / 0.6) ** 2 + ((ny + 0.1) / 0.35) ** 2 < 1
        head = ((nx - 0.65) / 0.25) ** 2 + ((ny + 0.45) / 0.25) ** 2 < 1
        legs = (ny > 0.1) & (np.any([np.abs(nx - p) < 0.08 for p in (-0.55, -0.3, 0.1, 0.35)], axis=0))
        tail = (np.abs(ny + 0.15 + 0.5 * (nx + 0.7)) < 0.07) & (nx < -0.6)
        return body | head | legs | tail
    return (np.abs(nx) < 0.92) & (np.abs(ny) < 0.92)


def pattern(rng: np.random.Generator, hh: int, ww: int) -> np.ndarray:
    """``hh x ww x 3`` float material in two to four saturated hues: a patchwork of cells, stripes, rings, a coarse
    checkerboard or a hue ramp (periods of 4–10 px, so the hues stay distinct at the model's resolution)."""
    y, x = np.mgrid[0:hh, 0:ww].astype(np.float32)
    hues = HUES[rng.choice(len(HUES), 4, replace=False)]
    period = rng.uniform(4, 10)
    kind = rng.integers(5)
    if kind == 0:
        cells = rng.integers(4, size=(int(hh / period) + 1, int(ww / period) + 1))
        return hues[cells[(y / period).astype(int), (x / period).astype(int)]]
    if kind == 1:
        return hues[(np.abs(x + y * rng.uniform(-1, 1)) / period).astype(int) % 3]
    if kind == 2:
        return hues[(np.hypot(x - ww / 2, y - hh / 2) / period).astype(int) % 3]
    if kind == 3:
        return hues[((x // period + y // period) % 2).astype(int)]
    t = (x / max(ww - 1, 1))[..., None]
    return hues[0] * (1 - t) + hues[1] * t


def _foot(rng: np.random.Generator, scene: Scene, style: AnomalyStyle) -> tuple[float, float, float] | None:
    """(foot row, centre column, road half-width there) of one object, or None when no valid spot was found."""
    h, w = scene.labels.shape
    yh, vx, k = scene.geom["yh"], scene.geom["vx"], scene.geom["k_road"]
    for _ in range(20):
        d = rng.uniform(*style.depth) * (h - yh)
        yb, xc = yh + d, vx + rng.uniform(-style.lateral, style.lateral) * k * d
        if not 0 <= xc < w:
            continue
        if not style.on_road or scene.labels[min(int(yb), h - 1), int(xc)] == ROAD:
            return yb, xc, k * d
    return None


def paste_anomalies(rng: np.random.Generator, scene: Scene, style: AnomalyStyle) -> np.ndarray:
    """Paint anomalies of ``style`` into ``scene.image`` in place; return the bool anomaly mask."""
    h, w = scene.labels.shape
    out = np.zeros((h, w), bool)
    for _ in range(rng.integers(style.count[0], style.count[1] + 1)):
        spot = _foot(rng, scene, style)
        if spot is None:
            continue
        yb, xc, half_road = spot
        size = half_road * rng.uniform(*style.size)
        bw = int(np.clip(size, 4, style.max_width * w))
        bh = int(np.clip(size * rng.uniform(0.6, 1.1), 4, 0.4 * h))
        m = silhouette(rng, str(rng.choice(style.kinds)), bh, bw)
        tex = pattern(rng, bh, bw) * rng.uniform(0.8, 1.0)
        y0, x0 = int(yb) - bh, int(xc - bw / 2)
        ys, xs = slice(max(y0, 0), min(y0 + bh, h)), slice(max(x0, 0), min(x0 + bw, w))
        ly, lx = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
        mm = m[ly, lx]
        scene.image[ys, xs][mm] = tex[ly, lx][mm]
        out[ys, xs] |= mm
    return out
