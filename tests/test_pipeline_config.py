"""The shared config helper (oodseg.config): YAML + --set + per-field flags → frozen dataclass, and --help."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from oodseg.config import ConfigError, build_config, config_parser, from_dict, parse_config, to_dict
from oodseg.platform.benchmark import BenchmarkConfig, ModelSpec

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Inner:
    lr: float = 0.1


@dataclass(frozen=True)
class Cfg:
    """Toy job."""

    name: str = field(default="x", metadata={"help": "the name"})
    n: int = 3
    flag: bool = False
    items: tuple[str, ...] = ("a", "b")
    opt: float | None = None
    inner: Inner = Inner()


def test_precedence_defaults_yaml_set_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("n: 4\nname: from-yaml\ninner: {lr: 0.5}\n")
    cfg = parse_config(Cfg, ["--config", str(path), "--set", "n=5", "--set", "opt=0.25", "--n", "6",
                             "--items", "c,d", "--inner.lr", "2", "--flag", "true"])
    assert cfg == Cfg(name="from-yaml", n=6, flag=True, items=("c", "d"), opt=0.25, inner=Inner(lr=2.0))
    assert dataclasses.is_dataclass(cfg) and type(cfg).__dataclass_params__.frozen
    assert parse_config(Cfg, []) == Cfg()
    assert build_config(Cfg, overrides=["items=[p, q]", "opt=null"]) == Cfg(items=("p", "q"))


def test_bad_keys_and_values_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        build_config(Cfg, overrides=["nn=1"])
    with pytest.raises(ConfigError, match="inner.lrr"):
        build_config(Cfg, overrides=["inner.lrr=1"])
    with pytest.raises(ConfigError, match="not an integer"):
        build_config(Cfg, overrides=["n=1.5"])
    with pytest.raises(ConfigError, match="not a boolean"):
        build_config(Cfg, fields={"flag": "maybe"})
    with pytest.raises(SystemExit):  # argparse reports it and exits 2
        parse_config(Cfg, ["--set", "n=abc"])


def test_help_documents_every_benchmark_field():
    text = config_parser(BenchmarkConfig).format_help()
    for f in dataclasses.fields(BenchmarkConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "results root" in text and "--set KEY=VALUE" in text


def test_models_from_yaml_list_and_roundtrip():
    cfg = build_config(BenchmarkConfig, overrides=[
        "models=[{name: a, arch: erfnet, checkpoint: '', cfg: {num_classes: 19}}, {name: b}]"])
    assert cfg.models == (ModelSpec("a", "erfnet", "", {"num_classes": 19}), ModelSpec("b"))
    assert to_dict(cfg)["models"][0]["cfg"] == {"num_classes": 19}
    assert from_dict(BenchmarkConfig, to_dict(cfg)) == cfg  # what the runs table stores rebuilds the config


def test_job_help_runs():
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "benchmark.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "--results" in out.stdout and "--run-id" in out.stdout and "--config" in out.stdout


class FakeRay:
    def __init__(self, **resources: float) -> None:
        self.resources = resources

    def cluster_resources(self) -> dict[str, float]:
        return self.resources


def test_cpu_budget_keeps_reads_alive_on_two_cores(tmp_path):
    """The 2-core deadlock trap: actors may never take the CPUs the read tasks need."""
    from oodseg.platform.benchmark.stage import ModelRun

    def plan(ray, **kw):
        run = ModelRun(BenchmarkConfig(results=str(tmp_path), **kw), None, "r", ModelSpec(), None, "pixel", {}, {})
        return run.resources(ray)

    res, n = plan(FakeRay(CPU=2), num_actors=2, actor_num_cpus=1.0, read_num_cpus=0.5, read_concurrency=2)
    assert n == 1 and res == {"num_cpus": 1.0, "num_gpus": 0}  # 1 actor CPU + 2 × 0.5 read CPUs = 2
    _, n = plan(FakeRay(CPU=16), num_actors=4, actor_num_cpus=2.0, read_num_cpus=1.0, read_concurrency=4)
    assert n == 4
    with pytest.raises(ValueError, match="starve"):
        plan(FakeRay(CPU=2), actor_num_cpus=2.0, read_num_cpus=0.5)
    res, n = plan(FakeRay(CPU=8, GPU=2), actor_num_cpus=1.0)
    assert res == {"num_cpus": 1.0, "num_gpus": 1} and n == 2  # one actor per GPU


class FakeDataset:
    def __init__(self, *paths: Path) -> None:
        self.samples = [SimpleNamespace(image_path=str(p)) for p in paths]


def test_cpu_pool_fills_the_cpus_the_reads_leave_within_memory(tmp_path):
    """A CPU node scores with as many 1-CPU actors as its CPUs allow beside the 2 × 0.5 read CPUs, unless the
    memory (Ray's ``memory`` resource over the per-actor estimate) allows fewer; on 2 cores that is 1 actor."""
    from PIL import Image

    from oodseg.platform.benchmark.stage import ACTOR_BASE_BYTES, ACTOR_BYTES_PER_PIXEL, DEFAULT_PIXELS, ModelRun

    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("RGB", (1024, 512)).save(big)  # header: 512 x 1024
    Image.new("RGB", (256, 128)).save(small)
    datasets = {"a": FakeDataset(small), "b": FakeDataset(big, small), "empty": FakeDataset()}

    def run(**kw):
        return ModelRun(BenchmarkConfig(results=str(tmp_path), **kw), None, "r", ModelSpec(), None, "pixel",
                        datasets, {})

    per_actor = ACTOR_BASE_BYTES + 8 * 512 * 1024 * ACTOR_BYTES_PER_PIXEL  # batch 8 of the largest first image
    assert run().actor_memory() == per_actor
    assert run(protocol="course").actor_memory() == per_actor  # the course protocol scores at 512 x 1024
    assert run(actor_memory_gb=3.0).actor_memory() == 3 * 2**30
    unreadable = ModelRun(BenchmarkConfig(results=str(tmp_path)), None, "r", ModelSpec(), None, "pixel",
                          {"x": FakeDataset(tmp_path / "missing.png")}, {})
    assert unreadable.actor_memory() == ACTOR_BASE_BYTES + 8 * DEFAULT_PIXELS * ACTOR_BYTES_PER_PIXEL

    plenty = 100 * per_actor
    assert run().resources(FakeRay(CPU=2, memory=plenty)) == ({"num_cpus": 1.0, "num_gpus": 0}, 1)
    assert run().resources(FakeRay(CPU=16, memory=plenty))[1] == 15  # 16 − 2 × 0.5 read CPUs
    assert run().resources(FakeRay(CPU=16, memory=4.5 * per_actor))[1] == 4  # memory bound
    assert run().resources(FakeRay(CPU=16, memory=0.5 * per_actor))[1] == 1  # never fewer than one
    assert run(num_actors=6).resources(FakeRay(CPU=16, memory=plenty))[1] == 6  # a maximum of the user's
    assert run(actor_memory_gb=1.0).resources(FakeRay(CPU=16, memory=3.5 * 2**30))[1] == 3
    assert run(actor_num_cpus=2.0).resources(FakeRay(CPU=16))[1] == 7  # no memory figure: the CPUs decide
