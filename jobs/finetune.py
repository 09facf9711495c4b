"""Fine-tune a segmentation model for anomaly segmentation on Ray Train (DeepSpeed ZeRO or DDP).

    python jobs/finetune.py                                        # OE fine-tuning of the demo model, synthetic suite
    python jobs/finetune.py --loss logitnorm --strategy ddp --steps 300
    python jobs/finetune.py --config configs/finetune_cityscapes.yaml --num-workers 8 --use-gpu true
    python jobs/benchmark.py --set 'models=[{name: ft, checkpoint: <printed model path>}]'

Config: ``oodseg.platform.trainer.FinetuneConfig`` (``--help`` lists every field) from defaults < ``--config
YAML`` < ``--set key=value`` < flags. Shortcuts for the training fields: ``--loss oe|logitnorm|eim|ce``,
``--params full|head|last_k:N|queries|lora``, ``--steps N``, ``--init PATH|demo``, ``--lr``, ``--data-root DIR``
(= ``--train.loss`` ...). Without a data root the synthetic suite is used (its COCO folder feeds the OE paste)
and training starts from the demo checkpoint (``--init demo``; ``--init scratch`` for random weights).
``--loss eim`` gives the model an IsoMax+ head (fresh) unless ``train.model_cfg`` names another. Rerunning with the same ``--name`` and
``--storage-path`` resumes from the latest checkpoint. Prints the final metrics and the exported model path.
"""

from __future__ import annotations

import json
import sys

from oodseg.config import parse_config
from oodseg.platform.trainer import FinetuneConfig, resolve_data, run_finetune

SHORTCUTS = {f"--{k}": f"--train.{k}" for k in ("loss", "params", "steps", "init", "lr", "data-root")}


def _expand(arg: str) -> str:
    flag, sep, value = arg.partition("=")
    return SHORTCUTS.get(flag, flag) + sep + value


def main(argv: list[str] | None = None) -> int:
    args = [_expand(a) for a in (sys.argv[1:] if argv is None else argv)]
    cfg = resolve_data(parse_config(FinetuneConfig, args, description=__doc__, prog="python jobs/finetune.py"))
    result = run_finetune(cfg)
    print(json.dumps({"metrics": result.metrics, "checkpoint": result.checkpoint_path, "model": result.model_path},
                     indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
