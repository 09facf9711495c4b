"""The first hour, from the command line: bad input fails before Ray starts, in one line naming the file or option,
with exit code 2 and nothing recorded; ``--help`` lists the valid values; errors survive pickling through Ray."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from oodseg.data import DataError
from oodseg.models import CheckpointError, create_model
from oodseg.platform.jobs import benchmark, finetune, tune_temperature


def run(main, argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and stderr lines of one job invocation (SystemExit from argparse included)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def bench(root: Path, model: Path, results: Path, *extra: str) -> list[str]:
    return ["--data-root", str(root), "--results", str(results),
            "--set", f"models=[{{name: tiny, checkpoint: {model}}}]", *extra]


def one_error(code: int, err: list[str], *needles: str) -> None:
    assert code == 2, err
    assert len(err) == 1, err  # one line, no traceback
    for needle in needles:
        assert needle in err[0], err


@pytest.mark.parametrize("extra,needles", [
    (["--max-images", "-3"], ["max_images"]),
    (["--precision", "fp8"], ["precision", "fp8"]),
    (["--placements", "cl,xx"], ["placements", "xx"]),
    (["--scorers", "msp,nope"], ["scorers", "nope"]),
    (["--datasets", "road_anomly_21"], ["road_anomly_21"]),
    (["--set", "models=[{name: oe"], ["--set models", "YAML"]),
    (["--set", "models=[{name: x, arch: resnet_unet}]"], ["arch", "resnet_unet"]),
    (["--device", "cuda"], ["--device cuda"]),
    (["--refine", "s2m", "--set", "refine_cfg.scorers=[nope]"], ["refine"]),
])
def test_bad_options_are_one_line_before_ray(tiny_suite, tiny_erfnet, tmp_path, capsys, extra, needles):
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a CUDA device exists")
    results = tmp_path / "results"
    code, err = run(benchmark.main, bench(tiny_suite, tiny_erfnet, results, *extra), capsys)
    one_error(code, err, *needles)
    assert not (results / "runs").exists()  # nothing recorded: the job never started


def test_missing_or_empty_data_is_an_error_naming_the_expected_folder(tiny_suite, tiny_erfnet, tmp_path, capsys):
    missing = tmp_path / "does-not-exist"
    code, err = run(benchmark.main, bench(missing, tiny_erfnet, tmp_path / "r1", "--datasets", "road_anomaly_21"),
                    capsys)
    one_error(code, err, str(missing))
    empty = tmp_path / "empty"
    (empty / "Validation_Dataset" / "RoadAnomaly21" / "images").mkdir(parents=True)
    code, err = run(benchmark.main, bench(empty, tiny_erfnet, tmp_path / "r2", "--datasets", "road_anomaly_21"), capsys)
    one_error(code, err, "Validation_Dataset/RoadAnomaly21/images", "no images")
    # a root that holds only some datasets names the folder of the missing one
    code, err = run(benchmark.main, bench(empty, tiny_erfnet, tmp_path / "r3", "--datasets", "fs_static"), capsys)
    one_error(code, err, "Validation_Dataset/fs_static")


@pytest.mark.parametrize("content,needles", [
    (b"not a safetensors header at all", ["garbage.safetensors", "not a readable safetensors file"]),
    (None, ["garbage.safetensors", "not found"]),
])
def test_bad_checkpoints_are_one_line(tiny_suite, tmp_path, capsys, content, needles):
    path = tmp_path / "garbage.safetensors"
    if content is not None:
        path.write_bytes(content)
    argv = ["--data-root", str(tiny_suite), "--results", str(tmp_path / "r"), "--set",
            f"models=[{{name: x, checkpoint: {path}}}]"]
    one_error(*run(benchmark.main, argv, capsys), *needles)
    pth = tmp_path / "weights.pth"
    pth.write_bytes(os.urandom(64))
    argv[-1] = f"models=[{{name: x, checkpoint: {pth}}}]"
    one_error(*run(benchmark.main, argv, capsys), "weights.pth", "torch.load")  # torch's error is paragraphs long
    torch.save({"w": torch.zeros(2)}, pth)
    one_error(*run(benchmark.main, argv, capsys), "weights.pth", "give its arch")  # a .pth does not say what it is


def test_model_arch_and_cfg_are_checked_against_the_checkpoint_before_ray(tiny_suite, tiny_erfnet, tmp_path, capsys):
    """An arch that contradicts the checkpoint's header, or a keyword the model does not take, failed in every score
    actor (a 240-line traceback flood, exit 1)."""
    argv = ["--data-root", str(tiny_suite), "--results", str(tmp_path / "r"), "--set"]
    code, err = run(benchmark.main, [*argv, f"models=[{{name: x, arch: timm_seg, checkpoint: {tiny_erfnet}}}]"], capsys)
    one_error(code, err, "tiny.safetensors", "'erfnet' model", "'timm_seg'")
    code, err = run(benchmark.main, [*argv, f"models=[{{name: x, checkpoint: {tiny_erfnet}, cfg: {{bogus: 1}}}}]"],
                    capsys)
    one_error(code, err, "'x' (erfnet) takes no 'bogus'", "width")
    # a .pth of another width: it reads, but does not load (a 150-line Ray Data traceback from the score actor, exit 1)
    pth = tmp_path / "narrow.pth"
    torch.save(create_model("erfnet", width=0.25).state_dict(), pth)
    code, err = run(benchmark.main, [*argv, f"models=[{{name: x, arch: erfnet, checkpoint: {pth}}}]"], capsys)
    one_error(code, err, "narrow.pth: does not fit ERFNet", "shape mismatch")
    assert not (tmp_path / "r" / "runs").exists()


def test_results_root_under_a_file_is_one_line(tiny_suite, tiny_erfnet, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    one_error(*run(benchmark.main, bench(tiny_suite, tiny_erfnet, tmp_path / "file" / "results"), capsys), "--results")
    assert (tmp_path / "file").read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_results_root(tiny_suite, tiny_erfnet, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        one_error(*run(benchmark.main, bench(tiny_suite, tiny_erfnet, ro / "results"), capsys), "--results",
                  "not writable")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_help_lists_valid_values_without_internal_type_names(capsys):
    code, _ = run(benchmark.main, ["--help"], capsys)
    assert code == 0
    # argparse printed to stdout; capsys.readouterr() in run() consumed it: rerun reading stdout
    with pytest.raises(SystemExit):
        benchmark.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines wherever
    for value in ("road_obstacle_21", "fs_lost_found", "smiyc_anomaly", "folder", "maxentropy", "p_ood",
                  "field|course", "true|false", "a,b", "eomt, erfnet, mask2former, precomputed, tdos, timm_seg"):
        assert value in text, value
    assert "TUPLE[" not in text and "OODSEG." not in text and "ModelSpec" not in text
    with pytest.raises(SystemExit):
        finetune.main(["--help"])
    text = capsys.readouterr().out
    for value in ("--loss", "--steps", "--init", "ce|eim|energy_oe|logitnorm|oe|tdos", "deepspeed|ddp"):
        assert value in text, value
    assert "--fault" not in text and "fault_" not in text  # test hooks are not user options


def test_finetune_and_search_reject_bad_names_before_ray(tmp_path, capsys, tiny_suite, tiny_erfnet):
    one_error(*run(finetune.main, ["--loss", "foo"], capsys), "loss", "foo")
    # the init checkpoint's model and the model's keywords: each failed in every Ray Train worker (exit 1, traceback)
    base = ["--data-root", str(tiny_suite), "--results", str(tmp_path / "r"), "--init", str(tiny_erfnet)]
    one_error(*run(finetune.main, [*base, "--model", "timm_seg"], capsys), "tiny.safetensors", "'erfnet' model",
              "--model 'timm_seg'")
    one_error(*run(finetune.main, [*base, "--set", "train.model_cfg={bogus: 1}"], capsys), "train.model_cfg",
              "takes no 'bogus'")
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 16)
    code, err = run(finetune.main, ["--init", str(garbage), "--data-root", str(tmp_path), "--results",
                                    str(tmp_path / "r")], capsys)
    one_error(code, err, "g.safetensors")
    one_error(*run(tune_temperature.main, ["--scorer", "nope"], capsys), "scorer", "nope")
    one_error(*run(tune_temperature.main, ["--val-set", "fs_static_typo"], capsys), "fs_static_typo")


def test_user_errors_survive_pickling_through_ray_workers():
    for err in (CheckpointError("/x.pth", "bad header"), DataError("/y.png", "corrupt")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err) and again.path == err.path
    # a Ray Train failure carries each rank's exception; the job prints the user's error from it
    from ray.train import ControllerError, WorkerGroupError

    from oodseg.platform.cli import user_error

    err = DataError("/y.png", "corrupt")
    failed = pickle.loads(pickle.dumps(WorkerGroupError("rank 1 failed", {0: RuntimeError("x"), 1: err})))
    assert str(user_error(failed)) == str(err)
    assert user_error(ControllerError(err)) is err
    assert user_error(WorkerGroupError("bug", {0: RuntimeError("a bug")})) is None  # bugs keep their traceback


def test_folder_dataset_needs_and_takes_a_mapping_from_the_config(tmp_path, capsys):
    from oodseg.config import build_config
    from oodseg.platform.benchmark import BenchmarkConfig
    from oodseg.platform.benchmark.prepare import open_datasets

    root = tmp_path / "mine"
    for sub in ("img", "gt"):
        (root / sub).mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "img" / "a.png")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(root / "gt" / "a.png")
    cfg = build_config(BenchmarkConfig, overrides=[
        f"datasets=[{{name: folder, key: mine, title: Mine, cfg: {{root: {root}, image_dir: img, mask_dir: gt, "
        "mapping: {0: 0, 7: 1, 255: 255}}}]"])
    (ds,) = open_datasets(cfg, str(tmp_path)).values()
    assert ds.load(ds.samples[0])["label"].max() == 1  # 7 → anomaly
    code, err = run(benchmark.main, ["--data-root", str(root), "--datasets", "folder", "--results",
                                     str(tmp_path / "r")], capsys)
    one_error(code, err, "folder", "mapping")


def test_refine_inputs_that_do_not_fit_fail_before_ray(tiny_suite, tiny_erfnet, tmp_path, capsys):
    """S2M: a SAM file missing weights, a file that is not a detector, an unknown prompter option."""
    from safetensors.torch import load_file, save_file

    from oodseg.models.checkpoint import read_safetensors_metadata
    from oodseg.models.sam import create_sam, save_sam

    good = save_sam(create_sam("tiny", image_size=64), tmp_path / "sam.safetensors")
    tensors = load_file(good)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    broken = tmp_path / "broken_sam.safetensors"
    save_file(tensors, broken, metadata=read_safetensors_metadata(good))
    base = [*bench(tiny_suite, tiny_erfnet, tmp_path / "r"), "--scorers", "msp", "--refine", "s2m"]
    cases = [
        ({"prompter": "components", "sam": str(broken)}, ["broken_sam.safetensors", dropped]),
        ({"prompter": "detector", "sam": str(good), "detectors": {"msp": str(good)}}, ["sam.safetensors", "detector"]),
        ({"prompter": "components", "sam": str(good), "prompter_cfg": {"min_aera": 3}}, ["prompter-cfg", "min_aera"]),
    ]
    for refine_cfg, needles in cases:
        argv = [*base, "--set", f"refine_cfg={json.dumps({**refine_cfg, 'scorers': ['msp']})}"]
        one_error(*run(benchmark.main, argv, capsys), *needles)
    assert not (tmp_path / "r" / "runs").exists()  # nothing recorded: Ray never started


def test_filtered_stderr_drops_only_matching_lines_written_below_python(capfd):
    """Ray's C++ logger writes to file descriptor 2 directly; the filter sees those writes and keeps the rest."""
    import re
    import sys

    from oodseg.platform.runs import RAY_LEVEL_BANNER, filtered_stderr

    with filtered_stderr(RAY_LEVEL_BANNER):
        os.write(2, b"[2026-12-02 02:13:19,304 I 1 1] logging.cc:303: Set ray log level from environment variable "
                    b"RAY_BACKEND_LOG_LEVEL to 3\nkept from C\n")
        print("kept from Python", file=sys.stderr)
    err = capfd.readouterr().err
    assert sorted(err.splitlines()) == ["kept from C", "kept from Python"]  # capfd keeps sys.stderr apart
    assert not re.search("logging.cc", err)
