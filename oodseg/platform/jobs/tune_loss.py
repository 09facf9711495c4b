"""The loss-search job (``python jobs/tune_loss.py`` / ``python -m oodseg tune-loss``): ASHA over a loss's declared
space and the learning rate, each trial a Ray Train fine-tuning run; the best trial and how to look at all of them."""

from __future__ import annotations

from oodseg.config import parse_config
from oodseg.platform.cli import run_cli
from oodseg.platform.tuning.loss import LossSearchConfig, run_loss_search


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(LossSearchConfig, argv, prog="python jobs/tune_loss.py", description=__doc__)

    def body() -> int:
        res = run_loss_search(cfg)
        print(f"best {cfg.objective} = {res.best_value:.4f} with {res.best_config}; checkpoint {res.best_checkpoint}",
              flush=True)
        print(res.hints, flush=True)
        return 0

    return run_cli(body, lambda: f"rerun with --run-id {cfg.run_id or '<the printed run id>'} to resume the search")
