"""Writing, caching and the command line of the synthetic suite (layout: the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from oodseg.data.synthetic.anomalies import STYLES, paste_anomalies
from oodseg.data.synthetic.outliers import write_coco
from oodseg.data.synthetic.scene import EGO, ROAD, render_scene

SUITE_VERSION = 4  # bump whenever generated content changes: invalidates cached suites (and the demo models on them)
MARKER = ".oodseg_suite.json"
CITIES = {"train": ("synthtown", "synthville"), "val": ("synthburg",)}
ANOMALY_SETS = {  # folder: (image ext, anomaly value, track)
    "RoadAnomaly21": (".png", 1, "anomaly"),
    "RoadObsticle21": (".webp", 1, "obstacle"),
    "FS_LostFound_full": (".png", 1, "anomaly"),
    "fs_static": (".jpg", 1, "anomaly"),
    "RoadAnomaly": (".jpg", 2, "anomaly"),
}
DEFAULTS: dict[str, Any] = {"size": (128, 256), "n_train": 200, "n_val": 30, "n_anomaly": 20, "n_coco": 24}
STREAM_TRAIN, STREAM_VAL, STREAM_ANOMALY, STREAM_COCO = 1, 2, 10, 30  # SeedSequence([seed, stream (+ set), index])


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def _to_uint8(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Add sensor noise (σ ∈ [2, 6]) and quantise."""
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 6))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _save(arr: np.ndarray, path: Path) -> None:
    """PNG (8- or 16-bit by dtype), JPEG or WebP by the file extension."""
    ext = path.suffix.lower()
    im = Image.fromarray(arr)
    if ext == ".png":
        im.save(path, compress_level=1)
    elif ext == ".jpg":
        im.save(path, quality=92)
    elif ext == ".webp":
        im.save(path, quality=90, method=4)
    else:
        raise ValueError(f"{path}: unsupported extension {ext}")


def _city_frame(out: Path, seed: int, size: tuple[int, int], split: str, i: int) -> None:
    """Cityscapes-format frame ``i`` of ``split``: leftImg8bit, gtFine labelIds and 16-bit instanceIds."""
    rng = _rng(seed, STREAM_TRAIN if split == "train" else STREAM_VAL, i)
    scene = render_scene(rng, *size)
    cities = CITIES[split]
    city = cities[i % len(cities)]
    prefix = f"{city}_{i // len(cities):06d}_{(i * 19) % 1000000:06d}"
    files = (("leftImg8bit", _to_uint8(rng, scene.image), "leftImg8bit"), ("gtFine", scene.labels, "gtFine_labelIds"),
             ("gtFine", scene.instances, "gtFine_instanceIds"))
    for sub, arr, tail in files:
        d = out / "cityscapes" / sub / split / city
        d.mkdir(parents=True, exist_ok=True)
        _save(arr, d / f"{prefix}_{tail}.png")


def _anomaly_frame(out: Path, seed: int, size: tuple[int, int], folder: str, i: int) -> None:
    """Frame ``i`` of anomaly set ``folder`` (SMIYC sets: every 5th has no anomaly); the ego hood is void, and so is
    everything off the road in the obstacle track (SMIYC convention)."""
    ext, value, track = ANOMALY_SETS[folder]
    rng = _rng(seed, STREAM_ANOMALY + list(ANOMALY_SETS).index(folder), i)
    scene = render_scene(rng, *size)
    style = STYLES[folder]
    has = not style.empty_every or i % style.empty_every != style.empty_every - 1
    anomaly = paste_anomalies(rng, scene, style) if has else np.zeros(scene.labels.shape, bool)
    label = np.zeros(scene.labels.shape, np.uint8)
    if track == "obstacle":
        label[scene.labels != ROAD] = 255
    label[scene.labels == EGO] = 255
    label[anomaly] = value
    base = out / "Validation_Dataset" / folder
    stem = f"validation_{i:04d}"
    _save(_to_uint8(rng, scene.image), base / "images" / f"{stem}{ext}")
    _save(label, base / "labels_masks" / f"{stem}.png")


