"""Benchmark faults a user meets: reusing ``--run-id`` resumes only the same configuration (another checkpoint file
or content, data or scorer set is refused before Ray in one line naming every difference; resource and console
options may change); a full disk is one line and a ``failed`` row; a SAM that cannot be loaded fails before Ray."""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from oodseg.config import ConfigError, to_json
from oodseg.models import create_model, save_safetensors
from oodseg.platform.benchmark import BenchmarkConfig
from oodseg.platform.benchmark.config import ModelSpec
from oodseg.platform.benchmark.prepare import prepare
from oodseg.platform.jobs import benchmark
from oodseg.platform.runs import RunRecord


def config(suite: Path, results: Path, checkpoint: Path, **kw) -> BenchmarkConfig:
    base = dict(results=str(results), run_id="r1", data_root=str(suite), datasets=("road_anomaly_21",),
                scorers=("msp",), models=(ModelSpec(name="tiny", checkpoint=str(checkpoint)),))
    return BenchmarkConfig(**{**base, **kw})


@pytest.fixture
def recorded(tiny_suite, tiny_erfnet, tmp_path):
    """A results root holding run ``r1``'s first attempt, recorded as the benchmark driver records it."""
    checkpoint = Path(shutil.copy(tiny_erfnet, tmp_path / "model.safetensors"))
    cfg = config(tiny_suite, tmp_path / "results", checkpoint)
    plan = prepare(cfg)
    RunRecord(plan.store, "r1", "benchmark", to_json(cfg), 0, json.dumps(plan.fingerprint())).start().finish("failed")
    return cfg, checkpoint


@pytest.mark.parametrize("change,named", [
    ({"temperatures": (1.0, 2.0)}, ["temperatures: [1.0] → [1.0, 2.0]"]),
    ({"datasets": ("road_anomaly_21", "fs_static")}, ["datasets"]),
    ({"scorers": ("msp", "energy"), "protocol": "course"}, ["scorers", "protocol"]),
])
def test_a_changed_config_is_refused_naming_each_difference(recorded, change, named):
    cfg, _ = recorded
    with pytest.raises(ConfigError) as e:
        prepare(replace(cfg, **change))
    message = str(e.value)
    assert "\n" not in message and message.startswith("--run-id r1: that run was recorded with another configuration")
    for needle in named:
        assert needle in message


def test_other_weights_under_the_same_path_are_refused(recorded):
    cfg, checkpoint = recorded
    torch.manual_seed(1)
    save_safetensors(create_model("erfnet", channels=[4, 8, 16], input_size=None), checkpoint)
    with pytest.raises(ConfigError, match="checkpoint of model 'tiny': \"sha256:"):
        prepare(cfg)


def test_resources_and_side_outputs_may_change(recorded):
    cfg, _ = recorded
    prepare(replace(cfg, batch_size=3, num_actors=2, plots=False, heatmaps=0, keep_score_cache=True))
    prepare(replace(cfg, run_id="r2", temperatures=(2.0,)))  # another run id is a new run


def test_the_job_refuses_in_one_line_before_ray(recorded, tiny_erfnet, capsys):
    cfg, _ = recorded
    argv = ["--results", cfg.results, "--run-id", "r1", "--data-root", cfg.data_root, "--datasets", "road_anomaly_21",
            "--scorers", "msp", "--set", f"models=[{{name: tiny, checkpoint: {tiny_erfnet}}}]"]
    assert benchmark.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "models:" in err[0] and "rerun it with the same options" in err[0], err


def test_a_full_disk_is_one_line_and_a_failed_row(ray_session, tiny_suite, tiny_erfnet, tmp_path, capsys,
                                                   monkeypatch):
    from oodseg.platform.benchmark import driver
    from oodseg.platform.cache import ShardCache
    from oodseg.platform.results import ResultsStore

    commit, calls = driver.commit_unit, []

    def commit_then_fill_the_disk(*args, **kw):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return commit(*args, **kw)

    monkeypatch.setattr(driver, "commit_unit", commit_then_fill_the_disk)
    results = tmp_path / "results"
    argv = ["--results", str(results), "--run-id", "full", "--data-root", str(tiny_suite), "--plots", "false",
            "--datasets", "road_anomaly_21,fs_static,road_anomaly", "--scorers", "msp", "--batch-size", "1",
            "--keep-score-cache", "true", "--set", f"models=[{{name: tiny, checkpoint: {tiny_erfnet}}}]"]
    assert benchmark.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == [f"error: --results {results}: no space left on its device; free space and rerun with --run-id "
                   "full to resume (committed units are kept)"]
    store = ResultsStore(str(results))
    assert list(store.read("runs").status) == ["failed"]
    (done,) = store.completed_units("full")
    for key in ("road_anomaly_21", "fs_static", "road_anomaly"):  # the scratch of uncommitted units is gone
        assert bool(ShardCache(store.root, "full", "tiny", key, "scores").shards()) == (key == done[1])


@pytest.mark.parametrize("sam,needle", [
    ("oodseg-test/no-such-sam", "not a local file or directory, not in the hub cache and not reachable"),
    ("{tmp}", "a directory without config.json"),
])
def test_a_sam_that_cannot_be_loaded_fails_before_ray(tiny_suite, tiny_erfnet, tmp_path, capsys, sam, needle):
    results = tmp_path / "results"
    argv = ["--results", str(results), "--data-root", str(tiny_suite), "--datasets", "road_anomaly_21",
            "--scorers", "msp", "--refine", "s2m", "--set", f"models=[{{name: tiny, checkpoint: {tiny_erfnet}}}]",
            "--set", f"refine_cfg={{prompter: components, scorers: [msp], sam: '{sam.format(tmp=tmp_path)}'}}"]
    assert benchmark.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--refine-cfg.sam" in err[0] and needle in err[0], err
    assert not (results / "runs").exists()


@pytest.mark.parametrize("option,value", [("--num-actors", "-1"), ("--heatmaps", "-2"), ("--actor-num-cpus", "0"),
                                          ("--read-num-cpus", "-0.5"), ("--torch-threads", "-1"),
                                          ("--actor-memory-gb", "-1")])
def test_negative_or_zero_resources_are_refused(tiny_suite, tiny_erfnet, tmp_path, capsys, option, value):
    argv = ["--results", str(tmp_path / "r"), "--data-root", str(tiny_suite), option, value,
            "--set", f"models=[{{name: tiny, checkpoint: {tiny_erfnet}}}]"]
    with pytest.raises(SystemExit) as e:  # the config parser's own exit: before anything is checked or started
        benchmark.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and option.lstrip("-").replace("-", "_") in err[0], err
