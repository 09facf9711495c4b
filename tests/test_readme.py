"""Every command of the README runs here, as written, shortened only by appended options (fewer images, steps,
samples), in README order in one work directory: a command that breaks (as ``train_detector.py`` once did in every
Ray Train worker) fails the suite. :data:`COMMANDS` maps each README line to the options that shorten it, or to why
it cannot run on a machine without internet, a GPU or a cloud account; a README command missing from the table fails
:func:`test_every_readme_command_is_in_the_table`.

The environment is the README's: ``OODSEG_CACHE`` holds the synthetic suite; ``/data`` is a copy of it plus an ERFNet
``.pth`` and a ``folder`` dataset in the README's layout. Jobs run in-process on the session's Ray; their demo models
(``demo``, ``demo-mask``, ``demo-sam``, ``demo-saom``, ``demo-detector``, ``demo-tdos``) train through the real
cached-training path for 2 steps instead of their recipe's hundreds (``cached_fit`` is wrapped), so each README
command exercises everything it would on a laptop, only shorter.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RUN_FIRST = True  # the suite's longest test: scheduled first (tests/conftest.py)
BENCH = ["--max-images", "1", "--heatmaps", "1"]
TRAIN = ["--steps", "4", "--set", "train.log_every=1", "--set", "train.val_every=2", "--set", "checkpoint_every=2", "--set", "train.crop=[64,128]",
         "--set", "train.global_batch=2", "--set", "train.val_images=2"]
TUNE = ["--num-samples", "3", "--max-images", "1"]
INTERNET = "needs the internet (hub weights or NLTK data)"
RELEASED = "needs RbA's released Swin-B weights (a download)"
CLOUD = "starts or stops an AWS cluster (tests/test_clusters.py validates the YAML)"
LOCAL_CLUSTER = "a local Ray cluster with token auth + ray job submit: tests/test_job_submit.py runs exactly this"
MAKE = "the README's set-up commands: .ci/run runs make test; make demo is python jobs/benchmark.py (run below)"

#: README command (comments stripped, whitespace normalised) → options appended to shorten it, or why it does not
#: run here
COMMANDS: dict[str, list[str] | str] = {
    "make demo": MAKE,
    "make test": MAKE,
    "make test-fast": MAKE,
    "python -m oodseg.data.synthetic --out /tmp/suite --seed 0": ["--size", "32", "64", "--n-train", "1", "--n-val",
                                                                  "1", "--n-anomaly", "1", "--n-coco", "1"],
    "python jobs/benchmark.py --config configs/demo_mask.yaml": BENCH,
    "python jobs/benchmark.py --scorers sml,mahalanobis,knn,react,gen,odin,energy": [*BENCH, "--fit-max-images", "4"],
    "python jobs/benchmark.py --data-root /data --datasets road_anomaly_21,fs_static,cityscapes": BENCH,
    'python jobs/benchmark.py --set datasets=[{name: folder, key: my_set, title: "My set", cfg: {root: /data/my_set, '
    "image_dir: images, mask_dir: labels_masks, mapping: {0: 0, 1: 1, 2: 1, 255: 255}}}]": BENCH,
    "python -m oodseg convert-checkpoint eomt_large_1024.ckpt checkpoints/eomt-l": INTERNET + " (tests/"
    "test_eomt_convert.py converts a checkpoint built in that format)",
    'python jobs/benchmark.py --data-root /data --set models=[{name: eomt-l, arch: eomt, checkpoint: "", cfg: '
    "{pretrained: checkpoints/eomt-l}}]": INTERNET + " (the converted EoMT-L)",
    "python jobs/benchmark.py --data-root /data --set models=[{name: erfnet, arch: erfnet, checkpoint: "
    "/data/checkpoints/erfnet_pretrained.pth}]": BENCH,
    "python -m oodseg convert-checkpoint --format detectron2-mask2former ckpts/swin_b_1dl checkpoints/rba_swin_b_1dl":
    RELEASED + " (tests/test_mask2former_convert.py converts checkpoints built in that format)",
    "python jobs/benchmark.py --config configs/rba_swin_b.yaml --set data_root=/data": RELEASED,
    "python jobs/benchmark.py --config configs/s2m_released.yaml": "needs S2M's released validation set, detector and "
    "SAM-B (downloads; tests/test_s2m_release.py runs this config on S2M's layout)",
    "python jobs/finetune.py --config configs/finetune_rba_swin_b.yaml --set train.data_root=/data --set "
    "train.coco_root=/data/coco": RELEASED + " and a GPU (tests/test_models_mask2former.py fine-tunes a tiny one)",
    "python -m oodseg report": [],
    "python -m oodseg report --runs RUN_A,RUN_B": "RUN_A,RUN_B",
    "python -m oodseg report --sql SELECT run_id, job, status, started_at FROM runs ORDER BY started_at": [],
    "python -m oodseg report --sql SELECT dataset, file, stage, error FROM failures": [],
    "python -c import duckdb; duckdb.sql(\"SELECT run_id, model, dataset, stage, scorer, round(100*auprc, 1) AS auprc, "
    "round(100*fpr95, 1) AS fpr95, round(100*siou, 1) AS siou, round(100*miou, 1) AS miou FROM read_parquet("
    "'results/metrics/*.parquet', union_by_name=true) WHERE run_id IN (SELECT run_id FROM 'results/runs/*.parquet' "
    "WHERE job = 'benchmark') QUALIFY row_number() OVER (PARTITION BY model, dataset, stage, scorer, placement, "
    "temperature ORDER BY committed_at DESC) = 1 ORDER BY dataset, model, scorer\").show()": [],
    "python -m oodseg cache": [],
    "python -m oodseg cache --delete RUN_ID": "RUN_ID",
    "python jobs/finetune.py --config configs/finetune.yaml": TRAIN,
    "python jobs/finetune.py --config configs/finetune.yaml --name finetune-logitnorm --export results/finetune/"
    "finetune-logitnorm.safetensors --loss logitnorm --set train.loss_cfg={temperature: 0.5}": TRAIN,
    "python jobs/finetune.py --config configs/finetune.yaml --name finetune-eim --export results/finetune/"
    "finetune-eim.safetensors --loss eim --set train.loss_cfg={}": TRAIN,
    "python jobs/finetune.py --config configs/finetune.yaml --name finetune-oe-ddp --export results/finetune/"
    "finetune-oe-ddp.safetensors --strategy ddp": TRAIN,
    "python jobs/benchmark.py --set models=[{name: finetune-oe, checkpoint: results/finetune/finetune-oe.safetensors}, "
    "{name: finetune-logitnorm, checkpoint: results/finetune/finetune-logitnorm.safetensors}]": BENCH,
    "python jobs/benchmark.py --config configs/s2m.yaml": BENCH,
    "python jobs/benchmark.py --config configs/s2m.yaml --refine-cfg.prompter components": BENCH,
    "python jobs/benchmark.py --config configs/s2m.yaml --refine-cfg.sam demo-sam": BENCH,
    "python jobs/benchmark.py --config configs/s2m.yaml --refine-cfg.sam facebook/sam-vit-base": INTERNET
    + " (offline it fails before Ray in one line: tests/test_benchmark_faults.py)",
    "python jobs/train_detector.py --name detector-rba --set train.task_cfg.scorer=rba": TRAIN,
    "python jobs/benchmark.py --config configs/s2m.yaml --set refine_cfg.detectors={rba: results/finetune/"
    "detector-rba.safetensors}": BENCH,
    "python jobs/train_saom.py --name saom-demo": TRAIN,
    "python jobs/benchmark.py --config configs/s2m.yaml --refine-cfg.sam results/finetune/saom-demo.safetensors": BENCH,
    "python jobs/train_saom.py --name saom-vitb --data-root /data --use-gpu true --set "
    "train.task_cfg.sam=facebook/sam-vit-base": INTERNET + " and a GPU",
    "python jobs/benchmark.py --config configs/tdos.yaml": BENCH,
    "pip install nltk && python -m nltk.downloader wordnet": INTERNET,
    "python -m oodseg mine-negatives --wordnet --clip openai/clip-vit-base-patch16 --out negatives.json": INTERNET,
    "python jobs/finetune.py --name tdos-cityscapes --model tdos --loss tdos --init scratch --data-root /data --set "
    "train.coco_root=/data/coco --use-gpu true --set train.model_cfg={clip: openai/clip-vit-base-patch16, negatives: "
    "negatives.json}": INTERNET + " and a GPU (tests/test_finetune.py trains a tiny TDOS on the same trainer)",
    "python jobs/benchmark.py --data-root /data --set models=[{name: tdos, checkpoint: "
    "results/finetune/tdos-cityscapes.safetensors}]": INTERNET + " (the TDOS trained above)",
    "python jobs/tune_temperature.py --scorer msp --objective auprc": TUNE,
    "python jobs/tune_temperature.py --scorer energy --objective fpr95 --t-low 0.01 --t-high 100": TUNE,
    "python jobs/tune_temperature.py --search grid --grid 0.5,0.75,1.1": TUNE,
    "python jobs/tune_loss.py --config configs/tune_loss.yaml": ["--num-samples", "2", "--finetune.train.steps", "4",
                                                                 "--set", "finetune.train.val_every=2",
                                                                 "--set", "finetune.train.crop=[64,128]",
                                                                 "--set", "finetune.train.global_batch=2",
                                                                 "--set", "finetune.train.val_images=2"],
    "tensorboard --logdir results/tune": ["--inspect"],
    "python -c import duckdb; duckdb.sql(\"SELECT run_id, study, objective, mode, trial_id, value, params_json FROM "
    "'results/trials/*.parquet' WHERE status = 'ok' QUALIFY row_number() OVER (PARTITION BY run_id, study ORDER BY "
    "CASE WHEN mode = 'min' THEN value ELSE -value END) = 1\").show()": [],
    "ray get-auth-token --generate": LOCAL_CLUSTER,
    "ray up clusters/gpu.yaml": CLOUD,
    "ray dashboard clusters/gpu.yaml": CLOUD,
    "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/benchmark.py "
    "--config configs/benchmark_cluster.yaml": CLOUD,
    "ray down clusters/gpu.yaml": CLOUD,
    "RAY_AUTH_MODE=token ray start --head --num-cpus 2": LOCAL_CLUSTER,
    "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/benchmark.py "
    "--results $PWD/results": LOCAL_CLUSTER,
    "ray stop": LOCAL_CLUSTER,
}
PLACEHOLDERS = ("RUN_A,RUN_B", "RUN_ID")  # README placeholders: the value names what replaces them
START = re.compile(r"^(python|make|ray|RAY_AUTH_MODE=|pip|tensorboard)\b")


def readme_commands(text: str) -> dict[str, list[str]]:
    """Shell commands of the README's code blocks (continuation lines joined, comments dropped), each keyed by its
    words joined with single spaces, mapped to its words."""
    out, block, lines, i = {}, False, text.splitlines(), 0
    while i < len(lines):
        line, i = lines[i], i + 1
        if line.startswith("```"):
            block = not block
            continue
        if not block or not START.match(line.strip()):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            line, i = line.rstrip()[:-1] + " " + lines[i].strip(), i + 1
        words = shlex.split(line, comments=True)
        out[" ".join(words)] = words
    return out


def test_every_readme_command_is_in_the_table():
    commands = readme_commands((ROOT / "README.md").read_text())
    missing = [c for c in commands if c not in COMMANDS]
    assert not missing, "README commands without a test (add them to COMMANDS):\n" + "\n".join(missing)
    assert not set(COMMANDS) - set(commands), "COMMANDS lists commands the README no longer has"


def short_cached_fit(real):
    """``cached_fit`` training 2 steps of the recipe (its own cache name follows from the shortened config)."""
    from dataclasses import replace

    def fit(name, cfg, *args, **kw):
        return real(name, replace(cfg, steps=2, warmup=min(cfg.warmup, 1), val_every=0, log_every=1), *args, **kw)

    return fit


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkout-like directory (configs/, jobs/), ``$OODSEG_CACHE`` with the default suite (built in seconds),
    and a ``/data`` stand-in: a copy of that suite with an ERFNet ``.pth`` and a ``folder`` dataset."""
    from oodseg.models import create_model
    from oodseg.paths import synthetic_suite

    work = tmp_path_factory.mktemp("readme")
    for name in ("configs", "jobs", "clusters"):
        (work / name).symlink_to(ROOT / name)
    cache = work / ".cache"
    data = work / "data"
    shutil.copytree(synthetic_suite(cache, 0), data)
    (data / "checkpoints").mkdir()
    torch.manual_seed(0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in create_model("erfnet").state_dict().items()}},
               data / "checkpoints" / "erfnet_pretrained.pth")  # the course checkpoint's DataParallel layout
    folder_dataset(data / "my_set")
    return work, data, cache


