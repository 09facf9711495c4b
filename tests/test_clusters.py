"""Cluster configs: the launcher YAML against Ray's own schema, the KubeRay RayJob manifest, the cluster config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from oodseg.config import build_config
from oodseg.platform.benchmark import BenchmarkConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"


def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_launcher_yaml_validates_against_rays_schema():
    cfg = yaml.safe_load((CLUSTERS / "gpu.yaml").read_text())
    jsonschema.validate(cfg, ray_schema())
    # a mistyped key is rejected by the same schema (the check has teeth)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cfg, "max_wrokers": 3}, ray_schema())


def test_launcher_yaml_contents():
    cfg = yaml.safe_load((CLUSTERS / "gpu.yaml").read_text())
    assert cfg["provider"]["type"] == "aws"
    image = cfg["docker"]["image"]
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-gpu", image)
    assert image.split(":")[1].split("-")[0] == ray.__version__  # same Ray as the driver that submits jobs
    workers = {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) >= 1 and t.get("max_workers", 0) > t.get("min_workers", 0)
               for t in workers.values()), "needs an autoscaling GPU worker type"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if "ray start" in c)
    assert any("pip install" in c and "oodseg" in c for c in cfg["setup_commands"])


def test_rayjob_manifest_required_fields():
    docs = [d for d in yaml.safe_load_all((CLUSTERS / "kuberay-rayjob.yaml").read_text()) if d]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert "jobs/benchmark.py" in spec["entrypoint"]
    assert (ROOT / spec["entrypoint"].split()[1]).is_file()
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and {"containerPort": 8265, "name": "dashboard"} in head["ports"]
    groups = cluster["workerGroupSpecs"]
    assert groups and all(g["groupName"] and "template" in g for g in groups)
    gpu = [g for g in groups if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu and gpu[0]["maxReplicas"] > gpu[0]["minReplicas"]
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_cluster_benchmark_config_parses():
    cfg = build_config(BenchmarkConfig, ROOT / "configs" / "benchmark_cluster.yaml")
    assert cfg.results.startswith("s3://")
    assert {m.arch for m in cfg.models} == {"erfnet", "eomt"}
    local = build_config(BenchmarkConfig, ROOT / "configs" / "benchmark.yaml")
    assert local == BenchmarkConfig()  # the YAML documents exactly the defaults
