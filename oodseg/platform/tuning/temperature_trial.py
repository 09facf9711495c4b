"""The temperature search's Tune trainable (imported when a search starts, as it imports Ray Tune)."""

from __future__ import annotations

from typing import Any

import numpy as np
from ray import tune

from oodseg.models import setup_worker
from oodseg.platform.output_cache import evaluate_temperature


class TemperatureTrial(tune.Trainable):
    """One trial, one step: score the cached validation set at ``config["temperature"]`` and return its pixel
    metrics (``done``). A class trainable: a reused actor runs every trial's step on its own thread, where a
    function trainable starts a runner thread and a result queue per trial (~3.5 ms of a 20 ms trial over 8 cached
    128×256 images, ``benchmarks/tune.py``)."""

    def setup(self, config: dict[str, Any], data: list, bits: int, threads: int) -> None:
        """``data`` = ``[ObjectRef]`` of the cached set (wrapped so ``with_parameters`` stores the reference, not a
        copy); fetched once per actor, zero-copy, and kept for the trials it is reused for."""
        import ray

        setup_worker(threads)  # cached outputs are scored on the CPU
        self.data, self.bits = ray.get(data[0]), bits

    def step(self) -> dict[str, Any]:
        c = self.config
        params = {k: v for k, v in c.items() if k not in ("temperature", "scorer", "placement")}
        metrics = evaluate_temperature(self.data, c["scorer"], c["temperature"], c["placement"], params,
                                       bits=self.bits)
        return {**{k: float(v) if isinstance(v, (int, float, np.floating)) else v for k, v in metrics.items()},
                "done": True}

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        return True  # nothing but the config changes between trials; step reads self.config

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        return None  # a trial is one scoring pass: nothing to resume

    def load_checkpoint(self, checkpoint: Any) -> None:
        return None
