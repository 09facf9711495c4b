"""In-distribution street scenes: one-point-perspective street canyons with real Cityscapes labelIds.

For a vertical plane parallel to the street at lateral distance ``D`` seen by a camera at height ``h_c``, a point at
height ``Y`` projects with ``(y - y_h)/(x - x_v) = (h_c - Y)/D`` (pinhole model), so facades are bands of constant
``(y - y_h)/|x - x_v|``; objects standing on the ground at row ``y_b`` scale with ``y_b - y_h``.

Classes (labelIds): road 7, sidewalk 8, building 11, vegetation 21, terrain 22, sky 23, person 24, car 26 and the
ego-vehicle hood 1 (void). Fewer classes than Cityscapes (no thin poles, signs, walls or fences, which a CPU-minute
model at 128×256 does not learn) and each with its own colour family and texture scale, in muted palettes only, so a
small network learns them in a few CPU-minutes; what makes an object an anomaly (``anomalies``) is absent from every
class here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oodseg.data.synthetic.canvas import Canvas, Shape, Tex, ellipse, rect, textured, tinted

ROAD, SIDEWALK, BUILDING, VEGETATION, TERRAIN, SKY, PERSON, CAR, EGO = 7, 8, 11, 21, 22, 23, 24, 26, 1
INSTANCE_OFFSET = 1000  # Cityscapes instanceIds: labelId·1000 + k for person / car objects


@dataclass
class Scene:
    """A rendered scene: float RGB ``image``, uint8 ``labels`` (labelIds), uint16 ``instances`` (instanceIds) and the
    ground geometry (horizon row ``yh``, vanishing column ``vx``, road / sidewalk half-width per row below the
    horizon ``k_road`` / ``k_walk``)."""

    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    geom: dict[str, float] = field(default_factory=dict)


def _backdrop(rng: np.random.Generator, c: Canvas, yh: float) -> None:
    """Blue sky with a brighter horizon; terrain below the horizon where nothing else is painted."""
    ground = c.yy > yh
    sky = np.array([rng.uniform(70, 130), rng.uniform(130, 180), rng.uniform(210, 250)], np.float32)
    c.paint(~ground, Tex(sky, 6.0, 40, grad=45.0), SKY)
    terr = np.array([rng.uniform(95, 130), rng.uniform(135, 165), rng.uniform(45, 75)])  # light grass green
    c.paint(ground, textured(rng, terr, 10, 8), TERRAIN)


def _side(rng: np.random.Generator, c: Canvas, side: int, g: dict[str, float]) -> None:
    """One side of the street: a row of buildings at the sidewalk edge (70 %), or a tree line behind a grass verge.

    With ``h_rel = (y - y_h)/|x - x_v|``, a vertical plane at lateral distance ``K`` camera heights shows height ``Y``
    (camera heights) at ``h_rel = (1 - Y)/K``; the ground at lateral distance ``K`` is ``h_rel = 1/K``."""
    yh, vx, k_walk, w = g["yh"], g["vx"], g["k_walk"], c.w
    dx = np.maximum(side * (c.xx - vx), 1e-3)
    h_rel = (c.yy - yh) / dx
    u = 180.0 / dx  # depth coordinate along the street
    region = dx > rng.uniform(0.02, 0.1) * w
    if rng.random() < 0.3:
        k_plane = k_walk * rng.uniform(2.0, 3.5)  # the verge between sidewalk and trees shows the terrain backdrop
        crown_top = 1 - rng.uniform(3, 6) + 0.8 * c.noise(12)
        trees = region & (h_rel < 1 / k_plane) & (h_rel > crown_top / k_plane)
        veg = np.array([rng.uniform(30, 70), rng.uniform(90, 140), rng.uniform(20, 50)])
        c.paint(trees, textured(rng, veg, 30, 2), VEGETATION)
        return
    heights = rng.uniform(2.5, 7.0, 64)  # building heights in camera heights (~1.5 m)
    height = heights[np.clip((u / rng.uniform(1.5, 3.5)).astype(int), 0, 63)]
    y_world = 1 - h_rel * k_walk  # height on the facade plane, camera heights
    facade = region & (h_rel < 1 / k_walk) & (y_world < height)
    palette = ([rng.uniform(140, 180), rng.uniform(65, 95), rng.uniform(50, 75)],  # brick
               [rng.uniform(175, 215), rng.uniform(150, 180), rng.uniform(110, 140)],  # sandstone
               [rng.uniform(140, 170), rng.uniform(145, 175), rng.uniform(160, 190)])  # blue-grey plaster
    base = np.asarray(palette[rng.integers(3)], np.float32)
    c.paint(facade, textured(rng, base, 8, 3), BUILDING)
    win = facade & (np.modf(u * 2.5)[0] < 0.45) & (np.modf(y_world / 1.5)[0] > 0.35) & (y_world > 1.4) & \
        (y_world < height - 0.5)
    c.paint(win, textured(rng, np.array([40, 50, 70.0]) + rng.uniform(0, 25), 10, 2), BUILDING)


def _ground(rng: np.random.Generator, c: Canvas, g: dict[str, float]) -> None:
    """Light sidewalk with perspective tile seams, dark road with lane markings (labels stay road)."""
    yh, vx, k_road, k_walk = g["yh"], g["vx"], g["k_road"], g["k_walk"]
    dy = c.yy - yh
    adx = np.abs(c.xx - vx)
    ground = dy > 0
    walk = ground & (adx <= k_walk * dy)
    wbase = tinted(rng, 165, 205, 4) + np.array([8, 4, -6])
    c.paint(walk, textured(rng, wbase, 6, 3), SIDEWALK)
    depth = 60.0 / np.maximum(dy, 1.0)
    seams = walk & ((np.modf(depth * 3)[0] < 0.1) | (np.modf((c.xx - vx) / np.maximum(dy, 1) * 4)[0] < 0.08))
    c.paint(seams, textured(rng, wbase * 0.8, 6, 3), SIDEWALK)
    road = ground & (adx <= k_road * dy)
    c.paint(road, textured(rng, tinted(rng, 60, 105, 3), 8, 1.5), ROAD)
    rel = adx / np.maximum(k_road * dy, 1e-3)
    marks = road & (((rel < 0.03) & (np.modf(depth)[0] < 0.5)) | ((rel > 0.92) & (rel < 0.96)))
    c.paint(marks, np.full(3, rng.uniform(205, 235), np.float32), ROAD)


def _objects(rng: np.random.Generator, c: Canvas, g: dict[str, float]) -> None:
    """Cars on the road and people on the sidewalk or crossing the road, painted far to near."""
    yh, vx, k_road, k_walk, h = g["yh"], g["vx"], g["k_road"], g["k_walk"], c.h
    objects = [("car", rng.uniform(yh + 0.06 * h, h - 2)) for _ in range(rng.integers(0, 4))]
    objects += [("person", rng.uniform(yh + 0.1 * h, h - 2)) for _ in range(rng.integers(1, 5))]
    count = {"car": 0, "person": 0}
    for kind, yb in sorted(objects, key=lambda o: o[1]):
        d = yb - yh
        unit = 0.8 * k_road * d  # ~1.8 m at this depth
        if kind == "car":
            xc = vx + rng.choice([-1, 1]) * rng.uniform(0.25, 0.65) * k_road * d
            _draw_car(rng, c, xc, yb, unit, CAR * INSTANCE_OFFSET + count["car"])
        elif kind == "person":  # on the sidewalk, or crossing the road (half of them)
            lateral = rng.uniform(0.0, 0.9) if rng.random() < 0.5 else rng.uniform(1.05, 0.98 * k_walk / k_road)
            xb = vx + rng.choice([-1, 1]) * lateral * k_road * d
            _draw_person(rng, c, xb, yb, unit, PERSON * INSTANCE_OFFSET + count["person"])
        count[kind] += 1


def render_scene(rng: np.random.Generator, h: int, w: int) -> Scene:
    """One street scene, lit by a global gain, a mild colour cast and smooth shadows."""
    c = Canvas(h, w, rng)
    yh = rng.uniform(0.34, 0.46) * h
    k_road = rng.uniform(0.45, 0.7) * w / (h - yh)  # road half-width per row below the horizon
    g = {"yh": yh, "vx": rng.uniform(0.4, 0.6) * w, "k_road": k_road, "k_walk": k_road * rng.uniform(1.3, 1.6)}
    _backdrop(rng, c, yh)
    for side in (-1, 1):
        _side(rng, c, side, g)
    _ground(rng, c, g)
    _objects(rng, c, g)
    if rng.random() < 0.3:  # ego-vehicle hood: Cityscapes labelId 1 (void)
        hood = c.yy > h - rng.uniform(0.06, 0.12) * h + 0.15 * h * ((c.xx - w / 2) / w) ** 2
        c.paint(hood, textured(rng, tinted(rng, 20, 60), 4, 20), EGO)
    gain = (rng.uniform(0.8, 1.15) * rng.uniform(0.95, 1.05, 3)).astype(np.float32)
    img = c.compose()
    img *= gain[None, None, :]
    img *= (1.0 + 0.12 * c.noise(50))[..., None]
    return Scene(img, c.lab, c.inst, g)


def _muted(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A low-saturation colour: a grey level in [lo, hi] plus a channel offset of at most ±25."""
    return np.clip(rng.uniform(lo, hi) + rng.uniform(-25, 25, 3), 0, 255)


