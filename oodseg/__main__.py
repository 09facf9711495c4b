"""``python -m oodseg <command> [options]`` (also the ``oodseg`` console script); ``<command> --help`` for options."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from oodseg.process import apply_job_settings

#: command → (module with ``main(argv) -> int``, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "benchmark": ("oodseg.platform.jobs.benchmark", "benchmark models × datasets × scorers (= jobs/benchmark.py)"),
    "finetune": ("oodseg.platform.jobs.finetune", "fine-tune on Ray Train, DeepSpeed or DDP (= jobs/finetune.py)"),
    "train-detector": ("oodseg.platform.jobs.train_detector", "train S2M's box detector on score maps (Ray Train)"),
    "train-saom": ("oodseg.platform.jobs.train_saom", "SAOM fine-tuning of SAM on instance masks (Ray Train)"),
    "tune-temperature": ("oodseg.platform.jobs.tune_temperature", "search a scorer's temperature on cached outputs"),
    "tune-loss": ("oodseg.platform.jobs.tune_loss", "ASHA search over loss hyper-parameters"),
    "report": ("oodseg.platform.jobs.report", "standard tables, PR/ROC plots and heatmaps from a results store"),
    "cache": ("oodseg.platform.jobs.cache", "list or delete the per-run output / score-map caches"),
    "convert-checkpoint": ("oodseg.models.convert", "convert an EoMT (tue-mps) or Mask2Former (detectron2) checkpoint"),
    "mine-negatives": ("oodseg.models.tdos.negatives", "mine TDOS's distance-ordered negative word groups"),
    "suite": ("oodseg.data.synthetic", "build the synthetic road suite"),
}


def usage() -> str:
    lines = ["usage: python -m oodseg <command> [options]   (python -m oodseg <command> --help)", "", "commands:"]
    lines += [f"  {name:<20}{text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    apply_job_settings()  # before the command's module imports torch
    module = importlib.import_module(COMMANDS[args[0]][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
