"""The fine-tuning job (``python jobs/finetune.py`` / ``python -m oodseg finetune``): resolve data and init →
check the run against an existing checkpoint of the same name → Ray Train (DeepSpeed / DDP) → export.

One progress line per ``train.log_every`` steps (loss, lr, steps/s, validation metrics when measured) and a final
summary: the validation metrics, the exported model and the command that benchmarks it. A rerun of a run that has
already trained its ``--steps`` says so and exports its model again, without starting Ray; Ctrl-C prints how to
resume (exit code 130).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from oodseg.config import ConfigError, parse_config, to_json
from oodseg.losses import loss_info
from oodseg.models import check_checkpoint
from oodseg.models.factory import MODELS, check_checkpoint_model, model_output_kind
from oodseg.platform.benchmark.prepare import check_results_root
from oodseg.platform.cli import run_cli
from oodseg.platform.runs import RunRecord, init_ray, log
from oodseg.platform.trainer import (
    FinetuneConfig,
    StoredCheckpoint,
    check_resume,
    checkpoint_step,
    export_model,
    resolve_data,
    run_finetune,
)
from oodseg.training.config import TrainConfig
from oodseg.training.loop import MODEL

ALIASES = {f"--{k.replace('_', '-')}": f"train.{k}" for k in ("model", "loss", "params", "steps", "init", "lr",
                                                               "data_root")}


def format_row(row: dict[str, Any], steps: int) -> str:
    """``step 40/120  loss 0.532  lr 4.1e-04  2.1 step/s  val_miou 41.0  val_auprc 12.5``."""
    val = "".join(f"  {k} {100 * v:.1f}" for k, v in row.items() if k.startswith("val_") and v is not None
                  and k != "val_anomaly_fraction")
    return (f"step {row['step']}/{steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"{row['steps_per_s']:.2f} step/s{val}")


def check_loss(tc: TrainConfig) -> None:
    """The loss fits the model by its registered facts (the models it is made for, the output kinds it is computed
    on); checked first, before any data or model is built."""
    info = loss_info(tc.loss)
    if info.models is not None and tc.model not in info.models:
        raise ConfigError(f"--loss {tc.loss}: made for model(s) {list(info.models)}, not {tc.model!r}")
    kind = model_output_kind(tc.model)
    own = info.combine == "model_loss" and MODELS.get(tc.model).own_loss  # the model's loss is this objective
    if tc.task == "segmentation" and kind not in info.kinds and not own:
        raise ConfigError(f"--loss {tc.loss}: computed on {' / '.join(info.kinds)} outputs; {tc.model!r} gives {kind} "
                          "outputs")


def validate(cfg: FinetuneConfig) -> StoredCheckpoint | None:
    """Before Ray: the loss fits the model, the init checkpoint is readable (a ``.pth`` by ``torch.load(weights_only=
    True)``) and holds that model, the model takes its keyword arguments, a rerun matches its checkpoint; returns
    the checkpoint a rerun resumes from (None: a new run)."""
    tc = cfg.train
    check_loss(tc)
    if tc.init:
        check_checkpoint(tc.init)
    if tc.task == "segmentation":  # the detector / SAOM tasks build models of their own
        check_model(tc)
    return check_resume(cfg)


def check_model(tc: TrainConfig) -> None:
    """``--init`` holds a ``--model`` model (self-describing header) and the model takes ``model_cfg``'s keys: the
    rule every job applies (:func:`~oodseg.models.factory.check_checkpoint_model`)."""
    check_checkpoint_model(tc.init or None, tc.model, tc.model_cfg, owner=f"--model {tc.model!r}",
                           arch_option="--model", cfg_option="--set train.model_cfg")


def main(argv: list[str] | None = None, preset: Mapping[str, Any] | None = None,
         prog: str = "python jobs/finetune.py", description: str | None = None) -> int:
    """Parse (``preset``: the job's own defaults, below ``--config``), validate, train, report."""
    cfg = parse_config(FinetuneConfig, argv, prog=prog, description=description or __doc__, aliases=ALIASES,
                       base=preset)

    def body() -> int:
        t0 = time.time()
        check_loss(cfg.train)  # before the suite or the demo model is built
        run = resolve_data(cfg)  # synthetic suite + demo model by default (built once, cached)
        last = validate(run)
        if last is not None and checkpoint_step(last) == run.train.steps and last.has(MODEL):
            print(f"{cfg.name}: already finished at step {run.train.steps}/{run.train.steps} ({last}); give a "
                  f"larger --steps to train on", flush=True)
            print_model(run, export_model(last, run.export_path))
            return 0
        if last is not None:
            log(f"resuming {cfg.name} from {last} (step {checkpoint_step(last)}/{run.train.steps})")
        store = check_results_root(cfg.results)
        init_ray(cfg.ray_address, cfg.num_cpus, verbose=cfg.verbose)
        with RunRecord(store, cfg.name, "finetune", to_json(run), cfg.train.seed).running():
            result = run_finetune(run, printer=lambda row: log(format_row(row, run.train.steps)))
        final = {k: v for k, v in result.metrics.items() if k.startswith("val_")}
        print(f"finished {cfg.name} in {time.time() - t0:.0f} s: " +
              ", ".join(f"{k} {100 * v:.1f}%" for k, v in final.items() if v is not None), flush=True)
        print_model(run, result.model_path)
        return 0

    return run_cli(body, lambda: f"rerun the same command to resume {cfg.name} from its last checkpoint")


def print_model(run: FinetuneConfig, model_path: str | None) -> None:
    """The exported model and, for a segmentation model, the command that benchmarks it next to the demo model."""
    print(f"model: {model_path}", flush=True)
    if run.train.task == "segmentation":
        print(f"benchmark it: python jobs/benchmark.py --set 'models=[{{name: demo, checkpoint: demo}}, "
              f"{{name: {run.name}, checkpoint: {model_path}}}]'", flush=True)
