"""Stage "fit": what post-hoc scorers learn from a model's training split, computed once and stored with the results.

A scorer registered with ``fit=<state>`` (``sml``, ``mahalanobis``, ``knn``, ``react``) reads a
:class:`~oodseg.scoring.posthoc.fit.FitState` of the model on its training split (``--fit-dataset``, default
Cityscapes ``train``; in the demo the synthetic suite's train split, which the demo ERFNet trained on). Before a
model's score stage, :func:`ensure_fits` looks up each state it needs in ``<results>/fits/`` and computes the missing
ones in **one** Ray Data pass (read tasks → :class:`FitActor`, the model run once per image with ``features=True``
when a state reads features; every state updated from that one output); the actors' per-call states merge exactly and
in any order into the one-pass state (:mod:`oodseg.scoring.posthoc.exact`). A call re-run after an actor died is
counted once (calls are keyed by their image ids).

Artefact: ``fits/<model>-<key>/<state>.npz`` (the state's arrays, ``allow_pickle=False``) + ``<state>.json`` (its
config, the fingerprint, the run that made it, images used). ``key`` hashes the *fit fingerprint*: the model's
architecture, keywords and checkpoint content digest, the state's name + config, the training split (dataset, root,
split, ``max_images``, protocol) and :data:`FIT_VERSION`; a later run with the same fingerprint reuses the artefact,
any change (new weights, another split) fits again. Each fit pass writes a ``runs`` row (``job="fit"``, its
fingerprints in ``fingerprint_json``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from oodseg.config import ConfigError
from oodseg.data import create_dataset, dataset_info
from oodseg.models import Runtime, create_model, setup_worker
from oodseg.models.factory import checkpoint_model_cfg
from oodseg.platform.benchmark.config import BenchmarkConfig, ModelSpec, ScorerKey
from oodseg.platform.benchmark.read import image_items, read_batch
from oodseg.platform.benchmark.resume import file_digest
from oodseg.platform.benchmark.rows import pack, unpack
from oodseg.platform.benchmark.stage import ActorContext, row_batches
from oodseg.platform.results import ResultsStore
from oodseg.platform.runs import RunRecord, log
from oodseg.registry import import_plugins
from oodseg.scoring import SCORERS, create_fit, fit_from_state, fit_reads_features

FIT_VERSION = 1
FIT_SCHEMA = pa.schema([("ids", pa.string()), ("states", pa.large_binary()), ("failed", pa.int64())])


def model_arch(spec: ModelSpec, checkpoint: str | None) -> str:
    """The registered model name of a spec (its ``arch``, else the self-describing checkpoint's header)."""
    stored = checkpoint_model_cfg(checkpoint) if checkpoint and checkpoint.endswith(".safetensors") else None
    return spec.arch or (stored[0] if stored else "")


def fits_needed(keys: Sequence[ScorerKey]) -> list[str]:
    """The fit states the scorer keys need (in key order, once each); the keys only hold scorers that apply to the
    model (``config.model_keys``)."""
    out: list[str] = []
    for key in keys:
        fit = SCORERS.meta(key.scorer)["fit"]
        if fit and fit not in out:
            out.append(fit)
    return out


def fit_config(cfg: BenchmarkConfig, fit: str) -> dict[str, Any]:
    """A state's constructor arguments: the training split's class count, the run's seed, ``--fit-cfg`` overrides."""
    defaults: dict[str, Any] = {}
    args = create_fit(fit).config()
    if "num_classes" in args:
        defaults["num_classes"] = dataset_info(cfg.fit_dataset).num_classes
    if "seed" in args:
        defaults["seed"] = cfg.seed
    return {**defaults, **cfg.fit_cfg.get(fit, {})}


def open_fit_data(cfg: BenchmarkConfig, root: str) -> Any:
    """The training split the fits read (``--fit-dataset`` / ``--fit-split`` under ``--fit-root`` or the data root);
    a missing or empty split is a one-line ``ConfigError``."""
    where = cfg.fit_root or root
    ds = create_dataset(cfg.fit_dataset, root=where, split=cfg.fit_split, strict=False)
    if not ds.samples:
        problem = ds.errors[0].problem if ds.errors else "no images"
        raise ConfigError(f"--fit-dataset {cfg.fit_dataset} --fit-split {cfg.fit_split}: no training images under "
                          f"{where} ({problem}); give --fit-root, or use scorers that need no fit")
    if cfg.fit_max_images:
        ds.samples = ds.samples[: cfg.fit_max_images]
    return ds


def fit_fingerprint(cfg: BenchmarkConfig, spec: ModelSpec, checkpoint: str | None, fit: str, root: str
                    ) -> dict[str, Any]:
    return {"model": {"arch": model_arch(spec, checkpoint), "cfg": spec.model_kwargs(cfg.protocol),
                      "checkpoint": file_digest(checkpoint)},
            "fit": fit, "fit_cfg": fit_config(cfg, fit), "version": FIT_VERSION,
            "train": {"dataset": cfg.fit_dataset, "split": cfg.fit_split, "root": os.path.abspath(cfg.fit_root or root),
                      "max_images": cfg.fit_max_images, "protocol": cfg.protocol}}


def artefact(spec: ModelSpec, fingerprint: Mapping[str, Any]) -> str:
    """Path of a fit artefact (without extension) relative to the results root."""
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"fits/{spec.name}-{key}/{fingerprint['fit']}"


def save_fit(store: ResultsStore, path: str, state: Any, meta: Mapping[str, Any]) -> None:
    d = state.state_dict()
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in d["state"].items()})
    store.write_bytes(f"{path}.npz", buf.getvalue())
    store.write_bytes(f"{path}.json", json.dumps({**meta, "config": d["config"]}, default=str).encode())


