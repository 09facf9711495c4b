"""Data contracts shared by every reader: ``DataError``, ``SampleRef``, ``Sample``, the dataset registry, image IO.

A dataset lists its files once (``.samples``, a list of small picklable ``SampleRef``) and decodes one sample per
``load(ref)`` call, so Ray workers receive only paths and read files themselves.

The registration carries the facts other layers need (``dataset_info(name)``): the table ``title``, the ``kind``
(``"anomaly"`` | ``"semantic"``), the SMIYC ``track`` (``"anomaly"`` | ``"obstacle"`` | None), the number of scored
classes, and whether the benchmark runs it by ``default``; registration order is the standard table's column order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from oodseg.registry import Registry

DATASETS: Registry[Any] = Registry("dataset")


class DataError(Exception):
    """Bad input data: ``path`` names the offending file (or folder), ``problem`` says what is wrong."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray workers
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True)
class SampleRef:
    """One image (and its label file, ``None`` for unlabeled frames); plain strings so it pickles cheaply."""

    id: str
    image_path: str
    label_path: str | None


class Sample(dict):
    """Dict with keys ``image`` (uint8 HxWx3 RGB, channels last), ``label`` (uint8 HxW, same size), ``id``,
    ``image_path``, ``label_path``. Labels follow :mod:`oodseg.labels`: anomaly datasets 0 = inlier, 1 = anomaly;
    semantic datasets trainIds ``0..C-1``; 255 = void (not evaluated) in both."""

    @property
    def image(self) -> np.ndarray:
        return self["image"]

    @property
    def label(self) -> np.ndarray:
        return self["label"]

    @property
    def id(self) -> str:
        return self["id"]


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode any PIL-readable image (png/jpg/webp) to uint8 HxWx3 RGB; ``DataError`` if missing or corrupt."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(path, "image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"unreadable or corrupt image ({exc})") from None


def read_label(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a single-channel label map (mode L/P/I, or RGB(A) with equal channels) to uint8/int HxW."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError(path, "label file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"unreadable or corrupt label map ({exc})") from None
    if arr.ndim == 3:
        rgb = arr[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(path, f"label map must be single-channel, got mode {mode} with differing channels")
        arr = rgb[..., 0]
    if arr.dtype == bool:
        raise DataError(path, "label map is 1-bit; ids cannot be represented")
    return arr


def value_lut(mapping: Mapping[int, int]) -> np.ndarray:
    """A 256-entry lookup table ``raw value → label``; raw values absent from ``mapping`` map to -1 (invalid)."""
    lut = np.full(256, -1, dtype=np.int16)
    for raw, out in mapping.items():
        if not 0 <= int(raw) <= 255 or not 0 <= int(out) <= 255:
            raise ValueError(f"value mapping {raw}->{out} outside 0..255")
        lut[int(raw)] = int(out)
    return lut


def apply_lut(raw: np.ndarray, lut: np.ndarray, path: str | os.PathLike[str], convention: str) -> np.ndarray:
    """Map ``raw`` through ``lut``; any value outside the convention raises ``DataError`` listing the bad values."""
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            bad = np.unique(raw[(raw < 0) | (raw > 255)])[:8].tolist()
            raise DataError(path, f"label values {bad} outside the {convention} convention")
        raw = raw.astype(np.uint8)
    out = lut[raw]
    if (out < 0).any():
        bad = np.unique(raw[out < 0])[:8].tolist()
        raise DataError(path, f"label values {bad} outside the {convention} convention")
    return out.astype(np.uint8)


def data_root(root: str | os.PathLike[str] | None) -> Path:
    """``root``, else ``$OODSEG_DATA``; ``DataError`` when neither is given."""
    if root is None or str(root) == "":
        root = os.environ.get("OODSEG_DATA")
        if not root:
            raise DataError("<root>", "no dataset root given and $OODSEG_DATA is not set")
    return Path(root).expanduser()


def resolve_root(root: str | os.PathLike[str] | None, subdirs: str | tuple[str, ...], marker: str) -> Path:
    """Dataset folder from ``root`` (argument, else ``$OODSEG_DATA``).

    Rule: the first ``root/<subdir>`` that exists is used (``root`` is a data root holding many datasets, like the
    synthetic suite); otherwise ``root`` itself must be the dataset folder (it contains ``marker``). The error names
    the folder that was expected (``root/<first subdir>``), which is where a user should put the data.
    """
    base = data_root(root)
    subdirs = (subdirs,) if isinstance(subdirs, str) else subdirs
    for sub in subdirs:
        if (base / sub).is_dir():
            return base / sub
    if (base / marker).is_dir():
        return base
    if not base.exists():
        raise DataError(base, "dataset root does not exist")
    raise DataError(base / subdirs[0], f"dataset folder not found under {base} (nor {marker}/ in it)")


class ListedDataset:
    """Common behaviour: ``samples`` list, ``load``, indexing, and strict/lenient listing errors.

    Listing problems (missing pairs, empty root) go through ``_problem``: raised at construction when
    ``strict=True`` (default), else recorded in ``.errors`` and the offending file skipped.
    """

    name: str = ""
    kind: str = ""
    track: str | None = None
    num_classes: int = 2

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.errors: list[DataError] = []
        self.samples: list[SampleRef] = []

    def _problem(self, path: str | os.PathLike[str], problem: str) -> None:
        err = DataError(path, problem)
        if self.strict:
            raise err
        self.errors.append(err)

    def _list_cityscapes(self, root: str | os.PathLike[str] | None, split: str, gt_suffixes: tuple[str, ...],
                         what: str = "label") -> Path | None:
        """List a Cityscapes-layout split into ``samples``: ``leftImg8bit/<split>/<city>/<prefix>_leftImg8bit.png``
        paired with the first existing ``gtFine/<split>/<city>/<prefix><suffix>``; images without a ``what`` file
        and ``what`` files without an image are listing problems. Returns the dataset root (None if not found)."""
        try:
            found = resolve_root(root, "cityscapes", "leftImg8bit")
        except DataError as err:
            self._problem(err.path, err.problem)
            return None
        img_suffix = "_leftImg8bit.png"
        img_dir, gt_dir = found / "leftImg8bit" / split, found / "gtFine" / split
        images = sorted(img_dir.glob(f"*/*{img_suffix}"))
        if not images:
            self._problem(img_dir, f"no *{img_suffix} images for split {split!r}")
        seen: set[tuple[str, str]] = set()
        for img in images:
            city, prefix = img.parent.name, img.name[: -len(img_suffix)]
            seen.add((city, prefix))
            candidates = [gt_dir / city / f"{prefix}{suffix}" for suffix in gt_suffixes]
            gt = next((c for c in candidates if c.is_file()), None)
            if gt is None:
                self._problem(img, f"image has no {what} file (expected {candidates[-1]})")
                continue
            self.samples.append(SampleRef(prefix, str(img), str(gt)))
        for suffix in gt_suffixes:
            for gt in sorted(gt_dir.glob(f"*/*{suffix}")):
                if (gt.parent.name, gt.name[: -len(suffix)]) not in seen:
                    self._problem(gt, f"{what} file has no image (expected {img_dir / gt.parent.name}/"
                                      f"{gt.name[: -len(suffix)]}{img_suffix})")
        return found

    def _decode_label(self, ref: SampleRef) -> np.ndarray:
        raise NotImplementedError

    def load(self, ref: SampleRef) -> Sample:
        """Decode one sample; raises ``DataError`` (naming the file) on corrupt files or size mismatch."""
        image = read_image(ref.image_path)
        if ref.label_path is None:
            raise DataError(ref.image_path, "image has no label file")
        label = self._decode_label(ref)
        if label.shape != image.shape[:2]:
            raise DataError(
                ref.label_path, f"label size {label.shape[::-1]} differs from image size {image.shape[1::-1]}"
            )
        return Sample(image=image, label=label, id=ref.id, image_path=ref.image_path, label_path=ref.label_path)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.load(self.samples[i])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, errors={len(self.errors)})"


