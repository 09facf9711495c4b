"""The fine-tuning job (``python jobs/finetune.py`` / ``python -m oodseg finetune``): resolve data and init →
check the run against an existing checkpoint of the same name → Ray Train (DeepSpeed / DDP) → export.

One progress line per ``train.log_every`` steps (loss, lr, steps/s, validation metrics when measured) and a final
summary: the validation metrics, the exported model and the command that benchmarks it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from oodseg.config import ConfigError, parse_config, to_json
from oodseg.losses import loss_info
from oodseg.models import CheckpointError, check_checkpoint
from oodseg.models.factory import checkpoint_model_cfg, unknown_model_args
from oodseg.platform.benchmark.prepare import check_results_root
from oodseg.platform.cli import run_cli
from oodseg.platform.runs import RunRecord, init_ray, log, status_of
from oodseg.platform.trainer import FinetuneConfig, check_resume, resolve_data, run_finetune
from oodseg.refine import detector_task, saom_task  # noqa: F401  (register the s2m_detector and saom tasks)
from oodseg.training.config import TrainConfig

ALIASES = {f"--{k.replace('_', '-')}": f"train.{k}" for k in ("model", "loss", "params", "steps", "init", "lr",
                                                               "data_root")}


def format_row(row: dict[str, Any], steps: int) -> str:
    """``step 40/120  loss 0.532  lr 4.1e-04  2.1 step/s  val_miou 41.0  val_auprc 12.5``."""
    val = "".join(f"  {k} {100 * v:.1f}" for k, v in row.items() if k.startswith("val_") and v is not None
                  and k != "val_anomaly_fraction")
    return (f"step {row['step']}/{steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"{row['steps_per_s']:.2f} step/s{val}")


def validate(cfg: FinetuneConfig) -> None:
    """Before Ray: the loss fits the model, the init checkpoint is readable and holds that model, the model takes
    its keyword arguments, a rerun matches its checkpoint."""
    tc = cfg.train
    allowed = loss_info(tc.loss).models
    if allowed is not None and tc.model not in allowed:
        raise ConfigError(f"--loss {tc.loss}: made for model(s) {list(allowed)}, not {tc.model!r}")
    if tc.init:
        check_checkpoint(tc.init)
    if tc.task == "segmentation":  # the detector / SAOM tasks build models of their own
        check_model(tc)
    last = check_resume(cfg)
    if last is not None:
        log(f"resuming {cfg.name} from {last}")


def check_model(tc: TrainConfig) -> None:
    """``--init`` holds a ``--model`` model (self-describing header) and the model takes ``model_cfg``'s keys."""
    stored = checkpoint_model_cfg(tc.init) if tc.init else None
    if stored is not None and stored[0] != tc.model:
        raise CheckpointError(tc.init, f"holds a {stored[0]!r} model, not --model {tc.model!r}")
    unknown, accepted = unknown_model_args(tc.model, tc.model_cfg, stored)
    if unknown:
        raise ConfigError(f"--set train.model_cfg: {tc.model} takes no {', '.join(map(repr, unknown))}; it takes "
                          f"{', '.join(accepted)}")


def main(argv: list[str] | None = None, preset: Mapping[str, Any] | None = None,
         prog: str = "python jobs/finetune.py", description: str | None = None) -> int:
    """Parse (``preset``: the job's own defaults, below ``--config``), validate, train, report."""
    cfg = parse_config(FinetuneConfig, argv, prog=prog, description=description or __doc__, aliases=ALIASES,
                       base=preset)

    def body() -> int:
        t0 = time.time()
        run = resolve_data(cfg)  # synthetic suite + demo model by default (built once, cached)
        validate(run)
        store = check_results_root(cfg.results)
        init_ray(cfg.ray_address, cfg.num_cpus, verbose=cfg.verbose)
        record = RunRecord(store, cfg.name, "finetune", to_json(run), cfg.train.seed).start()
        try:
            result = run_finetune(run, printer=lambda row: log(format_row(row, run.train.steps)))
        except BaseException as e:
            record.finish(status_of(e))
            raise
        record.finish("finished")
        final = {k: v for k, v in result.metrics.items() if k.startswith("val_")}
        print(f"finished {cfg.name} in {time.time() - t0:.0f} s: " +
              ", ".join(f"{k} {100 * v:.1f}%" for k, v in final.items() if v is not None), flush=True)
        print(f"model: {result.model_path}", flush=True)
        if run.train.task == "segmentation":
            print(f"benchmark it: python jobs/benchmark.py --set 'models=[{{name: demo, checkpoint: demo}}, "
                  f"{{name: {cfg.name}, checkpoint: {result.model_path}}}]'", flush=True)
        return 0

    return run_cli(body, lambda: f"rerun the same command to resume {cfg.name} from its last checkpoint")
