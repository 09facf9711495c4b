"""Everything the benchmark checks and resolves before Ray starts, so bad input fails in seconds, in one line.

:func:`prepare` validates the whole config against the registries, resolves the data root (the synthetic suite by
default) and every model's checkpoint (named sources such as ``demo`` reuse a cached model, or train it once),
opens each checkpoint's header, opens every dataset (a missing or empty dataset is an error naming the folder the
reader expected), checks that the results root is writable, that the requested device exists and that a reused
``--run-id`` resumes the same configuration (:mod:`~oodseg.platform.benchmark.resume`). Errors are
:class:`~oodseg.config.ConfigError` / ``DataError`` / ``CheckpointError`` with one-line messages.

A named model source that is not built yet trains in a child process (:class:`BackgroundBuild`, one at a time) while
the runner starts Ray; the runner then calls :meth:`Plan.finish`, which waits for it (starting the next) and checks it
like any other checkpoint.
With ``--refine`` the sources train here (the refine stage's demo detectors need the demo model first).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oodseg.config import ConfigError
from oodseg.data import DataError, create_dataset, dataset_info
from oodseg.data.synthetic import MARKER
from oodseg.models import CheckpointError, check_checkpoint, check_model_fits, resolve_checkpoint
from oodseg.models.factory import MODELS, OUTPUT_KINDS, check_checkpoint_model, model_output_kind
from oodseg.models.sam import check_sam
from oodseg.paths import default_cache_dir, in_submitted_job, synthetic_suite
from oodseg.platform.benchmark.config import BenchmarkConfig, ModelSpec, ScorerKey, model_keys
from oodseg.platform.benchmark.fit import check_stored_fits
from oodseg.platform.benchmark.resume import check_resume, fingerprint
from oodseg.platform.benchmark.score import build_model
from oodseg.platform.benchmark.stage import unit_infos
from oodseg.platform.benchmark.units import UnitInfo
from oodseg.platform.results import ResultsStore
from oodseg.platform.runs import log
from oodseg.refine import create_prompter, list_prompters
from oodseg.registry import import_plugins
from oodseg.scoring import default_scorers
from oodseg.training.background import BackgroundBuild
from oodseg.training.cached import NotCached, cached_only


@dataclass
class Plan:
    """The resolved inputs of a benchmark run."""

    cfg: BenchmarkConfig
    store: ResultsStore
    data_root: str
    cache_dir: Path
    datasets: dict[str, Any]
    infos: dict[str, UnitInfo]
    checkpoints: dict[str, str | None]
    keys: dict[str, list[ScorerKey]]  # model name → its scorer keys (config.model_keys)
    refine: dict[str, dict[str, Any]]
    pending: dict[str, BackgroundBuild] = field(default_factory=dict)

    def finish(self) -> None:
        """Wait for the checkpoints still training in a child process, starting each after the one before, and check
        them as :func:`prepare` does."""
        for spec in self.cfg.models:
            build = self.pending.get(spec.name)
            if build is not None:  # stays pending while it runs, so that cancel() can stop it
                log(f"{spec.name}: Ray is up; waiting for the model's training (in a child process)")
                self.checkpoints[spec.name] = build.wait()
                del self.pending[spec.name]
                self.keys[spec.name] = check_model(self.cfg, spec, self.checkpoints[spec.name])
        check_resume(self.store, self.cfg.run_id, self.fingerprint())

    def fingerprint(self) -> dict[str, Any]:
        """What a resume of this run must match (:mod:`oodseg.platform.benchmark.resume`)."""
        return fingerprint(self.cfg, self.checkpoints)

    def cancel(self) -> None:
        """Stop the checkpoint builds still running (an error or Ctrl-C before :meth:`finish` returned)."""
        for build in self.pending.values():
            build.cancel()
        self.pending.clear()


def local_path(path: str | None) -> str | None:
    """An existing local file or directory as an absolute path (the actors' working directory need not be the
    driver's: a Ray cluster joined with --ray-address); names, hub ids and URIs as they are."""
    if path and "://" not in path and os.path.exists(path):
        return os.path.abspath(path)
    return path


def check_results_root(results: str) -> ResultsStore:
    """The results store, after proving the root is writable (a probe file is created and removed)."""
    try:
        store = ResultsStore(results)
        probe = f"{store.base}/.write-probe-{uuid.uuid4().hex[:8]}"
        with store.fs.open_output_stream(probe) as sink:
            sink.write(b"")
        store.fs.delete_file(probe)
    except OSError as e:
        raise ConfigError(f"--results {results}: not writable ({e.strerror or e})") from None
    return store


def check_device(cfg: BenchmarkConfig) -> None:
    local = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    if cfg.device == "cuda" and local and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device on this machine (use --device auto or cpu)")


def reads_sources(spec: ModelSpec) -> bool:
    """Whether the spec's model reads per-image files of its own (saved score maps: no checkpoint, no demo)."""
    return spec.arch in MODELS and MODELS.get(spec.arch).reads_sources


def resolve_model(cfg: BenchmarkConfig, spec: ModelSpec, cache_dir: Path, data_root: str,
                  background: bool = False) -> str | None | BackgroundBuild:
    """The checkpoint path of one model spec (None: random init). A named source that is not built yet trains here,
    or, with ``background``, in a child process (:class:`BackgroundBuild`, checked by :meth:`Plan.finish`)."""
    context = {"cache_dir": cache_dir, "data_root": data_root, "seed": cfg.seed}
    if reads_sources(spec):  # saved maps: no weights
        if spec.checkpoint not in ("", "scratch", "demo"):  # "demo": the ModelSpec default, not chosen
            raise ConfigError(f"models: {spec.name!r} ({spec.arch}) reads saved maps and takes no checkpoint, got "
                              f"{spec.checkpoint!r}; set checkpoint: ''")
        return None
    try:
        with cached_only():  # a file path never raises NotCached
            return local_path(resolve_checkpoint(spec.checkpoint, **context))
    except NotCached:
        log(f"{spec.name}: training {spec.checkpoint!r} once on the synthetic suite (cached in {cache_dir})" +
            (": 1–3 min on 2 CPU cores" if spec.checkpoint == "demo" else ""))
    if background:
        return BackgroundBuild(spec.checkpoint, plugins=cfg.plugins, start=False, **context)
    return local_path(resolve_checkpoint(spec.checkpoint, **context))


def check_model(cfg: BenchmarkConfig, spec: ModelSpec, checkpoint: str | None) -> list[ScorerKey]:
    """The scorer keys of one model spec, after checking its checkpoint's header against ``arch``, ``cfg``, the
    protocol and the scorers."""
    if checkpoint is not None:
        check_checkpoint(checkpoint)
    hint = "; the default checkpoint is the demo ERFNet: give a file or 'scratch'" if spec.checkpoint == "demo" else ""
    name = check_checkpoint_model(checkpoint, spec.arch or None, spec.cfg, owner=f"model {spec.name!r}",
                                  arch_option=f"model {spec.name!r}'s arch", cfg_option=f"models: {spec.name!r}",
                                  hint=hint)
    if cfg.protocol == "course" and name != "erfnet":
        raise ConfigError(f"--protocol course: the course protocol is defined for ERFNet, not {name!r} "
                          f"(model {spec.name!r})")
    if checkpoint is not None:
        check_fits(spec, checkpoint, cfg.protocol)
    if MODELS.get(name).reads_sources:
        check_source_model(cfg, spec, name)
    return model_keys(cfg, name, spec.name)


def check_source_model(cfg: BenchmarkConfig, spec: ModelSpec, name: str) -> None:
    """A model reading per-image files of its own (saved score maps) is built here (cheap: no weights), so a bad
    folder, pattern or format fails before Ray; score maps cannot be scored on semantic sets or cached as outputs."""
    try:
        model = build_model(spec, None, cfg.protocol)
        model.check_sources([d.result_key for d in cfg.datasets])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"models: {spec.name!r}: {e}") from None
    semantic = [d.result_key for d in cfg.datasets if dataset_info(d.name).kind == "semantic"]
    if model_output_kind(name) == "score" and (semantic or cfg.cache_outputs):
        what = f"semantic dataset(s) {', '.join(semantic)}" if semantic else "--cache-outputs"
        raise ConfigError(f"models: {spec.name!r} ({name}) gives anomaly score maps only: drop {what}")


