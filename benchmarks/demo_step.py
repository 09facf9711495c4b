"""Demo training step variants, measured side by side: the default vs channels-last weights, foreach / fused AdamW.

    python benchmarks/demo_step.py [--steps 60] [--block 5] [--variants default,channels_last,foreach,fused]

Every variant trains the demo ERFNet recipe (``oodseg.training.demo.demo_config``) from the same seed on the same
batches of a synthetic suite (built in a temp dir), with the demo's thread count and flushed denormals. The variants
take turns, ``block`` steps each, in one process: this machine's speed drifts by ±20 % within an hour, so runs one
after another measure the drift, not the variant. Prints each variant's steps/s (after the first block), its ratio
to ``default`` and how many of its tensors differ from ``default``'s at the end (0: the same weights bit for bit).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

OPTIMIZER = {"default": {}, "channels_last": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def build(suite: Path, steps: int, variant: str) -> tuple[Any, Any, list[Any]]:
    """A fresh (strategy, task, batches) for ``variant``."""
    from oodseg.training.demo import demo_config
    from oodseg.training.loop import _setup
    from oodseg.training.schedule import build_scheduler
    from oodseg.training.strategy import LocalStrategy

    torch.manual_seed(0)
    strategy = LocalStrategy()
    cfg = demo_config(suite, steps=steps)
    run, loader = _setup(cfg, strategy, None, None, None, False)
    if OPTIMIZER[variant]:  # the same groups and hyperparameters, another AdamW implementation
        groups = [{**g, **OPTIMIZER[variant]} for g in strategy.optimizer.param_groups]
        strategy.optimizer = torch.optim.AdamW(groups)
        strategy.scheduler = build_scheduler(strategy.optimizer, total=cfg.steps, warmup=cfg.warmup, kind=cfg.schedule)
    if variant == "channels_last":
        strategy.model.to(memory_format=torch.channels_last)
    run.task.train_mode(strategy.model)
    return strategy, run.task, list(loader)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--variants", default=",".join(OPTIMIZER))
    a = p.parse_args(argv)
    variants = ["default"] + [v for v in a.variants.split(",") if v != "default"]
    unknown = sorted(set(variants) - set(OPTIMIZER))
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(OPTIMIZER)})")

    from oodseg.data.synthetic import ensure_suite
    from oodseg.training.cached import TRAIN_THREADS

    torch.set_num_threads(TRAIN_THREADS)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        suite = ensure_suite(Path(tmp) / "suite", seed=0, n_val=1, n_anomaly=1, n_coco=1)
        runs = {v: build(suite, a.steps, v) for v in variants}
    seconds = dict.fromkeys(variants, 0.0)
    for start in range(0, a.steps, a.block):
        for v, (strategy, task, batches) in runs.items():
            t0 = time.perf_counter()
            for micro in batches[start:start + a.block]:
                strategy.step(micro, task.loss)
            if start:  # the first block warms up
                seconds[v] += time.perf_counter() - t0
    ref = {k: t.contiguous() for k, t in runs["default"][0].model.state_dict().items()}
    for v, (strategy, _, _) in runs.items():
        got = strategy.model.state_dict()
        differ = sum(not torch.equal(ref[k], got[k].contiguous()) for k in ref)
        print(f"{v:14s} {(a.steps - a.block) / seconds[v]:.3f} steps/s  ratio to default "
              f"{seconds['default'] / seconds[v]:.3f}  tensors that differ: {differ} of {len(ref)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
