"""The rows a pass's actors send back to the driver: small, and never a full-resolution array.

One Arrow table per actor call; ``row`` says what each row is:

* ``image``   — one scored image (``summary``: per-scorer JSON summary, for the ``per_image`` table);
* ``failure`` — one image that could not be read or scored (``stage``, ``error``, ``file``: the file at fault);
* ``state``   — the *merged* metric states of the call for one dataset (``state``: packed
  ``{(key index, slot): state}``, each state naming its registered metric), merged by the reducer, the ids of the
  images (scored or failed) the call covered and the cache shards it wrote (``summary``:
  ``{"covered": [ids], "shards": {kind: [paths]}}``), always after those images' rows;
* ``info``    — a one-off message for the console (e.g. the output-cache size estimate).

Every row carries its ``call`` (one id per actor call): Ray re-runs a task whose actor died, so a call's rows may
arrive twice, or its shards exist twice; the reducer takes each image exactly once by grouping rows per call and
keeping a call only when none of its images was counted before (:class:`~oodseg.platform.benchmark.units.Reducer`).

States are packed as zlib-compressed pickles of plain numpy dicts (:func:`pack` / :func:`unpack`); they only ever
come from the run's own actors.
"""

from __future__ import annotations

import json
import pickle
import uuid
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

ROW_SCHEMA = pa.schema(
    [
        ("row", pa.string()), ("dataset", pa.string()), ("idx", pa.int64()), ("id", pa.string()),
        ("image_path", pa.string()), ("label_path", pa.string()), ("summary", pa.string()),
        ("state", pa.large_binary()), ("stage", pa.string()), ("error", pa.string()), ("call", pa.string()),
        ("file", pa.string()),
    ]
)


def pack(obj: Any) -> bytes:
    """Compact bytes for metric states crossing Ray (pickle of plain numpy dicts, zlib level 1)."""
    return zlib.compress(pickle.dumps(obj, protocol=5), 1)


def unpack(data: bytes) -> Any:
    return pickle.loads(zlib.decompress(data))


def metric_states(metrics: Mapping[tuple[int, str], Any]) -> dict[tuple[int, str], dict[str, Any]]:
    """``{slot: metric}`` → ``{slot: state}``; each state names its registered metric (``"metric"``)."""
    return {slot: {"metric": m.name, **m.state_dict()} for slot, m in metrics.items()}


class Rows:
    """Accumulates one call's output rows and turns them into an Arrow table with :data:`ROW_SCHEMA`."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {f.name: [] for f in ROW_SCHEMA}
        self.call = uuid.uuid4().hex
        self.shards: dict[str, dict[str, list[str]]] = {}  # dataset → cache kind → the shards this call wrote

    def _add(self, kind: str, src: Mapping[str, Any], summary: Any = None, state: bytes = b"", stage: str = "",
             error: str = "", file: str = "") -> None:
        self.cols["row"].append(kind)
        for k in ("dataset", "id", "image_path", "label_path"):
            self.cols[k].append(src.get(k, ""))
        self.cols["idx"].append(src.get("idx", -1))
        self.cols["summary"].append(json.dumps(summary) if summary is not None else "")
        self.cols["state"].append(state)
        self.cols["stage"].append(stage)
        self.cols["error"].append(error)
        self.cols["call"].append(self.call)
        self.cols["file"].append(file or src.get("file") or src.get("image_path", ""))

    def image(self, src: Mapping[str, Any], summary: Any) -> None:
        self._add("image", src, summary=summary)

    def failure(self, src: Mapping[str, Any], stage: str, error: str) -> None:
        self._add("failure", src, stage=stage, error=error)

    def shard(self, dataset: str, kind: str, path: str) -> None:
        """Record a cache shard of ``kind`` that this call wrote for ``dataset`` (listed in its :meth:`state` row)."""
        self.shards.setdefault(dataset, {}).setdefault(kind, []).append(path)

    def state(self, dataset: str, metrics: Mapping[tuple[int, str], Any], covered: Sequence[str]) -> None:
        """The merged ``{(key index, slot): metric}`` of one dataset in this call, the ids of the images it covers and
        the cache shards (``{kind: [path]}``, :meth:`shard`) it wrote for them."""
        self._add("state", {"dataset": dataset}, summary={"covered": list(covered),
                                                          "shards": self.shards.get(dataset, {})},
                  state=pack(metric_states(metrics)))

    def info(self, dataset: str, message: str) -> None:
        self._add("info", {"dataset": dataset}, summary=message)

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.cols, schema=ROW_SCHEMA)
