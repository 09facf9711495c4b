"""The benchmark job's configuration: what to score (models × datasets × scorers), how (protocol, refine stage,
resources) and where results go. Frozen dataclasses, YAML + CLI overrides (:mod:`oodseg.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from oodseg.config import ConfigError
from oodseg.config import help_meta as _h
from oodseg.data import default_datasets, list_datasets
from oodseg.models import list_models, model_output_kind
from oodseg.models.factory import MODELS
from oodseg.platform.runs import log
from oodseg.registry import import_plugins
from oodseg.scoring import PLACEMENTS, default_scorers, list_scorers, scorer_applies

PROTOCOLS = ("field", "course")
FIT_POLICIES = ("missing", "never", "refit")


@dataclass(frozen=True)
class ModelSpec:
    """One model to benchmark: a results ``name``, and how to build it.

    ``checkpoint``: a ``.safetensors`` / ``.pth`` file or a named source (``demo``: the demo ERFNet trained on the
    synthetic suite; ``scratch``: random weights). With an empty ``arch`` the checkpoint must be a self-describing
    ``.safetensors`` (it records architecture + cfg); otherwise ``create_model(arch, checkpoint=..., **cfg)``.
    """

    name: str = field(default="demo", metadata={"help": "name in the results tables"})
    arch: str = field(default="", metadata={"help": "registered model (empty: from the .safetensors header)",
                                            "choices": lambda: ["", *list_models()]})
    checkpoint: str = field(default="demo", metadata={"help": ".safetensors/.pth file, or demo | scratch"})
    cfg: dict[str, Any] = field(default_factory=dict, metadata={"help": "model keyword arguments"})

    def model_kwargs(self, protocol: str = "field") -> dict[str, Any]:
        """``create_model``'s keywords under ``protocol``: the course protocol keeps ERFNet's void channel (20
        outputs) at the reference 512×1024 input."""
        return {**self.cfg, **({"keep_void": True, "input_size": [512, 1024]} if protocol == "course" else {})}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset to benchmark: a registered ``name`` (see ``--help``), an optional results ``key`` (default: the
    name) and reader arguments (``cfg``), e.g. the ``folder`` dataset's ``{root, image_dir, mask_dir, mapping}``."""

    name: str
    key: str = ""
    title: str = ""
    cfg: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in list_datasets():
            raise ValueError(f"datasets: unknown dataset {self.name!r}; registered: {list_datasets()}")

    @classmethod
    def from_str(cls, name: str) -> DatasetSpec:
        return cls(name=name)

    @property
    def result_key(self) -> str:
        return self.key or self.cfg.get("name") or self.name


@dataclass(frozen=True)
class RefineSpec:
    """The S2M refine stage (``refine: s2m``): anomaly scores → box prompts → SAM masks → refined score maps."""

    prompter: str = field(default="detector", metadata={"help": "registered prompter: detector (S2M) | components"})
    prompter_cfg: dict[str, Any] = field(default_factory=dict, metadata={"help": "prompter keyword arguments"})
    detectors: dict[str, str] = field(default_factory=dict, metadata={
        "help": "detector checkpoint per scorer, {msp: FILE}: our .safetensors or S2M's detectron2 "
                "model_final.pth; the demo model's scorers default to demo-detector"})
    sam: str = field(default="demo-saom", metadata={
        "help": "SAM: demo-saom | demo-sam (tiny SAMs trained on the synthetic suite) | a .safetensors file | a hub id "
                "such as facebook/sam-vit-base | a local directory"})
    scorers: tuple[str, ...] = field(default=("msp", "rba"), metadata={"help": "scorers whose maps are refined"})
    calibration: str = field(default="best_f1", metadata={
        "help": "components prompter threshold / scale: best_f1 (each set's own) or a dataset key"})


@dataclass(frozen=True)
class ScorerKey:
    """One scoring method: scorer name, temperature placement, temperature, extra scorer parameters, and the
    refine stage that produced the map (``""``: the plain score map)."""

    scorer: str
    placement: str
    temperature: float
    params: tuple[tuple[str, Any], ...] = ()
    refine: str = ""

    @property
    def method(self) -> str:
        """The ``scorer`` column of the results tables (``msp``, ``msp+s2m``)."""
        return f"{self.scorer}+{self.refine}" if self.refine else self.scorer

    @property
    def label(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in self.params)
        return f"{self.method}[{self.placement},T={self.temperature:g}{extra}]"


