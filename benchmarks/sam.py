"""SAM cost per image with K box prompts: one embedding + one batched prompt call vs re-embedding for every prompt.

    python benchmarks/sam.py                                  # CPU default: random tiny SAM (256 input), 128x256 images
    python benchmarks/sam.py --ks 1 4 16 64 --images 5
    python benchmarks/sam.py --sam facebook/sam-vit-base --image-size 1024 2048 --device cuda   # the real ViT-B
    HF_HUB_OFFLINE=1 python benchmarks/sam.py --sam /models/sam-vit-base                       # a local directory

``--sam`` is anything ``oodseg.models.sam.create_sam`` accepts: ``tiny`` (random weights, sized by ``--tiny-size``,
``--hidden``, ``--layers``, ``--heads``), a hub id such as ``facebook/sam-vit-base`` (downloaded by transformers
unless ``HF_HUB_OFFLINE=1``), a local transformers SAM directory, or a ``.safetensors`` written by ``save_sam``.

For each K, over ``--images`` random images (one untimed warm-up first) with K random boxes each:

* (a) what the platform does (``refine_s2m``, S2M's released code): ``embed`` once, then one
  ``masks_from_boxes`` call with all K boxes (chunks of ``prompt_batch`` = 64);
* (b) the naive loop: ``embed`` + ``masks_from_boxes`` with one box, K times.

Prints ms/image of (a) and (b) and the ratio b/a (≈ K when the image encoder dominates, as in real SAM), plus the
embedding alone. CUDA is synchronised around every timed region. Weights do not change the cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from oodseg.models.sam import SamSegmenter, create_sam


def random_boxes(rng: np.random.Generator, k: int, h: int, w: int) -> np.ndarray:
    """``k`` xyxy boxes inside an ``h × w`` image, each side at least 4 px."""
    x0 = rng.uniform(0, w - 4, k)
    y0 = rng.uniform(0, h - 4, k)
    x1 = np.minimum(w, x0 + rng.uniform(4, w / 2, k))
    y1 = np.minimum(h, y0 + rng.uniform(4, h / 2, k))
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def embed_only(sam: SamSegmenter, image: np.ndarray, boxes: np.ndarray) -> None:
    """The image encoder alone (no prompt)."""
    sam.embed(image)


def embed_once(sam: SamSegmenter, image: np.ndarray, boxes: np.ndarray) -> None:
    """(a): one embedding, every box in one prompt batch."""
    sam.masks_from_boxes(sam.embed(image), boxes)


def embed_per_prompt(sam: SamSegmenter, image: np.ndarray, boxes: np.ndarray) -> None:
    """(b): the image is encoded again for every box."""
    for box in boxes:
        sam.masks_from_boxes(sam.embed(image), box[None])


def ms_per_image(fn: Callable[[SamSegmenter, np.ndarray, np.ndarray], None], sam: SamSegmenter,
                 images: list[np.ndarray], boxes: list[np.ndarray]) -> float:
    """Mean wall milliseconds of ``fn`` per image (the first image once untimed, as warm-up)."""
    sync = torch.cuda.synchronize if sam.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        fn(sam, images[0], boxes[0])
        sync()
        t0 = time.perf_counter()
        for image, b in zip(images, boxes):
            fn(sam, image, b)
        sync()
    return 1000 * (time.perf_counter() - t0) / len(images)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", default="tiny", help="tiny | hub id (facebook/sam-vit-base) | local dir | .safetensors")
    p.add_argument("--tiny-size", type=int, default=256, help="tiny SAM input size (multiple of 16)")
    p.add_argument("--hidden", type=int, default=64, help="tiny SAM hidden size")
    p.add_argument("--layers", type=int, default=4, help="tiny SAM encoder layers")
    p.add_argument("--heads", type=int, default=4, help="tiny SAM attention heads")
    p.add_argument("--image-size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16], help="box prompts per image")
    p.add_argument("--images", type=int, default=5, help="timed images per K")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    device = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
    cfg = dict(image_size=a.tiny_size, hidden=a.hidden, layers=a.layers, heads=a.heads) if a.sam == "tiny" else {}
    sam = create_sam(a.sam, **cfg).to(device).eval()
    rng = np.random.default_rng(0)
    h, w = a.image_size
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(a.images + 1)]
    n_params = sum(p.numel() for p in sam.parameters()) / 1e6
    print(f"SAM {a.sam} ({n_params:.1f} M parameters, input {sam.image_processor.size['longest_edge']}) on {device}, "
          f"{a.threads} thread(s), images {h}x{w}, {a.images} timed per K", file=sys.stderr)
    print(f"embedding alone: {ms_per_image(embed_only, sam, images, [np.empty((0, 4))] * len(images)):9.1f} ms/image")
    print(f"{'K':>4}  {'(a) embed once':>16}  {'(b) embed per prompt':>20}  {'b/a':>6}")
    for k in a.ks:
        boxes = [random_boxes(rng, k, h, w) for _ in images]
        once = ms_per_image(embed_once, sam, images, boxes)
        naive = ms_per_image(embed_per_prompt, sam, images, boxes)
        print(f"{k:>4}  {once:>11.1f} ms/im  {naive:>15.1f} ms/im  {naive / once:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
