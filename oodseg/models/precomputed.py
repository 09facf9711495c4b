"""``precomputed``: another method's saved anomaly score maps as a model — one file per image, matched by the image's
stem (or the dataset's sample id), returned as :class:`~oodseg.outputs.ScoreMaps` and scored by the one scorer of the
``score`` kind (``precomputed``), so they go through the pixel, component and S2M metrics and the refine stage like
any model's scores. This is how a user evaluates saved outputs, and how S2M's released maps are read.

Config: ``folder`` (a directory; ``{dataset}`` in it is replaced by the dataset's results key; or a mapping
``{dataset key: directory}``) and ``pattern``, a file name under it with the fields ``{stem}`` (image file stem),
``{id}`` (the dataset's sample id) and ``{dataset}``. Formats (``format``; ``auto``: from the pattern's suffix):

* ``npz`` — ``np.load(file)[key]``, ``key="arr_0"`` by default: S2M's release (``np.savez`` of an H×W float map;
  WenjieZhao1/S2M ``datasets/validation/val_score.py`` reads ``np.load(score)['arr_0']``);
* ``npy`` — ``np.load(file)``;
* ``png`` — a single-channel (16-bit) PNG; score = pixel value × ``scale`` (default ``1/65535``: [0, 1]);
* ``smiyc`` — the SegmentMeIfYouCan submission files: ``anomaly_p/<method>/<dataset>/<frame id>.hdf5`` holding
  the float16 map in the HDF5 dataset ``value`` (road-anomaly-benchmark ``evaluation.py``: ``ChannelLoaderHDF5``,
  frame id = image stem); point ``folder`` at ``anomaly_p/<method>/<dataset>``. Needs ``h5py``.

Arrays may carry leading singleton dimensions (``[1, H, W]``). A map that is missing, unreadable, of another size
than its image, or has NaN/inf pixels raises :class:`~oodseg.models.base.SourceError` for that image (the benchmark
records a ``failures`` row; every other image is scored). No pickles are read (``allow_pickle=False``).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from oodseg.models.base import ImageSource, SegModel, SourceError, to_nchw_uint8
from oodseg.models.factory import register_model
from oodseg.outputs import ScoreMaps

#: format → (file suffix, default array key)
FORMATS: dict[str, tuple[str, str]] = {"npz": (".npz", "arr_0"), "npy": (".npy", ""), "png": (".png", ""),
                                       "smiyc": (".hdf5", "value")}
FIELDS = ("stem", "id", "dataset")


class MapError(ValueError):
    """One unusable map file (the message names it)."""


def _format_of(pattern: str, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"precomputed: unknown format {fmt!r}; one of auto, {', '.join(FORMATS)}")
        return fmt
    suffix = Path(pattern).suffix.lower()
    by_suffix = {s: f for f, (s, _) in FORMATS.items()} | {".h5": "smiyc"}
    if suffix not in by_suffix:
        raise ValueError(f"precomputed: pattern {pattern!r}: unknown format {suffix or '(no suffix)'!r}; "
                         f"use {', '.join(sorted(by_suffix))} or set format")
    return by_suffix[suffix]


def _check_pattern(pattern: str) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
    if fields - set(FIELDS) or not fields & {"stem", "id"}:
        raise ValueError(f"precomputed: pattern {pattern!r} must name the image by {{stem}} or {{id}} and may use "
                         f"only {', '.join('{' + f + '}' for f in FIELDS)}")


def _check_folder(folder: str) -> None:
    fixed = Path(folder.split("{dataset}")[0] or ".")
    if not fixed.is_dir():
        raise ValueError(f"precomputed: folder {folder}: {fixed} is not a directory")


def read_array(path: Path, fmt: str, key: str, scale: float) -> np.ndarray:
    """The raw map of one file as float32 (``MapError`` naming the file when it is missing or unreadable)."""
    if not path.is_file():
        raise MapError(f"{path}: score map not found")
    try:
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as z:
                if key not in z.files:
                    raise MapError(f"{path}: no array {key!r} (has {', '.join(z.files) or 'none'})")
                arr = z[key]
        elif fmt == "npy":
            arr = np.load(path, allow_pickle=False)
        elif fmt == "png":
            with Image.open(path) as im:
                if im.mode not in ("I;16", "I;16B", "I", "L"):
                    raise MapError(f"{path}: a score PNG must be single-channel 8/16-bit, got mode {im.mode}")
                arr = np.asarray(im).astype(np.float64) * scale
        else:
            import h5py

            with h5py.File(path, "r") as f:
                if key not in f:
                    raise MapError(f"{path}: no HDF5 dataset {key!r} (has {', '.join(f.keys()) or 'none'})")
                arr = f[key][()]
    except MapError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem
        raise MapError(f"{path}: unreadable {fmt} score map ({type(e).__name__}: {e})") from None
    return np.asarray(arr, dtype=np.float32)


def check_map(arr: np.ndarray, path: Path, size: tuple[int, int]) -> np.ndarray:
    """``arr`` as an ``[H, W]`` map of the image's size with finite values, else ``MapError``."""
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise MapError(f"{path}: score map must be [H, W], got shape {list(arr.shape)}")
    if tuple(arr.shape) != tuple(size):
        raise MapError(f"{path}: score map is {arr.shape[0]}×{arr.shape[1]}, its image {size[0]}×{size[1]}")
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise MapError(f"{path}: score map has {bad} NaN/inf pixels")
    return arr


