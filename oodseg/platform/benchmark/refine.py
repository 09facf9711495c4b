"""Stage "s2m": S2M's object-level refinement of the score stage's maps (Zhao et al., CVPR 2024).

Input: the committed score units of a model and their fp16 score maps (the score stage keeps them when a refine
stage follows). For every configured scorer (``refine_cfg.scorers``), each image's map goes through a registered
prompter (``components`` or S2M's ``detector``) → box prompts → SAM (one image embedding per image, every box a
prompt, one mask each) → :func:`~oodseg.refine.assemble_masks`: the refined map, zero where no box landed.

Output: rows like the score stage's, for the keys ``<scorer>+s2m`` — pixel metrics per key here; the component pass
then adds SMIYC's component metrics and S2M's own IoU / AuIoU / mean F1 on the refined maps (written as shards of
kind ``refined``). The actors (one GPU each on a cluster) load SAM and the prompter once; only shard paths and
small states travel through the object store. A map the prompter refuses (all-NaN, constant) is a failure row for
that image; every other image is still scored.

Calibration of the ``components`` prompter (``refine_cfg.calibration``): ``best_f1`` uses each set's own pixel
best-F1 threshold — the threshold the SMIYC component metrics use, the S2M paper's "dataset-optimal" baselines —
and its inlier median / IQR scale; a dataset key uses that set's statistics for every set; both come from the score
stage's units (recorded at their commit; read once from their committed rows when an earlier attempt committed them,
:meth:`~oodseg.platform.benchmark.stage.ModelRun.scored_unit`), so a resumed run needs no recomputation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from oodseg.models import setup_worker
from oodseg.models.sam import create_sam
from oodseg.platform.benchmark.config import ScorerKey
from oodseg.platform.benchmark.read import course_resize
from oodseg.platform.benchmark.rows import Rows
from oodseg.platform.benchmark.score import ScoreStage, fp16_maps
from oodseg.platform.benchmark.stage import ActorContext, Stage, row_batches
from oodseg.platform.benchmark.units import UnitResult
from oodseg.refine import ScoreCalibration, create_prompter, refine_s2m
from oodseg.registry import import_plugins
from oodseg.scoring.metrics import PixelMetrics


@dataclass(frozen=True)
class RefineInputs:
    """The refine pass's own inputs besides the run's :class:`ActorContext`: for each refined key the index of the
    plain key whose maps it refines, the prompter settings per scorer, the SAM source, the calibration per dataset
    and scorer, and the opened datasets (the actors reload each image)."""

    sources: Mapping[int, int]
    prompters: Mapping[str, dict]
    sam: str
    calibrations: Mapping[str, Mapping[str, dict]]
    datasets: Mapping[str, Any]


class RefineActor:
    """Ray Data UDF: SAM + prompter loaded once; per call, score shards → refined rows."""

    def __init__(self, ctx: ActorContext, inputs: RefineInputs) -> None:
        import_plugins(ctx.cfg.plugins)
        dev = "cuda" if ctx.cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        self.threads, self.device = ctx.torch_threads, dev
        setup_worker(self.threads, dev)
        self.sam = create_sam(inputs.sam).to(dev).eval()
        self.ctx, self.inputs, self.keys = ctx, inputs, list(ctx.keys)
        # a prompter built from a checkpoint (a detector network) runs on the actor's device, as SAM does
        self.prompters = {name: create_prompter(**{**({"device": dev} if "checkpoint" in cfg else {}), **cfg})
                          for name, cfg in inputs.prompters.items()}
        self.refs = {k: {r.id: r for r in ds.samples} for k, ds in inputs.datasets.items()}

    def _image(self, dataset: str, image_id: str, label: np.ndarray) -> np.ndarray:
        image = self.inputs.datasets[dataset].load(self.refs[dataset][image_id])["image"]
        return course_resize(image, label)[0] if image.shape[:2] != label.shape else image

    def __call__(self, batch: pa.Table) -> pa.Table:
        setup_worker(self.threads, self.device)  # this call's thread (setup_worker)
        rows = Rows()
        states: dict[str, dict] = defaultdict(dict)
        covered: dict[str, list[str]] = defaultdict(list)
        for row in batch.to_pylist():
            dataset = row["dataset"]
            source = self.ctx.cache(dataset, "scores")
            records, ids = [], []
            for item in source.items([row["path"]]):
                covered[dataset].append(item.id)
                refined = self._refine(dataset, item, rows, states[dataset])
                if refined is not None:
                    records.append({"label": item.label, "scores": refined, "keys": np.arange(len(self.keys))})
                    ids.append(item.id)
            if records:
                rows.shard(dataset, "refined", self.ctx.cache(dataset, "refined").write(records, ids))
        for dataset, ids in covered.items():
            rows.state(dataset, states[dataset], ids)
        return rows.table()

    def _refine(self, dataset: str, item: Any, rows: Rows, states: dict) -> np.ndarray | None:
        src = {"dataset": dataset, "id": item.id}
        try:
            image = self._image(dataset, item.id, item.label)
            maps, summary = [], []
            for i, key in enumerate(self.keys):
                score = item.scores[int(np.flatnonzero(item.keys == self.inputs.sources[i])[0])].astype(np.float32)
                cal = self.inputs.calibrations.get(dataset, {}).get(key.scorer)
                refined, boxes = refine_s2m(image, score, self.prompters[key.scorer], self.sam,
                                            ScoreCalibration(**cal) if cal else None)
                maps.append(refined)
                summary.append({"scorer": key.method, "placement": key.placement, "temperature": key.temperature,
                                "n_valid": int((item.label != 255).sum()), "n_anomaly": int((item.label == 1).sum()),
                                "score_max": float(refined.max()) if refined.numel() else 0.0})
        except (ValueError, RuntimeError) as e:  # a refused map (NaN / constant) fails this image only
            rows.failure(src, "refine", f"{dataset}/{item.id}: {type(e).__name__}: {e}")
            return None
        for i, m in enumerate(maps):
            states.setdefault((i, "pixel"), PixelMetrics(smiyc=self.ctx.cfg.smiyc)).update(m, item.label)
        rows.image(src, summary)
        return fp16_maps(maps)


class RefineStage(Stage):
    """The ``s2m`` pass: each refined key's score maps from the score stage's cache → prompts → SAM masks → refined
    maps and their metric rows, on a pool of :class:`RefineActor`."""

    name = "s2m"
    cache_kind = "refined"
    shard_kinds = ("refined",)
    refined = True

    def enabled(self) -> bool:
        return self.run.cfg.refine == "s2m"

    def keys(self) -> list[ScorerKey]:
        cfg = self.run.cfg
        plain = self.score_keys()
        return [ScorerKey(s, plain[0].placement, plain[0].temperature, (), "s2m") for s in cfg.refine_cfg.scorers]

    def score_keys(self) -> list[ScorerKey]:
        return ScoreStage(self.run).keys()

    def sources(self) -> dict[int, int]:
        """Refine key index → index of the plain key whose maps it refines (T = first temperature, first placement)."""
        plain = self.score_keys()
        out = {}
        for i, key in enumerate(self.keys()):
            match = [j for j, k in enumerate(plain) if (k.scorer, k.placement, k.temperature) ==
                     (key.scorer, key.placement, key.temperature)]
            if not match:
                raise ValueError(f"refine_cfg.scorers: {key.scorer!r} is not among the scored keys")
            out[i] = match[0]
        return out

    def units(self, pending: list[str]) -> dict[str, UnitResult]:
        return {k: UnitResult(self.run.infos[k], self.keys(), expected=self.run.scored_unit(k).n_images)
                for k in pending if self.run.infos[k].kind == "anomaly"}

    def calibrations(self, pending: list[str]) -> dict[str, dict[str, dict]]:
        """Dataset → refined scorer → ScoreCalibration fields of the map it refines."""
        plain, sources, keys = self.score_keys(), self.sources(), self.keys()

        def of(dataset: str) -> dict[str, dict]:
            cal = self.run.scored_unit(dataset).calibration
            found = {key.scorer: cal.get(plain[sources[i]]) for i, key in enumerate(keys)}
            return {scorer: c for scorer, c in found.items() if c}

        source = self.run.cfg.refine_cfg.calibration
        if source == "best_f1":
            return {d: of(d) for d in pending}
        if source not in self.run.infos or self.run.infos[source].kind != "anomaly":
            raise ValueError(f"refine_cfg.calibration: {source!r} is neither best_f1 nor a scored anomaly set")
        stats = of(source)
        return {d: stats for d in pending}

    def stream(self, ray: Any, pending: list[str]) -> Any:
        from ray.data import ActorPoolStrategy

        run = self.run
        items = [{"dataset": k, "path": p} for k in pending for p in run.cache(k, "scores").shards()]
        for k in pending:
            run.cache(k, "refined").delete()
        if not items:  # nothing was scored (every image failed): the units commit empty
            return iter(())
        res, max_actors = run.resources(ray)
        inputs = RefineInputs(self.sources(), run.refine["prompters"], run.refine["sam"], self.calibrations(pending),
                              {k: run.datasets[k] for k in pending})
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(RefineActor, fn_constructor_args=(run.actor_context(self.keys()), inputs), batch_size=1,
                            batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=max_actors), **res)
        return row_batches(ds)

    def after_commit(self, unit: UnitResult) -> None:
        if not self.run.cfg.keep_score_cache:
            for kind in ("scores", "refined"):
                self.run.cache(unit.info.key, kind).delete()
