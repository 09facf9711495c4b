"""Declared search spaces → Ray Tune domains, and the per-trial fine-tuning config of the loss search."""

from __future__ import annotations

import numpy as np
import pytest
from ray import tune

from oodseg.losses import loss_space
from oodseg.platform.trainer import FinetuneConfig
from oodseg.platform.tuning.loss import LossSearchConfig, search_space, trial_finetune_config
from oodseg.platform.tuning.spaces import tune_space
from oodseg.scoring import scorer_space
from oodseg.training.config import TrainConfig


def test_declared_spaces_become_tune_domains_with_the_same_support():
    space = tune_space({**scorer_space("msp"), **loss_space("oe")})
    rng = np.random.default_rng(0)
    t = np.array(space["temperature"].sample(size=2000, random_state=rng))
    assert 0.05 <= t.min() and t.max() <= 20.0
    # log-uniform: log T is uniform on [log 0.05, log 20] → its mean is the midpoint
    assert np.log(t).mean() == pytest.approx((np.log(0.05) + np.log(20.0)) / 2, abs=0.1)
    assert set(space["tau_in"].sample(size=300, random_state=rng)) == {-2.0, -1.0, 0.0}
    assert isinstance(space["weight"], tune.search.sample.Float)


@pytest.mark.parametrize(
    "declared, match",
    [
        ({"t": {"type": "loguniform", "low": 0.0, "high": 1.0}}, "low > 0"),
        ({"t": {"type": "uniform", "low": 2.0, "high": 1.0}}, "low < high"),
        ({"t": {"type": "choice", "values": []}}, "non-empty"),
        ({"t": {"type": "normal"}}, "type must be one of"),
    ],
)
def test_bad_declared_space_names_the_parameter(declared, match):
    with pytest.raises(ValueError, match=match):
        tune_space(declared)


def test_only_selects_parameters_and_rejects_unknown_ones():
    assert set(tune_space(loss_space("oe"), only=["weight"])) == {"weight"}
    with pytest.raises(ValueError, match="not in the declared space"):
        tune_space(loss_space("oe"), only=["nope"])


def test_loss_search_space_and_trial_config():
    train = TrainConfig(loss="oe", loss_cfg={"variant": "bce"}, steps=12, val_every=4, log_every=1)
    cfg = LossSearchConfig(finetune=FinetuneConfig(train=train, checkpoint_every=5, num_workers=1), params=("weight",))
    space = search_space(cfg)
    assert set(space) == {"loss_cfg", "lr"} and set(space["loss_cfg"]) == {"weight"}
    trial = trial_finetune_config(cfg.finetune, {"lr": 3e-4, "loss_cfg": {"weight": 0.5}}, "train-x", "/tmp/s")
    assert trial.train.lr == 3e-4 and trial.train.loss_cfg == {"variant": "bce", "weight": 0.5}
    # every report must carry validation metrics: logs and checkpoints only at multiples of val_every
    assert trial.train.log_every == 4 and trial.checkpoint_every == 8
    assert (trial.name, trial.storage_path) == ("train-x", "/tmp/s")
    assert cfg.max_t == 3