@dataclass(frozen=True)
class BenchmarkConfig:
    """Benchmark anomaly-segmentation models on road-scene datasets with Ray Data; results go to Parquet."""

    results: str = field(default="./results", metadata=_h("results root: directory or s3://… URI"))
    run_id: str = field(default="", metadata=_h("run id; reuse one to resume (empty: new id)"))
    data_root: str = field(default="", metadata=_h("dataset root (empty: build/reuse the synthetic suite)"))
    cache_dir: str = field(default="", metadata=_h("cache of the synthetic suite and demo models "
                                                   "($OODSEG_CACHE or ./.cache/oodseg)"))
    seed: int = field(default=0, metadata=_h("seed of the synthetic suite and demo model"))
    models: tuple[ModelSpec, ...] = field(default=(ModelSpec(),), metadata=_h(
        "models, a YAML list of {name, arch, checkpoint, cfg}; arch: one of the registered models (" +
        ", ".join(list_models()) + ") or empty for a self-describing .safetensors; checkpoint: a file or demo | "
        "scratch"))
    datasets: tuple[DatasetSpec, ...] = field(
        default=tuple(DatasetSpec(n) for n in default_datasets()),
        metadata=_h("datasets: registered names, comma-separated, or YAML entries {name, key, title, cfg}",
                    choices=list_datasets))
    max_images: int = field(default=0, metadata=_h("at most this many images per dataset (0: all)"))
    scorers: tuple[str, ...] = field(default=(), metadata=_h("scorers (empty: every registered scorer that applies "
                                                             "to the model)", choices=list_scorers))
    scorer_params: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=_h(
        "extra scorer parameters, {scorer: {param: value}}"))
    temperatures: tuple[float, ...] = field(default=(1.0,), metadata=_h("temperatures applied to each scorer"))
    placements: tuple[str, ...] = field(default=("cl",), metadata=_h("temperature placements for mask models",
                                                                     choices=PLACEMENTS))
    protocol: str = field(default="field", metadata=_h("scoring protocol: field (label resolution, void channel "
                                                       "dropped) or course (ERFNet course tables)",
                                                       choices=PROTOCOLS))
    component_metrics: bool = field(default=True, metadata=_h("SMIYC sIoU/PPV/mean F1 and S2M metrics (second pass)"))
    smiyc: bool = field(default=True, metadata=_h("also report the SMIYC leaderboard's binned pixel metrics"))
    refine: str = field(default="", metadata=_h("refine stage after scoring (empty: none)", choices=("", "s2m")))
    refine_cfg: RefineSpec = field(default_factory=RefineSpec, metadata=_h("refine stage settings"))
    fit: str = field(default="missing", metadata=_h(
        "training-split fits of the scorers that learn from it (sml, mahalanobis, knn, react), stored under "
        "<results>/fits: missing (fit what is not stored first), never (stored fits only: fail before Ray), refit",
        choices=FIT_POLICIES))
    fit_dataset: str = field(default="cityscapes", metadata=_h("dataset whose training split the fits read",
                                                               choices=list_datasets))
    fit_split: str = field(default="train", metadata=_h("split of --fit-dataset the fits read"))
    fit_root: str = field(default="", metadata=_h("root of --fit-dataset (empty: the data root / synthetic suite)"))
    fit_max_images: int = field(default=0, metadata=_h("at most this many training images per fit (0: all)"))
    fit_cfg: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=_h(
        "fit state settings, {feature_bank: {cap: 8192}}"))
    plugins: tuple[str, ...] = field(default=(), metadata={**_h(
        "modules to import in the driver and every worker (user-registered scorers, models, datasets); on "
        "PYTHONPATH or in the job's --working-dir"), "on_parse": import_plugins})
    batch_size: int = field(default=8, metadata=_h("images per actor call (model batch)"))
    num_actors: int = field(default=0, metadata=_h(
        "max actors per pass (0: one per GPU; on CPU as many as the CPUs beside the read tasks and the memory allow)"))
    actor_num_cpus: float = field(default=1.0, metadata=_h("CPUs reserved per scoring actor"))
    actor_concurrency: int = field(default=0, metadata=_h(
        "calls a scoring actor runs at once (0: 2 on a GPU, where one call's forward overlaps the other's metric "
        "updates and shard writes; 1 on CPU, where an actor's threads are its reserved CPUs)"))
    actor_memory_gb: float = field(default=0.0, metadata=_h(
        "memory per CPU actor in GiB, bounding the pool by the cluster's memory (0: estimated from the batch: "
        "0.75 GiB + batch_size × the largest image's pixels × 320 B)"))
    read_num_cpus: float = field(default=0.5, metadata=_h("CPUs per read/decode task"))
    read_concurrency: int = field(default=2, metadata=_h("max concurrent read tasks"))
    torch_threads: int = field(default=0, metadata=_h("torch CPU threads per actor (0: ceil(actor_num_cpus))"))
    device: str = field(default="auto", metadata=_h("device of the actors", choices=("auto", "cpu", "cuda")))
    precision: str = field(default="auto", metadata=_h("autocast precision", choices=("auto", "fp32", "bf16",
                                                                                      "fp16")))
    cache_outputs: bool = field(default=False, metadata=_h("keep fp16 model outputs for temperature search "
                                                           "(large: the size is printed; python -m oodseg cache)"))
    keep_score_cache: bool = field(default=False, metadata=_h("keep the scratch fp16 score maps"))
    heatmaps: int = field(default=2, metadata=_h("heatmap overlays per anomaly dataset"))
    plots: bool = field(default=True, metadata=_h("write PR/ROC plots and heatmaps under <results>/plots"))
    ray_address: str = field(default="", metadata=_h("Ray address (empty: $RAY_ADDRESS, else a local Ray)"))
    num_cpus: int = field(default=0, metadata=_h("CPUs of a locally started Ray (0: all)"))
    progress: bool = field(default=True, metadata=_h("progress bars (only on a terminal)"))
    verbose: bool = field(default=False, metadata=_h("show Ray's own log output"))

    def __post_init__(self) -> None:
        specs = tuple(DatasetSpec(d) if isinstance(d, str) else d for d in self.datasets)
        object.__setattr__(self, "datasets", specs)  # plain names are accepted in code too
        if self.fit not in FIT_POLICIES or self.fit_max_images < 0:
            raise ValueError(f"fit must be one of {FIT_POLICIES} and fit_max_images ≥ 0, got {self.fit!r}, "
                             f"{self.fit_max_images}")
        if self.max_images < 0:
            raise ValueError(f"max_images must be ≥ 0 (0: all images), got {self.max_images}")
        if not self.models:
            raise ValueError("models: at least one model is needed")
        if self.batch_size < 1 or self.read_concurrency < 1:
            raise ValueError("batch_size and read_concurrency must be ≥ 1")
        for name in ("num_actors", "actor_concurrency", "heatmaps", "torch_threads", "num_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.actor_memory_gb < 0:
            raise ValueError(f"actor_memory_gb must be ≥ 0 (0: estimated), got {self.actor_memory_gb}")
        if self.actor_num_cpus <= 0 or self.read_num_cpus <= 0:
            raise ValueError(f"actor_num_cpus and read_num_cpus must be > 0, got {self.actor_num_cpus} and "
                             f"{self.read_num_cpus}")
        if any(t <= 0 for t in self.temperatures) or not self.temperatures:
            raise ValueError(f"temperatures must be > 0, got {list(self.temperatures)}")
        names = [m.name for m in self.models]
        keys = [d.result_key for d in self.datasets]
        for what, values in (("model names", names), ("dataset keys", keys)):
            if len(set(values)) != len(values):
                raise ValueError(f"{what} must be unique, got {values}")


def scorer_keys(cfg: BenchmarkConfig, names: list[str], output_kind: str, refine: str = "") -> list[ScorerKey]:
    """Scorer × placement × temperature (× its configured parameters); per-pixel models get only the first
    placement (for them both mean ``logits / T``), saved score maps only the first temperature too (no T applies)."""
    placements = list(cfg.placements) if output_kind == "mask" else list(cfg.placements)[:1]
    temperatures = list(cfg.temperatures) if output_kind != "score" else list(cfg.temperatures)[:1]
    return [ScorerKey(n, p, float(t), tuple(sorted(cfg.scorer_params.get(n, {}).items())), refine)
            for n in names for p in placements for t in temperatures]


def model_keys(cfg: BenchmarkConfig, model: str, name: str = "") -> list[ScorerKey]:
    """The scorer keys a registered ``model`` is scored with — decided here once, from its registered facts (output
    kind, OOD class channels), and handed to the actors as they are: ``cfg.scorers``, or every registered scorer that
    applies. An explicitly requested scorer that does not apply is a ``ConfigError`` naming the model ``name``."""
    cls = MODELS.get(model)
    ood, kind, feats = getattr(cls, "ood_channels", ()), model_output_kind(model), getattr(cls, "has_features", False)
    bad = [s for s in cfg.scorers if not scorer_applies(s, ood)]
    if bad:
        raise ConfigError(f"--scorers {','.join(bad)}: needs a model with an OOD class; {name or model!r} ({model}) "
                          "has none")
    skip = [s for s in cfg.scorers if not scorer_applies(s, ood, kind, feats)]
    if skip:
        log(f"{name or model}: {', '.join(skip)} skipped: they do not apply to {model} ({kind} outputs"
            f"{'' if feats else ', no features'})")
    names = [s for s in cfg.scorers if s not in skip] if cfg.scorers else \
        [s for s in default_scorers(kind) if scorer_applies(s, ood, kind, feats)]
    return scorer_keys(cfg, names, kind)
