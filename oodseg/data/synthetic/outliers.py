"""The COCO-format Outlier-Exposure source: ``coco/annotations/instances_train2017.json`` + ``coco/train2017/*.jpg``.

Objects are annotated with polygons (odd objects) and RLE masks (even objects) in real COCO 2017 categories, both
ones excluded by ``oodseg.data.coco`` (person, car, ...) and kept ones. Their generator is deliberately disjoint from
the test anomalies (``anomalies``): irregular polygons and clusters of ellipses, painted in one or two smooth random
colours with soft shading, never the anomalies' saturated hue table, patterns or silhouettes, and drawn from their
own seed stream. OE therefore learns "unlike every training class", not the test objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from oodseg.data.synthetic.canvas import Canvas, noise, textured

# Real COCO 2017 category ids/names: the first four are excluded by oodseg.data.coco, the rest are kept.
COCO_CATEGORIES = [(1, "person", "person"), (3, "car", "vehicle"), (2, "bicycle", "vehicle"),
                   (10, "traffic light", "outdoor"), (15, "bench", "outdoor"), (17, "cat", "animal"),
                   (22, "elephant", "animal"), (25, "giraffe", "animal"), (28, "umbrella", "accessory"),
                   (38, "kite", "sports"), (88, "teddy bear", "indoor")]
IMAGE_HW = (128, 160)


def _polygon(rng: np.random.Generator, x0: int, y0: int, bw: int, bh: int) -> list[float]:
    """An irregular polygon of 6–12 vertices at sorted random angles and radii in the box (flat x, y list)."""
    n = int(rng.integers(6, 13))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.55, 1.0, n)
    px = x0 + bw / 2 + rad * np.cos(ang) * bw / 2
    py = y0 + bh / 2 + rad * np.sin(ang) * bh / 2
    return [round(float(v), 2) for xy in zip(px, py) for v in xy]


def _ellipses(rng: np.random.Generator, hh: int, ww: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A cluster of 2–4 overlapping ellipses inside ``box`` (x0, y0, bw, bh) of an ``hh x ww`` image."""
    x0, y0, bw, bh = box
    y, x = np.mgrid[0:hh, 0:ww].astype(np.float32)
    mask = np.zeros((hh, ww), bool)
    for _ in range(int(rng.integers(2, 5))):
        rx, ry = rng.uniform(0.2, 0.5) * bw, rng.uniform(0.2, 0.5) * bh
        cx, cy = rng.uniform(x0 + rx, x0 + bw - rx), rng.uniform(y0 + ry, y0 + bh - ry)
        mask |= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    return mask


def _object_colours(rng: np.random.Generator, hh: int, ww: int) -> np.ndarray:
    """One or two random RGB colours split by a soft random line, with smooth shading (``hh x ww x 3``)."""
    y, x = np.mgrid[0:hh, 0:ww].astype(np.float32)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    th = rng.uniform(0, np.pi)
    t = np.clip(((x - ww / 2) * np.cos(th) + (y - hh / 2) * np.sin(th)) / 6 + 0.5, 0, 1)[..., None]
    if rng.random() < 0.5:
        t = np.zeros_like(t)
    shade = 1.0 + 0.15 * noise(rng, hh, ww, 16)[..., None]
    return (a * (1 - t) + b * t) * shade


def _annotate(rng: np.random.Generator, obj: int, hh: int, ww: int) -> tuple[np.ndarray, Any]:
    """Mask + COCO segmentation (polygon for odd ``obj``, RLE otherwise) of one object."""
    from pycocotools import mask as mask_utils

    bh, bw = int(rng.integers(24, 72)), int(rng.integers(24, 72))
    y0, x0 = int(rng.integers(0, hh - bh)), int(rng.integers(0, ww - bw))
    if obj % 2:
        poly = _polygon(rng, x0, y0, bw, bh)
        pim = Image.new("L", (ww, hh), 0)
        ImageDraw.Draw(pim).polygon(poly, fill=1)
        return np.asarray(pim).astype(bool), [poly]
    mask = _ellipses(rng, hh, ww, (x0, y0, bw, bh))
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return mask, {"size": [hh, ww], "counts": rle["counts"].decode("ascii")}


def _coco_image(rng: np.random.Generator, image_id: int, first_obj: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One COCO-format image (uint8) and its annotations (ids filled in by the caller)."""
    hh, ww = IMAGE_HW
    canvas = Canvas(hh, ww, rng)
    canvas.paint(np.ones((hh, ww), bool), textured(rng, rng.uniform(60, 200, 3), 20, 12), None)
    canvas.compose()
    anns = []
    for k in range(int(rng.integers(1, 4))):
        obj = first_obj + k
        mask, segmentation = _annotate(rng, obj, hh, ww)
        if not mask.any():
            continue
        canvas.paint(mask, _object_colours(rng, hh, ww), None)
        ys, xs = np.nonzero(mask)
        anns.append({"image_id": image_id, "category_id": COCO_CATEGORIES[obj % len(COCO_CATEGORIES)][0],
                     "segmentation": segmentation, "area": float(mask.sum()), "iscrowd": 0,
                     "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                              float(ys.max() - ys.min() + 1)]})
    assert canvas.img is not None
    img = canvas.img + rng.standard_normal(canvas.img.shape, dtype=np.float32) * np.float32(3.0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), anns


def write_coco(out: Path, rngs: list[np.random.Generator], version: int) -> None:
    """Write ``len(rngs)`` images (image ``i`` drawn from ``rngs[i]``) and the annotation file under ``out/coco``."""
    img_dir, ann_dir = out / "coco" / "train2017", out / "coco" / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, rng in enumerate(rngs):
        image_id = 1000 + i
        img, new = _coco_image(rng, image_id, first_obj=3 * i)  # image i holds objects 3i .. 3i + 2
        for a in new:
            anns.append({"id": len(anns) + 1, **a})
        name = f"{image_id:012d}.jpg"
        Image.fromarray(img).save(img_dir / name, quality=92)
        images.append({"id": image_id, "file_name": name, "height": IMAGE_HW[0], "width": IMAGE_HW[1]})
    data = {"info": {"description": "oodseg synthetic COCO-format objects", "version": str(version)},
            "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": i, "name": n, "supercategory": s} for i, n, s in COCO_CATEGORIES]}
    (ann_dir / "instances_train2017.json").write_text(json.dumps(data))
