"""Stage "read": dataset listings → image rows (driver), and decode (Ray Data CPU tasks).

Input: the opened datasets of a model's pending units. Output of :func:`image_items`: one small row per image
(``dataset``, ``idx``, ``id``, ``image_path``, ``label_path``: paths only). Output of :func:`read_batch` (a Ray Data
``map_batches`` function over those rows): the decoded ``image`` (uint8 HxWx3) and ``label`` (uint8 HxW) as bytes with
their size, or a *failure row* (``stage="read"``, ``error``, ``file``: the image or label file at fault) for a
``DataError`` or any decoder failure, never a crash.

The ``course`` protocol (the ERFNet course evaluation code) resizes every image to 512×1024 with PIL's bilinear filter
and every label with nearest neighbour here, before the model sees it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from oodseg.data import DataError, SampleRef

READ_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()), ("idx", pa.int64()), ("id", pa.string()), ("image_path", pa.string()),
        ("label_path", pa.string()), ("height", pa.int64()), ("width", pa.int64()), ("image", pa.large_binary()),
        ("label", pa.large_binary()), ("stage", pa.string()), ("error", pa.string()), ("file", pa.string()),
    ]
)
COURSE_SIZE = (512, 1024)


def image_items(datasets: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row of paths per image of every dataset (keyed by the dataset's result key)."""
    return [
        {"dataset": key, "idx": i, "id": ref.id, "image_path": ref.image_path, "label_path": ref.label_path or ""}
        for key, ds in datasets.items()
        for i, ref in enumerate(ds.samples)
    ]


def course_resize(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The course evaluation's input handling: ``Resize((512, 1024), BILINEAR)`` on the PIL image and
    ``Resize((512, 1024), NEAREST)`` on the label (torchvision on PIL images = PIL's filters)."""
    h, w = COURSE_SIZE
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    lab = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return img, lab


def _decode(ds: Any, row: Mapping[str, Any], protocol: str) -> tuple[np.ndarray, np.ndarray]:
    sample = ds.load(SampleRef(row["id"], row["image_path"], row["label_path"] or None))
    image, label = sample["image"], np.asarray(sample["label"], dtype=np.uint8)
    if protocol == "course":
        image, label = course_resize(image, label)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def read_batch(batch: pa.Table, datasets: Mapping[str, Any], protocol: str = "field") -> pa.Table:
    """Decode each row's image + label; a ``DataError`` (or any decode error) becomes a failure row."""
    cols: dict[str, list[Any]] = {f.name: [] for f in READ_SCHEMA}
    for row in batch.to_pylist():
        image = label = None
        error = stage = file = ""
        try:
            image, label = _decode(datasets[row["dataset"]], row, protocol)
        except DataError as e:
            stage, error, file = "read", str(e), str(e.path)  # the file at fault: the image or its label
        except Exception as e:  # noqa: BLE001 - any unexpected decoder failure is recorded, not fatal
            stage, error, file = "read", f"{row['image_path']}: {type(e).__name__}: {e}", row["image_path"]
        for k in ("dataset", "idx", "id", "image_path", "label_path"):
            cols[k].append(row[k])
        cols["height"].append(0 if image is None else image.shape[0])
        cols["width"].append(0 if image is None else image.shape[1])
        cols["image"].append(b"" if image is None else image.tobytes())
        cols["label"].append(b"" if label is None else label.tobytes())
        cols["stage"].append(stage)
        cols["error"].append(error)
        cols["file"].append(file)
    return pa.Table.from_pydict(cols, schema=READ_SCHEMA)