def _run_frame(task: tuple[Any, ...]) -> None:
    kind, *args = task
    (_city_frame if kind == "city" else _anomaly_frame)(*args)


def _params(seed: int, size: tuple[int, int], n_train: int, n_val: int, n_anomaly: int, n_coco: int) -> dict[str, Any]:
    return {"version": SUITE_VERSION, "seed": int(seed), "size": [int(size[0]), int(size[1])],
            "n_train": int(n_train), "n_val": int(n_val), "n_anomaly": int(n_anomaly), "n_coco": int(n_coco)}


def _render_all(tmp: Path, seed: int, size: tuple[int, int], counts: dict[str, int], workers: int) -> None:
    """Every frame of the suite into ``tmp`` (frames are independent, so ``workers`` does not change the output)."""
    for folder in ANOMALY_SETS:
        (tmp / "Validation_Dataset" / folder / "images").mkdir(parents=True)
        (tmp / "Validation_Dataset" / folder / "labels_masks").mkdir(parents=True)
    tasks = [("city", tmp, seed, size, split, i) for split in ("train", "val") for i in range(counts[split])]
    tasks += [("anomaly", tmp, seed, size, folder, i) for folder in ANOMALY_SETS for i in range(counts["anomaly"])]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_run_frame, tasks, chunksize=4))
    else:
        for task in tasks:
            _run_frame(task)
    write_coco(tmp, [_rng(seed, STREAM_COCO, i) for i in range(counts["coco"])], SUITE_VERSION)


def build_suite(out: str | os.PathLike[str], seed: int = 0, size: tuple[int, int] = DEFAULTS["size"],
                n_train: int = DEFAULTS["n_train"], n_val: int = DEFAULTS["n_val"],
                n_anomaly: int = DEFAULTS["n_anomaly"], n_coco: int = DEFAULTS["n_coco"], workers: int = 1) -> Path:
    """Write the whole suite to ``out`` (must be absent or empty); built in a sibling temp dir and renamed atomically,
    so an interrupted build never leaves a partial suite. ``workers`` > 1 renders frames in that many processes
    (identical output). Returns ``out``.

    Args:
        seed: base seed; every frame draws from its own ``SeedSequence([seed, stream, index])``.
        size: frame ``(H, W)`` in pixels.
        n_train, n_val: Cityscapes-format frames in ``train`` / ``val``.
        n_anomaly: frames in each of the five anomaly sets (:data:`ANOMALY_SETS`).
        n_coco: COCO-format outlier images (under ``coco/``).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: suite output folder exists and is not empty")
    params = _params(seed, size, n_train, n_val, n_anomaly, n_coco)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        counts = {"train": n_train, "val": n_val, "anomaly": n_anomaly, "coco": n_coco}
        _render_all(tmp, seed, (int(size[0]), int(size[1])), counts, workers)
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
    cfg = {**DEFAULTS, **kw}
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
    p = argparse.ArgumentParser(prog="python -m oodseg.data.synthetic",
                                description="Build (or reuse) the synthetic road suite.")
    p.add_argument("--out", required=True, help="output folder (absent or empty; an existing suite is reused)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, default=DEFAULTS["size"], metavar=("H", "W"))
    p.add_argument("--n-train", type=int, default=DEFAULTS["n_train"])
    p.add_argument("--n-val", type=int, default=DEFAULTS["n_val"])
    p.add_argument("--n-anomaly", type=int, default=DEFAULTS["n_anomaly"])
    p.add_argument("--n-coco", type=int, default=DEFAULTS["n_coco"])
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="rendering processes")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    root = ensure_suite(a.out, seed=a.seed, size=tuple(a.size), n_train=a.n_train, n_val=a.n_val,
                        n_anomaly=a.n_anomaly, n_coco=a.n_coco, workers=a.workers)
    print(f"synthetic suite ready at {root} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