def folder_dataset(root: Path) -> None:
    """Two images with masks in values {0, 1, 2, 255}: the README's folder example maps 2 → anomaly."""
    rng = np.random.default_rng(0)
    for sub in ("images", "labels_masks"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        mask = np.zeros((64, 128), np.uint8)
        mask[10:20, 30:50], mask[40:50, 60:70], mask[-4:] = 1, 2, 255
        Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(root / "images" / f"f{i}.png")
        Image.fromarray(mask).save(root / "labels_masks" / f"f{i}.png")


def run_python(argv: list[str]) -> int:
    """A README ``python …`` command, in-process: a job script, ``-m oodseg …``, a package module, or ``-c``."""
    from oodseg.__main__ import main as oodseg_main

    if argv[0] == "-c":
        exec(compile(argv[1], "<readme>", "exec"), {})
        return 0
    if argv[0] == "-m" and argv[1] == "oodseg":
        return oodseg_main(argv[2:])
    if argv[0] == "-m":
        module = __import__(argv[1], fromlist=["main"])
        return module.main(argv[2:])
    job = Path(argv[0]).stem
    module = __import__(f"oodseg.platform.jobs.{job}", fromlist=["main"])
    return module.main(argv[1:])


def substitute(words: list[str], data: Path, state: dict[str, str]) -> list[str]:
    """The README's paths and placeholders replaced by this test's."""
    out = []
    for word in words:
        word = word.replace("/data", str(data)).replace("/tmp/suite", str(data.parent / "suite-out"))
        for placeholder in PLACEHOLDERS:
            word = word.replace(placeholder, state.get(placeholder, placeholder))
        out.append(word)
    return out


@pytest.mark.slow
def test_every_readme_command_runs(ray_session, workdir, monkeypatch):
    work, data, cache = workdir
    monkeypatch.chdir(work)
    monkeypatch.setenv("OODSEG_CACHE", str(cache))
    for module in ("oodseg.training.demo", "oodseg.refine.demo", "oodseg.training.demo_tdos",
                   "oodseg.training.demo_mask"):
        mod = __import__(module, fromlist=["cached_fit"])
        monkeypatch.setattr(mod, "cached_fit", short_cached_fit(mod.cached_fit))
    from oodseg.models import resolve_checkpoint

    for source in ("demo", "demo-mask", "demo-tdos"):  # built here, shortened: a job trains them in a child process
        resolve_checkpoint(source, cache_dir=cache, data_root=None, seed=0)
    failed, state, outputs = [], {}, {}
    words = readme_commands((ROOT / "README.md").read_text())
    for command, how in COMMANDS.items():
        if isinstance(how, str) and how not in PLACEHOLDERS:
            continue
        if how == "RUN_ID":  # a run whose caches can be deleted: one that kept its model outputs
            run_one(["python", "jobs/benchmark.py"], ["--run-id", "cached", "--cache-outputs", "true",
                                                      "--datasets", "road_anomaly_21", *BENCH], data, state)
            state[how], how = "cached", []
        elif how == "RUN_A,RUN_B":  # the two latest benchmark runs
            state[how], how = ",".join(latest_runs(work, 2)), []
        t0 = time.time()
        code, outputs[command] = run_one(words[command], how, data, state)
        print(f"README: exit {code} in {time.time() - t0:.1f} s: {command[:100]}", file=sys.__stderr__, flush=True)
        if code != 0:
            failed.append(f"{command}\n  → exit {code}: {outputs[command][-1500:]}")
    assert not failed, "README commands that failed:\n" + "\n".join(failed)
    check_training_jobs(work, outputs, words, data, state)


def check_training_jobs(work: Path, outputs: dict[str, str], words: dict[str, list[str]], data: Path,
                        state: dict[str, str]) -> None:
    """What the README's detector and SAOM commands leave behind: a progress line per step, the exported models
    (the detector's calibration fixed before training, a SAM that ``create_sam`` takes), and a rerun of a finished
    run that says so and exports again instead of training."""
    from oodseg.models.detector import load_detector
    from oodseg.models.sam import create_sam

    detector_cmd = next(c for c in COMMANDS if c.startswith("python jobs/train_detector.py"))
    saom_cmd = next(c for c in COMMANDS if c.startswith("python jobs/train_saom.py --name saom-demo"))
    for command in (detector_cmd, saom_cmd):
        assert "step 1/4  loss" in outputs[command] and "step 4/4  loss" in outputs[command], outputs[command]
    detector = work / "results" / "finetune" / "detector-rba.safetensors"
    assert load_detector(detector).cfg.scale > 0
    assert create_sam(str(work / "results" / "finetune" / "saom-demo.safetensors")).hidden_size > 0
    detector.unlink()
    code, out = run_one(words[detector_cmd], COMMANDS[detector_cmd], data, state)
    assert code == 0 and "detector-rba: already finished at step 4/4" in out and detector.is_file(), out


def latest_runs(work: Path, n: int) -> list[str]:
    from oodseg.platform.results import ResultsStore

    runs = ResultsStore(str(work / "results")).read("runs")
    runs = runs[runs.job == "benchmark"].sort_values("started_at")
    return list(dict.fromkeys(runs.run_id))[-n:]


def run_one(words: list[str], extra: list[str], data: Path, state: dict[str, str]) -> tuple[int, str]:
    argv = substitute(words, data, state) + list(extra)
    if argv[0] == "tensorboard":
        proc = subprocess.run([str(Path(sys.executable).parent / "tensorboard"), *argv[1:]], capture_output=True,
                              text=True, timeout=120)
        return proc.returncode, proc.stdout + proc.stderr
    buf = io.StringIO()
    try:
        with redirect_stdout(buf), redirect_stderr(buf):
            code = run_python(argv[1:])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - reported with the command
        code, buf = 1, io.StringIO(f"{type(e).__name__}: {e}")
    return code or 0, buf.getvalue()