def _draw_car(rng: np.random.Generator, c: Canvas, xc: float, yb: float, cw: float, inst: int) -> None:
    col = textured(rng, _muted(rng, 30, 220), 4, 8)
    bh, ch = 0.42 * cw, 0.3 * cw

    def paint(shape: Shape, colour: Any) -> None:  # every part belongs to this car
        c.fill(shape, colour, CAR, inst)

    paint(rect(c, xc - cw / 2, yb - bh - 0.1 * cw, xc + cw / 2, yb - 0.1 * cw), col)
    paint(rect(c, xc - 0.35 * cw, yb - bh - ch, xc + 0.35 * cw, yb - bh), col)
    paint(rect(c, xc - 0.3 * cw, yb - bh - 0.9 * ch, xc + 0.3 * cw, yb - bh - 0.1 * ch),
          np.array([30, 40, 55.0]) + rng.uniform(0, 30))
    for sx in (-0.33, 0.33):
        paint(ellipse(c, xc + sx * cw, yb - 0.12 * cw, 0.11 * cw, 0.12 * cw), np.array([15, 15, 15.0]))
    for sx in (-0.4, 0.4):
        paint(ellipse(c, xc + sx * cw, yb - 0.35 * cw, 0.05 * cw, 0.03 * cw), np.array([225, 220, 190.0]))


def _draw_person(rng: np.random.Generator, c: Canvas, xb: float, yb: float, unit: float, inst: int) -> None:
    hgt = unit * rng.uniform(0.95, 1.15)
    shirt, pants = _muted(rng, 40, 190), _muted(rng, 25, 100)
    skin = np.array([rng.uniform(150, 220), rng.uniform(110, 165), rng.uniform(90, 135)])
    for sx in (-0.06, 0.06):
        c.fill(rect(c, xb + (sx - 0.045) * hgt, yb - 0.47 * hgt, xb + (sx + 0.045) * hgt, yb), pants, PERSON, inst)
    c.fill(ellipse(c, xb, yb - 0.65 * hgt, 0.14 * hgt, 0.2 * hgt), textured(rng, shirt, 6, 2), PERSON, inst)
    c.fill(ellipse(c, xb, yb - 0.92 * hgt, 0.07 * hgt, 0.085 * hgt), skin, PERSON, inst)