def check_fits(spec: ModelSpec, checkpoint: str, protocol: str) -> None:
    """The checkpoint's tensors fit the model the score actors build (names and shapes, on the meta device). A model
    that cannot be built there (a constructor that reads pretrained weights) is checked when an actor loads it."""
    try:
        check_model_fits(spec.arch or None, checkpoint=checkpoint, **spec.model_kwargs(protocol))
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - not buildable on the meta device; the actor's real load still checks it
        return


def resolve_refine(cfg: BenchmarkConfig, spec: ModelSpec, cache_dir: Path, root: str) -> dict[str, Any]:
    """The refine stage's SAM and per-scorer prompter settings, checkpoints resolved (demo sources trained once)."""
    r = cfg.refine_cfg
    if not cfg.refine:
        return {}
    if r.prompter not in list_prompters():
        raise ConfigError(f"--refine-cfg.prompter {r.prompter}: not a registered prompter ({list_prompters()})")
    scored = set(cfg.scorers) or {n for kind in OUTPUT_KINDS for n in default_scorers(kind)}
    if not r.scorers or set(r.scorers) - scored:
        raise ConfigError(f"--refine-cfg.scorers {','.join(r.scorers)}: must be among the scored scorers")
    context = {"cache_dir": cache_dir, "data_root": root, "seed": cfg.seed}
    sam = local_path(resolve_checkpoint(r.sam, **context))
    if sam and sam.endswith((".safetensors", ".pth", ".pt")):
        check_checkpoint(sam)
    prompters = {}
    for scorer in r.scorers:
        pc: dict[str, Any] = {"name": r.prompter, **r.prompter_cfg}
        if r.prompter == "detector":
            demo = spec.checkpoint == "demo" and not reads_sources(spec)
            source = r.detectors.get(scorer) or ("demo-detector" if demo else "")
            if not source:
                raise ConfigError(f"--refine-cfg.detectors: no detector for scorer {scorer!r} of model {spec.name!r}; "
                                  "train one (python jobs/train_detector.py) and give {scorer: FILE}")
            pc["checkpoint"] = local_path(resolve_checkpoint(source, scorer=scorer, **context))
        prompters[scorer] = pc
    check_refine_models(sam, prompters)
    if sam and sam != "tiny" and not Path(sam).is_file():
        check_pretrained_source("--refine-cfg.sam", sam)
    return {"sam": sam, "prompters": prompters}


