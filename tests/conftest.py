"""Shared fixtures: one local Ray per test session (every test that uses it is marked ``slow``); synthetic suites
built once per parameter set."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before any torch import, as a job sets it (oodseg/process.py)
os.environ.setdefault("RAY_ACCEPT_CLUSTER_AUTH_TOKEN", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # Train controller polling: tests end sooner


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start Ray (they use ``ray_session``, directly or through a fixture) are end-to-end: ``slow``.

    Order: the modules that declare ``RUN_FIRST = True`` (the longest single test), then the other slow tests, then
    the rest, each group in file order. With ``make test``'s two xdist workers (``--dist loadfile``: a module's tests
    stay on one worker, sharing its fixtures) the longest test starts at once and the short ones fill the gaps."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)

    def rank(item: pytest.Item) -> int:
        first = bool(getattr(getattr(item, "module", None), "RUN_FIRST", False))
        return 0 if first else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


@pytest.fixture(scope="session")
def ray_session():
    """A single local Ray instance (2 CPUs, like CI) shared by every test that needs Ray; shut down at the end. Always
    a new one (``address="local"``): a cluster someone started on this machine (``ray start``) is not joined."""
    import ray

    from oodseg.process import local_ray_env

    if not ray.is_initialized():
        with local_ray_env():
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def suite_factory(tmp_path_factory) -> Iterator[Callable[..., Path]]:
    """``make(**params)``: a synthetic road suite (``build_suite``'s parameters, defaults filled in) built once per
    parameter set and test session (per xdist worker), so modules asking for the same suite share one build.

    The suites are shared read-only inputs: a test that changes its data copies it first. At the end of the session
    every suite's file listing (paths, sizes, modification times) must be as built."""
    import inspect

    from oodseg.data.synthetic import build_suite

    root = tmp_path_factory.mktemp("suites")
    built: dict[str, tuple[Path, list[tuple]]] = {}

    def make(**params) -> Path:
        bound = inspect.signature(build_suite).bind(root, **params)
        bound.apply_defaults()
        args = {k: v for k, v in bound.arguments.items() if k not in ("out", "workers")}  # workers: same output
        key = ",".join(f"{k}={tuple(v) if k == 'size' else v}" for k, v in args.items())
        if key not in built:
            path = build_suite(root / f"suite{len(built)}", **params)
            built[key] = path, listing(path)
        return built[key][0]

    yield make
    changed = [key for key, (path, files) in built.items() if listing(path) != files]
    assert not changed, f"a test changed the shared synthetic suite(s) {changed}: copy a suite before changing it"


def listing(root: Path) -> list[tuple]:
    """Every file and folder under ``root`` with its size and modification time, sorted."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.fixture(scope="session")
def tiny_suite(suite_factory) -> Path:
    """A small synthetic road suite (64×128 frames, 2 anomaly frames per set), built once per test session."""
    return suite_factory(seed=2, size=(64, 128), n_train=2, n_val=2, n_anomaly=2, n_coco=2)


@pytest.fixture(scope="session")
def train_suite(suite_factory) -> Path:
    """A suite with 8 training and 4 validation frames (64×128; 4 anomaly frames per set, 4 COCO objects): enough
    for the demo recipe's short training runs and the evenly spaced validation subsets."""
    return suite_factory(seed=0, size=(64, 128), n_train=8, n_val=4, n_anomaly=4, n_coco=4)


@pytest.fixture(scope="session")
def tiny_erfnet(tmp_path_factory):
    """A self-describing random ERFNet (channels 4/8/16, seed 0) as a ``.safetensors`` file."""
    import torch

    from oodseg.models import create_model, save_safetensors

    torch.manual_seed(0)
    return save_safetensors(create_model("erfnet", channels=[4, 8, 16], input_size=None),
                            tmp_path_factory.mktemp("tiny_model") / "tiny.safetensors")