def fit_exists(store: ResultsStore, path: str) -> bool:
    import pyarrow.fs as pafs

    infos = store.fs.get_file_info([f"{store.base}/{path}.npz", f"{store.base}/{path}.json"])
    return all(i.type == pafs.FileType.File for i in infos)


def load_fit(results_root: str, path: str, name: str) -> Any:
    """The stored fit state ``name`` at ``path`` (relative to the results root)."""
    store = ResultsStore(results_root, create=False)
    with store.fs.open_input_stream(f"{store.base}/{path}.json") as f:
        meta = json.loads(f.read())
    with store.fs.open_input_stream(f"{store.base}/{path}.npz") as f:
        arrays = np.load(io.BytesIO(f.read()), allow_pickle=False)
        state = {k: arrays[k] for k in arrays.files}
    return fit_from_state(name, {"config": meta["config"], "state": state})


class FitActor:
    """Ray Data UDF: the model once per actor; per call, the given fit states updated from one ``predict`` per
    chunk of images; one row back (the call's image ids, its packed states, how many images failed)."""

    def __init__(self, ctx: ActorContext, fits: Mapping[str, Mapping[str, Any]]) -> None:
        cfg = ctx.cfg
        import_plugins(cfg.plugins)
        self.runtime = Runtime(device=cfg.device, precision=cfg.precision)
        self.threads, self.device = ctx.torch_threads, self.runtime.torch_device
        setup_worker(self.threads, self.device)
        model = create_model(ctx.spec.arch or None, checkpoint=ctx.checkpoint, **ctx.spec.model_kwargs(cfg.protocol))
        self.model = self.runtime.prepare(model.eval())
        self.fits = {name: dict(c) for name, c in fits.items()}
        self.features = any(fit_reads_features(name) for name in self.fits)
        self.model_batch = cfg.batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        setup_worker(self.threads, self.device)  # this call's thread (setup_worker)
        states = {name: create_fit(name, **cfg) for name, cfg in self.fits.items()}
        rows = batch.to_pylist()
        good = [r for r in rows if not r["error"]]
        by_size: dict[tuple[int, int], list[dict]] = {}
        for r in good:
            by_size.setdefault((r["height"], r["width"]), []).append(r)
        for (h, w), group in by_size.items():
            for s in range(0, len(group), self.model_batch):
                chunk = group[s : s + self.model_batch]
                images = np.stack([np.frombuffer(r["image"], np.uint8).reshape(h, w, 3) for r in chunk])
                labels = np.stack([np.frombuffer(r["label"], np.uint8).reshape(h, w) for r in chunk])
                with torch.inference_mode(), self.runtime.autocast():
                    out = self.model.predict(torch.from_numpy(images), features=self.features)
                for state in states.values():
                    state.update(out, labels, [r["id"] for r in chunk])
        packed = pack({name: st.state_dict() for name, st in states.items()})
        return pa.table({"ids": [json.dumps(sorted(r["id"] for r in rows))], "states": [packed],
                         "failed": [len(rows) - len(good)]}, schema=FIT_SCHEMA)


def merge_calls(batches: Any, names: Sequence[str]) -> tuple[dict[str, Any], int, int]:
    """Merge the actors' call rows (each call once, keyed by its image ids) → (states, images, failed images)."""
    merged = {name: None for name in names}
    seen: set[str] = set()
    n = failed = 0
    for table in batches:
        for row in table.to_pylist():
            ids = json.loads(row["ids"])
            if seen.intersection(ids):
                continue  # a call re-run after its actor died: already counted
            seen.update(ids)
            n, failed = n + len(ids), failed + int(row["failed"])
            for name, d in unpack(row["states"]).items():
                state = fit_from_state(name, d)
                merged[name] = state if merged[name] is None else merged[name].merge(state)
    return merged, n, failed