@register_model("precomputed")
class Precomputed(SegModel):
    """Another method's saved anomaly maps as a model with no network: ``predict(images, sources=...)`` reads one
    file per image (``folder`` / ``pattern``; npz, npy, 16-bit png or SMIYC hdf5) and returns :class:`ScoreMaps`."""

    output_kind = "score"
    reads_sources = True

    def __init__(self, folder: str | Mapping[str, str], pattern: str = "", format: str = "auto", key: str = "",
                 scale: float = 1 / 65535) -> None:
        super().__init__(num_classes=0)
        fmt = _format_of(pattern or "{stem}.npz", format)
        self.pattern = pattern or "{stem}" + FORMATS[fmt][0]
        _check_pattern(self.pattern)
        self.format, self.key, self.scale = fmt, key or FORMATS[fmt][1], float(scale)
        if not self.scale > 0:
            raise ValueError(f"precomputed: scale must be > 0, got {scale}")
        if fmt == "smiyc":
            try:
                import h5py  # noqa: F401
            except ImportError:
                raise ValueError("precomputed: format smiyc (.hdf5) needs h5py: pip install h5py "
                                 "(or oodseg[smiyc])") from None
        self.folder: str | dict[str, str] = folder if isinstance(folder, str) else {str(k): str(v)
                                                                                     for k, v in folder.items()}
        for f in [self.folder] if isinstance(self.folder, str) else self.folder.values():
            _check_folder(f)

    def check_sources(self, datasets: Sequence[str]) -> None:
        """``ValueError`` when a folder mapping lacks one of these dataset keys (checked before any work)."""
        if isinstance(self.folder, dict):
            missing = [d for d in datasets if d not in self.folder]
            if missing:
                raise ValueError(f"precomputed: folder has no entry for dataset(s) {', '.join(missing)} "
                                 f"(it maps {', '.join(self.folder) or 'none'})")

    def path_of(self, source: ImageSource) -> Path:
        """The map file of one image."""
        fields = {"stem": source.stem, "id": source.id, "dataset": source.dataset}
        folder = self.folder if isinstance(self.folder, str) else self.folder.get(source.dataset, "")
        return Path(folder.format(dataset=source.dataset)) / self.pattern.format(**fields)

    def read(self, source: ImageSource, size: tuple[int, int]) -> np.ndarray:
        """The checked float32 ``[H, W]`` map of one image (``MapError`` naming the file)."""
        path = self.path_of(source)
        return check_map(read_array(path, self.format, self.key, self.scale), path, size)

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return to_nchw_uint8(images_uint8).float()

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor, features: bool = False,
                sources: Sequence[ImageSource] | None = None) -> ScoreMaps:
        """The maps of ``sources`` (one per image, in order) at the images' size.

        Returns:
            :class:`ScoreMaps` ``[B,H,W]`` float32 anomaly scores (higher = more anomalous, in the saved units).

        Raises:
            SourceError: mapping the batch index of every missing / unreadable / wrong-size / non-finite map to
                ``(file, message)``; the caller records those and predicts the rest again.
        """
        x = to_nchw_uint8(images_uint8)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if features:
            raise NotImplementedError("precomputed score maps have no features")
        if sources is None or len(sources) != x.shape[0]:
            raise ValueError(f"precomputed: predict needs one source per image ({x.shape[0]}), got "
                             f"{None if sources is None else len(sources)}")
        maps, failed = [], {}
        for i, src in enumerate(sources):
            try:
                maps.append(self.read(src, size))
            except MapError as e:
                failed[i] = (str(self.path_of(src)), str(e))
        if failed:
            raise SourceError(failed)
        return ScoreMaps(torch.from_numpy(np.stack(maps)), size=size)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Any:
        raise NotImplementedError("precomputed score maps have no network to train or run")

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {}

    def export_cfg(self) -> dict[str, Any]:
        return {"folder": self.folder, "pattern": self.pattern, "format": self.format, "key": self.key,
                "scale": self.scale}
