"""Registration without side-effect imports: the built-in training tasks and checkpoint sources are known to their
registries from the start (``oodseg.registry.PROVIDERS``) and their modules are imported on first use, in any
process, e.g. a Ray Train worker that imported nothing from ``oodseg.refine``; and importing oodseg changes nothing
in the process environment (a job's entry point applies its settings, ``oodseg.process``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from oodseg.registry import PROVIDERS, Registry

ROOT = Path(__file__).resolve().parents[1]


def fresh_python(code: str, env: dict[str, str] | None = None) -> str:
    """stdout of ``code`` run by a new interpreter (nothing of this test process imported) in ``env`` (default:
    this process's environment)."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def without_wait_policy() -> dict[str, str]:
    """This environment without an OpenMP wait policy (the test session sets one, as a job would)."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OODSEG_JOB_OMP_WAIT_POLICY")}


def test_a_fresh_process_creates_the_refine_tasks_without_importing_refine(tmp_path):
    from oodseg.models import create_model, save_safetensors

    torch.manual_seed(0)
    scoring = save_safetensors(create_model("erfnet", channels=[4, 8, 16], input_size=None), tmp_path / "m.safetensors")
    out = fresh_python(f"""
        import sys
        from oodseg.training import TrainConfig, create_task, list_tasks
        print(sorted(list_tasks()), any(m.startswith("oodseg.refine") for m in sys.modules))
        saom = create_task(TrainConfig(task="saom", task_cfg={{"grid": [4, 4]}}))
        detector = create_task(TrainConfig(task="s2m_detector", task_cfg={{"scoring_model": {str(scoring)!r}}}))
        print(type(saom).__module__, type(saom).__name__, type(detector).__module__, type(detector).__name__)
    """)
    assert out.split("\n")[:2] == [
        "['s2m_detector', 'saom', 'segmentation'] False",
        "oodseg.training.saom_task SaomTask oodseg.training.detector_task DetectorTask"]


def test_a_fresh_process_knows_every_demo_checkpoint_source():
    out = fresh_python("""
        import sys
        from oodseg.models import resolve_checkpoint
        from oodseg.models.factory import CHECKPOINT_SOURCES
        print(CHECKPOINT_SOURCES.list(), "oodseg.refine.demo" in sys.modules)
        print(CHECKPOINT_SOURCES.get("demo-sam").__module__, CHECKPOINT_SOURCES.get("demo-tdos").__module__,
              CHECKPOINT_SOURCES.get("demo").__module__, resolve_checkpoint("scratch"))
    """)
    assert out.split("\n")[:2] == [
        "['demo', 'demo-detector', 'demo-mask', 'demo-sam', 'demo-saom', 'demo-tdos', 'scratch'] False",
        "oodseg.refine.demo oodseg.training.demo_tdos oodseg.training.demo None"]


def test_a_declared_provider_is_imported_on_first_use_and_must_register(tmp_path, monkeypatch):
    (tmp_path / "prov_ok.py").write_text("from tests_registry_kind import R\n@R.register('good', title='G')\n"
                                         "def good():\n    return 1\n")
    (tmp_path / "prov_silent.py").write_text("X = 1\n")
    monkeypatch.setitem(PROVIDERS, "test kind", {"good": "prov_ok", "silent": "prov_silent"})
    registry: Registry[int] = Registry("test kind")
    mod = type(sys)("tests_registry_kind")
    mod.R = registry
    monkeypatch.setitem(sys.modules, "tests_registry_kind", mod)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "good" in registry and registry.list() == ["good", "silent"] and "prov_ok" not in sys.modules
    assert registry.create("good") == 1 and registry.meta("good") == {"title": "G"} and "prov_ok" in sys.modules
    with pytest.raises(RuntimeError, match="prov_silent does not register the test kind 'silent'"):
        registry.get("silent")
    with pytest.raises(KeyError, match="unknown test kind 'nope'; known: good, silent"):
        registry.get("nope")
    for name in ("prov_ok", "prov_silent"):
        sys.modules.pop(name, None)


def test_importing_oodseg_leaves_the_environment_alone():
    """The issue's done-check, plus the modules a job imports; a job's entry point then sets the wait policy."""
    code = """
        import os
        e = dict(os.environ)
        import oodseg, oodseg.platform.benchmark
        print(sorted(set(os.environ) - set(e)))
        import oodseg.platform.benchmark.driver, oodseg.platform.jobs.finetune, oodseg.platform.tuning.temperature
        import oodseg.platform.tuning.loss, oodseg.refine.demo, oodseg.training.background
        print(sorted(k for k in set(os.environ) | set(e) if os.environ.get(k) != e.get(k)))
        from oodseg.process import apply_job_settings
        apply_job_settings()
        print(os.environ["OMP_WAIT_POLICY"])
    """
    assert fresh_python(code, without_wait_policy()).split("\n")[:3] == ["[]", "[]", "PASSIVE"]


@pytest.mark.parametrize("user_policy", ["", "ACTIVE"])
def test_a_job_sets_the_passive_policy_before_torch_unless_the_user_chose_one(user_policy):
    """``python -m oodseg`` applies the job settings before the command's module (and torch) is imported."""
    env = without_wait_policy()
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    code = ("import os, sys; from unittest import mock; import oodseg.__main__ as m\n"
            "seen = []\n"
            "def fake(name):\n"
            "    seen.append((os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules))\n"
            "    return mock.Mock(main=lambda argv: 0)\n"
            "m.importlib.import_module = fake\n"
            "m.main(['report'])\n"
            "from oodseg.process import wait_policy_from_user\n"
            "print(seen, wait_policy_from_user())")
    assert fresh_python(code, env).strip() == f"[('{user_policy or 'PASSIVE'}', False)] {bool(user_policy)}"