def check_refine_models(sam: str | None, prompters: dict[str, dict[str, Any]]) -> None:
    """Build each prompter and a SAM file once here (small), so unknown options and weights that do not fit their
    stored config fail before Ray starts, naming the file (a hub id or directory: :func:`check_pretrained_source`)."""
    for scorer, pc in prompters.items():
        try:
            create_prompter(**pc)
        except CheckpointError:
            raise  # already one line naming the detector file
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--refine-cfg.prompter-cfg (scorer {scorer}): {e}") from None
    if sam:
        check_sam(sam)


def check_pretrained_source(option: str, source: str) -> None:
    """A transformers directory holds a ``config.json``; a hub id is in the local hub cache or reachable now (one
    metadata request, no retries), so a missing SAM fails here and not after every unit was scored."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if Path(source).expanduser().is_dir():
        if not (Path(source).expanduser() / "config.json").is_file():
            raise ConfigError(f"{option} {source}: a directory without config.json (not a saved transformers model)")
        return
    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return
    try:
        get_hf_file_metadata(hf_hub_url(source, "config.json"), timeout=10)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, bad id: all mean "cannot load it"
        raise ConfigError(f"{option} {source}: not a local file or directory, not in the hub cache and not reachable "
                          f"on the hub ({type(e).__name__}: {str(e).splitlines()[0][:120]}); download it once or "
                          "give a local path") from None


def open_datasets(cfg: BenchmarkConfig, root: str) -> dict[str, Any]:
    """Every configured dataset, listed (``max_images`` applied); missing or empty ones are errors."""
    out = {}
    for spec in cfg.datasets:
        args = {"root": root, **spec.cfg}
        ds = create_dataset(spec.name, strict=False, **args)
        if not ds.samples:
            err = ds.errors[0] if ds.errors else DataError(root, "no images")
            raise DataError(err.path, f"dataset {spec.result_key!r} has no usable image: {err.problem}")
        if cfg.max_images:
            ds.samples = ds.samples[: cfg.max_images]
        out[spec.result_key] = ds
    return out


def prepare(cfg: BenchmarkConfig) -> Plan:
    """Validate and resolve ``cfg``; no Ray, no scoring."""
    import_plugins(cfg.plugins)
    check_device(cfg)
    store = check_results_root(cfg.results)
    if in_submitted_job() and "://" not in cfg.results and not os.path.isabs(cfg.results):
        log(f"WARNING: --results {cfg.results} is relative to this job's temporary working directory; pass an "
            "absolute path or an s3:// URI to keep the results")
    cache_dir = Path(cfg.cache_dir).resolve() if cfg.cache_dir else default_cache_dir()
    if cfg.data_root:
        root = local_path(cfg.data_root)
    else:
        if not (cache_dir / f"suite-seed{cfg.seed}" / MARKER).is_file():
            log(f"building the synthetic road suite (seed {cfg.seed}, once; cache: {cache_dir})")
        root = str(synthetic_suite(cache_dir, cfg.seed))
    datasets = open_datasets(cfg, root)
    specs = {d.result_key: d for d in cfg.datasets}
    plan = Plan(cfg, store, root, cache_dir, datasets, unit_infos(datasets, specs), {}, {}, {})
    try:
        for spec in cfg.models:
            checkpoint = resolve_model(cfg, spec, cache_dir, root, background=not cfg.refine)
            if isinstance(checkpoint, BackgroundBuild):
                check_stored_fits(cfg, store, spec, None, None, root)  # --fit never: a model to build has none
                if not plan.pending:  # one trainer at a time (Plan.finish starts the next): they share the cores
                    checkpoint.start()
                plan.pending[spec.name] = checkpoint
            else:
                plan.checkpoints[spec.name] = checkpoint
                plan.keys[spec.name] = check_model(cfg, spec, checkpoint)
                check_stored_fits(cfg, store, spec, checkpoint, plan.keys[spec.name], root)
            plan.refine[spec.name] = resolve_refine(cfg, spec, cache_dir, root)
        check_resume(store, cfg.run_id, plan.fingerprint())
    except BaseException:
        plan.cancel()
        raise
    return plan