def run_fit_pass(ray: Any, run: Any, train: Any, missing: Mapping[str, Mapping[str, Any]]) -> tuple[dict, int, int]:
    """The Ray Data pass computing the ``missing`` states ``{name: config}`` over ``train``."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    cfg = run.cfg
    items = image_items({"train": train})
    res, max_actors = run.resources(ray)
    blocks = max(1, math.ceil(len(items) / cfg.batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(read_batch, fn_kwargs={"datasets": {"train": train}, "protocol": cfg.protocol},
                        batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=cfg.read_num_cpus,
                        compute=TaskPoolStrategy(size=min(cfg.read_concurrency, blocks)))
    ds = ds.map_batches(
        FitActor, fn_constructor_kwargs={"ctx": run.actor_context([]), "fits": missing},
        batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=max_actors), **res)
    return merge_calls(row_batches(ds), list(missing))


def fit_paths(cfg: BenchmarkConfig, spec: ModelSpec, checkpoint: str | None, keys: Sequence[ScorerKey], root: str
              ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(fingerprint, artefact path) per fit state the keys need."""
    prints = {name: fit_fingerprint(cfg, spec, checkpoint, name, root) for name in fits_needed(keys)}
    return prints, {name: artefact(spec, fp) for name, fp in prints.items()}


def check_stored_fits(cfg: BenchmarkConfig, store: ResultsStore, spec: ModelSpec, checkpoint: str | None,
                      keys: Sequence[ScorerKey] | None, root: str) -> None:
    """With ``--fit never``, before Ray: every fit the keys need must be stored (``keys=None``: a model still to be
    built, which has none; the requested scorers' fits are missing)."""
    if cfg.fit != "never":
        return
    if keys is None:
        missing = sorted({SCORERS.meta(s)["fit"] for s in cfg.scorers} - {None})
    else:
        prints, paths = fit_paths(cfg, spec, checkpoint, keys, root)
        missing = [n for n in prints if not fit_exists(store, paths[n])]
    if missing:
        raise ConfigError(missing_fit_message(spec, missing))


def ensure_fits(ray: Any, run: Any, root: str) -> dict[str, str]:
    """Fit state name → artefact path for every state this model's scorer keys need; the missing ones are fitted
    now (one pass) unless ``--fit never`` (then a one-line ``ConfigError``); ``--fit refit`` fits them all again."""
    cfg, spec = run.cfg, run.spec
    prints, paths = fit_paths(cfg, spec, run.checkpoint, run.keys, root)
    names = list(prints)
    missing = [n for n in names if cfg.fit == "refit" or not fit_exists(run.store, paths[n])]
    if not missing:
        if names:
            log(f"{spec.name}: fits {', '.join(names)} reused from {run.store.root}/fits")
        return paths
    if cfg.fit == "never":
        raise ConfigError(missing_fit_message(spec, missing))
    train = open_fit_data(cfg, root)
    log(f"{spec.name}: fitting {', '.join(missing)} on {cfg.fit_dataset} {cfg.fit_split} ({len(train.samples)} images)")
    record = RunRecord(run.store, f"{run.run_id}-fit-{spec.name}", "fit", json.dumps(
        {"model": spec.name, "fits": missing}), cfg.seed, json.dumps({n: prints[n] for n in missing}, default=str))
    with record.running():
        states, n, failed = run_fit_pass(ray, run, train, {m: prints[m]["fit_cfg"] for m in missing})
        for name in missing:
            if states[name] is None or n == failed:
                raise ConfigError(f"{spec.name}: fit {name!r} saw no training image ({failed} failed to read)")
            save_fit(run.store, paths[name], states[name], {"fingerprint": prints[name], "run_id": run.run_id,
                                                             "n_images": n - failed, "failed": failed})
    log(f"{spec.name}: fitted {', '.join(missing)} on {n - failed} images → {run.store.root}/fits")
    return paths


def missing_fit_message(spec: ModelSpec, missing: Sequence[str]) -> str:
    users = sorted(n for n in SCORERS.list() if SCORERS.meta(n)["fit"] in missing)
    return (f"--scorers {','.join(users)}: model {spec.name!r} has no stored fit ({', '.join(missing)}) on its "
            "training split; create it with: python jobs/benchmark.py --fit missing (same --models, --fit-dataset, "
            "--fit-root), or drop these scorers")