@dataclass(frozen=True)
class DatasetInfo:
    """The facts a dataset registers (:func:`register_dataset`), read by the benchmark and the report without
    building it: table ``title``, ``kind`` (``anomaly`` / ``semantic``), SMIYC ``track``, scored ``num_classes``,
    and whether the benchmark runs it by ``default``."""

    name: str
    title: str
    kind: str
    track: str | None = None
    num_classes: int = 2
    default: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def register_dataset(name: str, *, title: str, kind: str, track: str | None = None, num_classes: int = 2,
                     default: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a dataset factory/class under ``name`` with its facts (timm-style decorator).

    Args:
        title: the standard table's column title.
        kind: ``"anomaly"`` (labels 0 / 1 / 255) or ``"semantic"`` (trainIds, 255 = void).
        track: SMIYC track (``"anomaly"`` / ``"obstacle"``) whose metric rules apply, or None.
        num_classes: scored classes (2 for anomaly sets).
        default: run by the benchmark when no datasets are given; registration order = column order.
    """
    if kind not in ("anomaly", "semantic"):
        raise ValueError(f"dataset {name!r}: kind must be 'anomaly' or 'semantic', got {kind!r}")
    info = DatasetInfo(name, title, kind, track, num_classes, default)
    return DATASETS.register(name, info=info)


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.meta(name)["info"]


def default_datasets(kind: str | None = None) -> tuple[str, ...]:
    """Registered default datasets (of ``kind``), in registration order: the standard table's columns."""
    infos = [dataset_info(n) for n in DATASETS.names()]
    return tuple(i.name for i in infos if i.default and (kind is None or i.kind == kind))


def create_dataset(name: str, /, root: str | os.PathLike[str] | None = None, **cfg: Any) -> Any:
    """Build dataset ``name`` from ``root`` (``None`` → ``$OODSEG_DATA``) with reader-specific ``cfg`` (such as
    ``split``, ``strict``). The result lists ``.samples`` (:class:`SampleRef`) and decodes each with ``load(ref)``
    or ``ds[i]`` into a :class:`Sample`; a bad file raises :class:`DataError` naming it."""
    return DATASETS.get(name)(root=root, **cfg)


def list_datasets() -> list[str]:
    return DATASETS.list()
