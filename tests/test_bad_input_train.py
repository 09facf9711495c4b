"""Bad input to the training and search jobs: one line on stderr naming the option or file, exit code 2, found
before Ray starts (no Ray, no ``runs`` row). Each case once ended late: in every Tune trial (``--scorer p_ood`` on a
model without an OOD class: 77 s, 1,229 lines), in a traceback (``--source-run``, ``--grid``, ``--num-samples 0``),
in the Ray Train workers (``--lr -1``, a ``.pth`` init that torch refuses to unpickle)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from oodseg.platform.jobs import finetune, tune_loss, tune_temperature
from oodseg.platform.results import ResultsStore, safe_key

VAL = "road_anomaly_21"
RAY_STARTS: list[str] = []


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Record every ``init_ray`` of the jobs (whether or not another test's Ray runs in this process)."""
    from oodseg.platform.tuning import loss, temperature

    RAY_STARTS.clear()
    for module in (finetune, loss, temperature):
        monkeypatch.setattr(module, "init_ray", lambda *a, m=module.__name__, **kw: RAY_STARTS.append(m))


def one_line_before_ray(main, argv: list[str], results: Path, capsys, *needles: str) -> str:
    """Run a job; assert exit code 2, one stderr line holding ``needles``, no Ray and no ``runs`` row."""
    try:
        code = main([*argv, "--results", str(results)])
    except SystemExit as e:  # a config error found while parsing
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err
    assert "weights_only=False" not in err[0] and "Traceback" not in err[0]
    assert not RAY_STARTS, RAY_STARTS
    assert not (results / "runs").exists() or ResultsStore(str(results)).read("runs").empty
    return err[0]


def test_tune_temperature_p_ood_on_a_model_without_an_ood_class(tmp_path, capsys):
    """A per-pixel model's output cache (no OOD channels), committed as a benchmark unit."""
    from oodseg.platform.cache import ShardCache

    store, rng = ResultsStore(str(tmp_path)), np.random.default_rng(0)
    records = [{"logits": rng.standard_normal((19, 8, 16)).astype(np.float16),
                "label": (rng.random((16, 32)) < 0.2).astype(np.uint8)} for _ in range(2)]
    ShardCache(store.root, "bench", "pix", VAL, "outputs").write(records, ["a", "b"])
    store.write_part("metrics", safe_key("bench", "pix", VAL),
                     [{"run_id": "bench", "model": "pix", "dataset": VAL, "kind": "anomaly", "track": "anomaly"}])
    argv = ["--source-run", "bench", "--set", "model={name: pix}", "--datasets", VAL, "--scorer", "p_ood"]
    one_line_before_ray(tune_temperature.main, argv, tmp_path, capsys, "--scorer p_ood", "OOD class", "'pix'")
    from oodseg.config import parse_config
    from oodseg.platform.tuning.temperature import TemperatureSearchConfig, load_sets

    argv[-1] = "msp"  # a scorer that applies: the same cache passes the check
    cfg = parse_config(TemperatureSearchConfig, [*argv, "--results", str(tmp_path)])
    assert [len(s.labels) for s in load_sets(cfg, store, "bench").values()] == [2]


def test_tune_temperature_unknown_source_run(tmp_path, capsys):
    one_line_before_ray(tune_temperature.main, ["--source-run", "nope-123"], tmp_path, capsys, "--source-run",
                        "'nope-123'", "no committed output cache")


def test_tune_temperature_grid_outside_the_range(tmp_path, capsys):
    one_line_before_ray(tune_temperature.main, ["--search", "grid", "--grid", "0,-1"], tmp_path, capsys, "--grid",
                        "[0.0, -1.0]", "outside")


def test_tune_temperature_one_bound_keeps_the_declared_other(tmp_path, capsys):
    from oodseg.config import parse_config
    from oodseg.platform.tuning.temperature import TemperatureSearchConfig

    cfg = parse_config(TemperatureSearchConfig, ["--t-high", "1.5"])
    assert cfg.space()["temperature"] == {"type": "loguniform", "low": 0.05, "high": 1.5}  # msp's declared low
    assert parse_config(TemperatureSearchConfig, ["--t-low", "0.4"]).space()["temperature"]["high"] == 20.0
    one_line_before_ray(tune_temperature.main, ["--t-low", "30"], tmp_path, capsys, "0 < --t-low < --t-high",
                        "30.0, 20.0")


def test_tune_loss_without_trials(tmp_path, capsys):
    one_line_before_ray(tune_loss.main, ["--num-samples", "0"], tmp_path, capsys, "num_samples", "≥ 1")


def test_finetune_negative_learning_rate(tmp_path, capsys):
    one_line_before_ray(finetune.main, ["--lr", "-1"], tmp_path, capsys, "train.lr must be > 0", "-1.0")


def test_finetune_init_with_a_pickle_payload_is_refused_unrun(tmp_path, capsys, tiny_suite):
    """A zip ``torch.save`` of an object whose unpickling calls ``os.system``: torch's weights-only load refuses
    it in the driver (its reason, not its advice to unpickle), and the payload never runs."""
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": Payload()}, evil)
    line = one_line_before_ray(finetune.main, ["--init", str(evil), "--data-root", str(tiny_suite)], tmp_path / "r",
                               capsys, "evil.pth", "torch.load(weights_only=True)",
                               "unsupported GLOBAL posix.system whose module posix is blocked")
    assert "In PyTorch 2.6" not in line and not marker.exists()


def test_finetune_a_per_pixel_loss_on_a_mask_model(tmp_path, capsys):
    """The loss's registered output kinds (LossInfo.kinds) are checked before Ray: LogitNorm needs per-pixel logits."""
    one_line_before_ray(finetune.main, ["--loss", "logitnorm", "--model", "mask2former"], tmp_path, capsys,
                        "--loss logitnorm: computed on pixel outputs", "'mask2former' gives mask outputs")
