"""Per-run on-disk caches of model outputs and score maps, in fp16 shards next to the results.

Layout: ``<results>/cache/<run_id>/<model>/<dataset>/<kind>/shard-<first id>-<digest>.npz.zst`` (local path or any
``pyarrow.fs`` URI, so on a cluster every actor and task sees the same cache on shared/cloud storage).

* ``kind="outputs"`` — the *output cache*: each image's raw model outputs at the model's output resolution, fp16,
  with its label. Per-pixel models store ``logits [C,h,w]``; mask models store ``class_logits [n,Q,C+1]`` and
  ``mask_logits [n,Q,h,w]`` (``n`` sliding-window crops, with ``crops [n,5]`` and ``frame_size``). Ray Tune trials
  score temperatures/scorers from here and never run the model (:meth:`ShardCache.outputs`).
* ``kind="scores"`` — the benchmark's scratch cache of per-scorer fp16 score maps ``[S,H,W]`` at label resolution
  (with ``keys``: the scorer-key index of each map), read back by the component pass once the pixel-level best-F1
  thresholds are known, and by the refine stage;
* ``kind="refined"`` — the refine stage's refined maps, in the same format.

A shard is one ``.npz`` holding several images (keys ``<i>.<field>``, plus ``ids``), zstd-compressed as it is
written (level 1, pyarrow's stream codec: 0.66 of the bytes on the demo model's score maps, for ~1.3 ms of CPU per
MB; plain ``.npz`` shards of earlier versions are still read). It is written to a hidden temporary name and
renamed, so readers never see a partial shard. Its writer reports the path with the images it
covers; once a unit is reduced, the shards of calls the reducer did not take (a dead actor's) are deleted
(:meth:`ShardCache.keep_only`).

Bytes per image before compression (fp16 = 2 bytes): ``C·h·w·2`` for per-pixel logits (ERFNet, 20 classes at
512×1024: 20 MiB) and ``n·Q·(h·w + C+1)·2`` for mask outputs (:func:`output_nbytes`).
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import torch

from oodseg.outputs import MaskOutputs, ModelOutputs, PixelLogits, read_only_tensor
from oodseg.platform.results import resolve_fs, safe_key

KINDS = ("outputs", "scores", "refined")


def output_nbytes(
    kind: str, num_classes: int, out_hw: tuple[int, int], num_queries: int = 0, n_crops: int = 1, itemsize: int = 2
) -> int:
    """Bytes one image's outputs take in the output cache.

    ``kind="pixel"``: ``C·h·w·itemsize``. ``kind="mask"``: ``n_crops·Q·(h·w + C + 1)·itemsize`` (mask logits plus
    class logits with the no-object column).
    """
    h, w = out_hw
    if kind == "pixel":
        return num_classes * h * w * itemsize
    if kind == "mask":
        return n_crops * num_queries * (h * w + num_classes + 1) * itemsize
    raise ValueError(f"kind must be 'pixel' or 'mask', got {kind!r}")


def split_outputs(outputs: ModelOutputs) -> list[dict[str, np.ndarray]]:
    """One record of fp16 numpy arrays per image of a batched output (crops re-indexed to image 0)."""
    ood = {"ood_channels": np.asarray(outputs.ood_channels, dtype=np.int32)} if outputs.ood_channels else {}
    if isinstance(outputs, PixelLogits):
        logits = outputs.logits.detach().to("cpu", torch.float16).numpy()
        return [{"logits": logits[b], **ood} for b in range(logits.shape[0])]
    cls = outputs.class_logits.detach().to("cpu", torch.float16).numpy()
    masks = outputs.mask_logits.detach().to("cpu", torch.float16).numpy()
    if outputs.crops is None:
        return [{"class_logits": cls[b : b + 1], "mask_logits": masks[b : b + 1], **ood} for b in range(cls.shape[0])]
    crops = outputs.crops.detach().to("cpu", torch.long).numpy()
    records = []
    for b in range(outputs.batch_size):
        rows = np.nonzero(crops[:, 0] == b)[0]
        own = crops[rows].copy()
        own[:, 0] = 0
        records.append(
            {
                "class_logits": cls[rows],
                "mask_logits": masks[rows],
                "crops": own.astype(np.int32),
                "frame_size": np.asarray(outputs.frame_size, dtype=np.int32),
                **ood,
            }
        )
    return records


def record_ood_channels(record: dict[str, np.ndarray]) -> tuple[int, ...]:
    """A cached record's OOD class channels (``ood_channels``, absent for closed-set models)."""
    return tuple(int(c) for c in record.get("ood_channels", ()))


