"""Training throughput: DeepSpeed (ZeRO-1, fp32 on CPU) vs plain DDP on Ray Train, same model, batch and data.

    python benchmarks/train.py [--workers 2] [--steps 30] [--warmup-steps 5] [--json OUT]
    python benchmarks/train.py --use-gpu --workers 1 --width 1.0    # one GPU per worker, the published width

Both runs use the tiny demo ERFNet (width 0.25) on 128x256 crops of a small synthetic suite (built in a temp dir),
global batch 8, no validation, one checkpoint at the end. Throughput = optimizer steps per second between step
``warmup-steps`` and the last step (from the workers' ``elapsed_s``), so start-up, DeepSpeed initialisation and the
final checkpoint are excluded. Prints both rates and the ratio DeepSpeed / DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ACCEPT_CLUSTER_AUTH_TOKEN", "1")


def steps_per_s(history: list[dict], warmup_steps: int) -> float:
    rows = sorted(history, key=lambda r: r["step"])
    a = next(r for r in rows if r["step"] >= warmup_steps)
    b = rows[-1]
    return (b["step"] - a["step"]) / (b["elapsed_s"] - a["elapsed_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--width", type=float, default=0.25, help="ERFNet width multiplier")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import ray

    from oodseg.data.synthetic import build_suite
    from oodseg.platform.trainer import FinetuneConfig, run_finetune
    from oodseg.training.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        suite = build_suite(Path(tmp) / "suite", seed=0, size=(128, 256), n_train=16, n_val=2, n_anomaly=2, n_coco=2)
        ray.init(num_cpus=None if a.use_gpu else max(2, a.workers), include_dashboard=False, log_to_driver=False)
        tc = TrainConfig(model_cfg={"width": a.width, "input_size": None}, data_root=str(suite), val_split="",
                         anomaly_set=None, steps=a.steps, global_batch=8, crop=(128, 256), scale=(1.0, 1.0),
                         log_every=1, warmup=2)
        rates = {}
        for strategy in ("deepspeed", "ddp"):
            cfg = FinetuneConfig(train=tc, name=f"bench-{strategy}", storage_path=str(Path(tmp) / "runs"),
                                 strategy=strategy, zero_stage=a.zero_stage, num_workers=a.workers,
                                 checkpoint_every=a.steps, max_failures=0, extensions_dir=str(Path(tmp) / "ext"),
                                 use_gpu=a.use_gpu)
            rates[strategy] = steps_per_s(run_finetune(cfg).history, a.warmup_steps)
            print(f"{strategy:10s} {rates[strategy]:.3f} steps/s", flush=True)
        ray.shutdown()
    report = {"workers": a.workers, "steps": a.steps, "global_batch": 8, "zero_stage": a.zero_stage,
              "steps_per_s": rates, "ratio_deepspeed_over_ddp": rates["deepspeed"] / rates["ddp"]}
    print(json.dumps(report, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
