"""The shared config helper (oodseg.config): YAML + --set + per-field flags → frozen dataclass, and --help."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from oodseg.config import ConfigError, build_config, config_parser, from_dict, parse_config, to_dict
from oodseg.platform.pipeline import BenchmarkConfig, ModelSpec

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