def record_outputs(record: dict[str, np.ndarray], size: tuple[int, int] | None = None) -> ModelOutputs:
    """Rebuild a single-image ``PixelLogits``/``MaskOutputs`` (fp16 tensors) from a cached record. The tensors are
    views of the record's arrays (read-only where they live in the object store): scorers only read them."""
    ood = record_ood_channels(record)
    if "logits" in record:
        return PixelLogits(read_only_tensor(np.asarray(record["logits"]))[None], size=size, ood_channels=ood)
    crops = record.get("crops")
    return MaskOutputs(
        class_logits=read_only_tensor(np.asarray(record["class_logits"])),
        mask_logits=read_only_tensor(np.asarray(record["mask_logits"])),
        size=size,
        crops=None if crops is None else read_only_tensor(np.asarray(crops, dtype=np.int64)),
        frame_size=None if crops is None else tuple(int(s) for s in record["frame_size"]),
        n_images=None if crops is None else 1,
        ood_channels=ood,
    )


@dataclass(frozen=True)
class CachedItem:
    """One cached image: its id, label (uint8 HxW) and either model ``outputs`` or ``scores`` ``[S,H,W]`` with the
    scorer-key index of each map (``keys``)."""

    id: str
    label: np.ndarray
    outputs: ModelOutputs | None = None
    scores: np.ndarray | None = None
    keys: np.ndarray | None = None


class ShardCache:
    """fp16 ``.npz.zst`` shards of one (run, model, dataset, kind) under ``<results>/cache/…``: several images per
    shard, written atomically and named from their ids so a re-run replaces them (formats: module docstring)."""

    def __init__(self, results_root: str, run_id: str, model: str, dataset: str, kind: str = "outputs") -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.spec = {"results_root": str(results_root), "run_id": run_id, "model": model, "dataset": dataset,
                     "kind": kind}  # constructor arguments, so Ray tasks can reopen the same cache
        self.fs, base = resolve_fs(str(results_root))
        self.dir = "/".join([base, "cache", safe_key(run_id), safe_key(model), safe_key(dataset), kind])

    def write(self, records: Sequence[dict[str, np.ndarray]], ids: Sequence[str]) -> str:
        """Write one shard of ``records`` (one dict of arrays per image, each with a ``label``); returns its path.

        The name comes from the ids (``shard-<first id>-<digest of all>``): a re-run of the same images replaces its
        shard, and listing order is id order whichever process wrote it, so reductions over shards are
        reproducible to the bit."""
        if len(records) != len(ids):
            raise ValueError(f"{len(records)} records but {len(ids)} ids")
        arrays: dict[str, np.ndarray] = {"ids": np.asarray(list(ids), dtype=str)}
        for i, rec in enumerate(records):
            if "label" not in rec:
                raise KeyError("every cached record needs its 'label'")
            for k, v in rec.items():
                arrays[f"{i}.{k}"] = np.asarray(v)
        self.fs.create_dir(self.dir, recursive=True)
        digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
        final = f"{self.dir}/shard-{safe_key(str(ids[0]))}-{digest}.npz.zst"
        tmp = f"{self.dir}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp, compression="zstd") as sink:
            np.savez(sink, **arrays)  # streamed: the zip, then the compressor, without a copy of the whole shard
        self.fs.move(tmp, final)
        return final

    def shards(self) -> list[str]:
        return sorted(self.shard_sizes())

    def shard_sizes(self) -> dict[str, int]:
        """Shard path → size in bytes on storage (compressed: at most ~2 bytes per cached fp16 value)."""
        selector = pafs.FileSelector(self.dir, allow_not_found=True)
        return {i.path: i.size for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.File and i.base_name.startswith("shard-")}

    def read_shard(self, path: str) -> list[tuple[str, dict[str, np.ndarray]]]:
        """``[(id, record)]`` of one shard, in write order (``.zst`` decompressed by its name)."""
        with self.fs.open_input_stream(path, compression="detect") as src:
            data = np.load(io.BytesIO(src.read()), allow_pickle=False)
            ids = [str(x) for x in data["ids"]]
            records: list[dict[str, np.ndarray]] = [{} for _ in ids]
            for key in data.files:
                if key == "ids":
                    continue
                i, field = key.split(".", 1)
                records[int(i)][field] = data[key]
        return list(zip(ids, records))

    def items(self, shards: Sequence[str] | None = None) -> Iterator[CachedItem]:
        """Every cached image (outputs rebuilt as fp16 ``PixelLogits``/``MaskOutputs`` sized to the label)."""
        for path in self.shards() if shards is None else shards:
            for id_, rec in self.read_shard(path):
                label = rec.pop("label")
                if self.kind != "outputs":
                    keys = rec.get("keys", np.arange(len(rec["scores"])))
                    yield CachedItem(id_, label, scores=rec["scores"], keys=keys)
                else:
                    yield CachedItem(id_, label, outputs=record_outputs(rec, size=tuple(label.shape)))

    def keep_only(self, shards: Sequence[str]) -> None:
        """Delete every shard (and partial ``.tmp-*`` file) of this cache that is not in ``shards``."""
        keep = set(shards)
        selector = pafs.FileSelector(self.dir, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.path not in keep:
                self.fs.delete_file(info.path)

    def nbytes(self) -> int:
        return sum(self.shard_sizes().values())

    def delete(self) -> None:
        try:
            self.fs.delete_dir(self.dir)
        except FileNotFoundError:
            pass
