"""S2M's released detector (:mod:`oodseg.models.d2_rcnn`) against detectron2 itself.

How the fixtures were made (the script stays outside the repository): detectron2 (facebookresearch/detectron2 at
02b5c4e2, run from source on CPU) builds ``GeneralizedRCNN`` from S2M's ``configs/OE/OE.yaml`` (WenjieZhao1/S2M at
170a288; ``MODEL.DEVICE cpu``, ``MODEL.WEIGHTS ""``; the ``tiny`` fixture adds ``MODEL.RESNETS.STEM_OUT_CHANNELS 8,
RES2_OUT_CHANNELS 32, WIDTH_PER_GROUP 8, MODEL.FPN.OUT_CHANNELS 16, MODEL.ROI_BOX_HEAD.FC_DIM 32``). Every tensor of
its state dict, in ``model.state_dict()`` order, is replaced by :func:`seeded_state` below (imported by the script
from this file, so both sides draw the same numbers), the model is saved with ``torch.save({"model": sd})`` as
detectron2's checkpointer does and reloaded through ``DetectionCheckpointer`` (0 mismatches), and
``model([{"image": s.unsqueeze(0).expand(3, -1, -1)}])`` — exactly S2M's call in ``tools/inference.py`` — runs on the
maps of :func:`score_map`. The fixture keeps the keys and shapes, the seeds and the resulting ``pred_boxes``,
``scores`` and ``pred_classes``.
"""

from __future__ import annotations

import gzip
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from oodseg.models.checkpoint import CheckpointError
from oodseg.models.detector import load_detector
from oodseg.refine import create_prompter

FIXTURES = Path(__file__).parent / "fixtures"


def seeded_state(keys: list[tuple[str, list[int]]], seed: int, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """Random detectron2 weights that keep activations O(1): ``randn`` per key in order from one generator; weights
    ``· scale / √fan_in``, biases ``· 0.1``, FrozenBN ``weight = 1 + 0.1·z``, ``bias = 0.1·z``,
    ``running_mean = 0.1·z``, ``running_var = 1 + 0.1·|z|``; ``scales`` (default 1) per key."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys:
        z = torch.randn(shape, generator=g)
        if ".norm." in key:
            leaf = key.rsplit(".", 1)[1]
            z = {"weight": 1 + 0.1 * z, "bias": 0.1 * z, "running_mean": 0.1 * z, "running_var": 1 + 0.1 * z.abs()}[leaf]
        elif key.endswith(".weight"):
            z = z * (scales.get(key, 1.0) / math.sqrt(z[0].numel()))
        else:
            z = z * (0.1 * scales.get(key, 1.0))
        state[key] = z
    return state


def score_map(seed: int, h: int, w: int) -> torch.Tensor:
    """A float32 score map: uniform background in [−12, −8] (energy-like) plus a brighter square."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(h, w, generator=g) * 4 - 12
    s[h // 4 : h // 2, w // 3 : w // 2] += 6
    return s


def d2_fixture(name: str) -> dict:
    with gzip.open(FIXTURES / f"d2_rcnn_{name}.json.gz", "rt") as f:
        return json.load(f)


def write_d2_checkpoint(fx: dict, path: Path) -> Path:
    keys = [(k, s) for k, s in fx["keys"]]
    torch.save({"model": seeded_state(keys, fx["seed"], fx["scales"]), "iteration": 7}, path)
    return path


def _check_parity(fx: dict, tmp_path: Path) -> None:
    det = load_detector(write_d2_checkpoint(fx, tmp_path / "model_final.pth"))
    compared = 0
    for case in fx["cases"]:
        s = score_map(case["seed"], *case["shape"])
        boxes, scores, classes = det(s.unsqueeze(0).expand(3, -1, -1))
        ref_boxes, ref_scores = torch.tensor(case["boxes"]), torch.tensor(case["scores"])
        assert len(ref_scores) > 0 and boxes.shape == ref_boxes.shape
        # float32 conv sums depend on the thread count: bit-identical at the fixture's; at others the R50's boxes
        # moved by up to 2.3e-4 px (measured), so boxes are compared to 1e-3 px and scores to 1e-4
        torch.testing.assert_close(boxes, ref_boxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)
        assert classes.tolist() == case["classes"]
        got = det.detect(s)  # the prompter's path: same boxes, by descending score
        torch.testing.assert_close(got.xyxy, ref_boxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(got.scores, ref_scores, rtol=0, atol=1e-4)
        compared += len(ref_scores)
    assert compared == fx["n_detections"]


def test_tiny_detectron2_faster_rcnn_matches_detectron2(tmp_path) -> None:
    _check_parity(d2_fixture("tiny"), tmp_path)


@pytest.mark.slow  # a random R50-FPN (41 M parameters) at two map sizes
def test_r50_fpn_from_s2m_config_matches_detectron2(tmp_path) -> None:
    _check_parity(d2_fixture("r50"), tmp_path)


def test_detector_prompter_loads_s2m_checkpoint_with_threshold_override(tmp_path) -> None:
    fx = d2_fixture("tiny")
    path = write_d2_checkpoint(fx, tmp_path / "model_final.pth")
    case = fx["cases"][1]
    s = score_map(case["seed"], *case["shape"]).numpy()
    boxes = create_prompter("detector", checkpoint=str(path))(s)
    # boxes to 1e-3 px as in _check_parity: float32 conv sums depend on the threads and the CPU's kernels (up to
    # 6.6e-4 px from the fixture on another machine, measured with 1 and 2 threads)
    torch.testing.assert_close(boxes.xyxy, torch.tensor(case["boxes"]), rtol=0, atol=1e-3)
    ref_scores = torch.tensor(case["scores"])
    thr = float(ref_scores[len(ref_scores) // 3])  # a prefix of the 100 survives: same boxes, nothing new
    high = create_prompter("detector", checkpoint=str(path), score_thresh=thr)(s)
    keep = ref_scores > thr
    assert 0 < len(high) == int(keep.sum()) < len(ref_scores)
    torch.testing.assert_close(high.xyxy, torch.tensor(case["boxes"])[keep], rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="resize_test"):
        create_prompter("detector", checkpoint=str(path), resize_test=True)


def test_detector_files_that_are_neither_format_name_the_file(tmp_path) -> None:
    fx = d2_fixture("tiny")
    state = seeded_state([(k, s) for k, s in fx["keys"]], 0, {})
    torch.save({"model": {"sem_seg_head.predictor.query_feat.weight": torch.zeros(2, 2)}}, other := tmp_path / "m2f.pth")
    del state["roi_heads.box_head.fc2.weight"]
    torch.save({"model": state}, missing := tmp_path / "missing.pth")
    (garbage := tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    cases = [(other, "not a detectron2 Faster R-CNN checkpoint"), (missing, "fc2.weight"),
             (garbage, "cannot be read"), (tmp_path / "absent.pth", "not found")]
    for path, reason in cases:
        with pytest.raises(CheckpointError, match=reason) as e:
            load_detector(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    # a safetensors file is one whatever its header length: lengths whose first bytes are 0x80 (a pickle's) or "PK"
    # (a zip's) once sent our own detectors to the detectron2 reader
    for first in (None, b"\x80", b"PK"):
        plain = padded_safetensors(tmp_path / "plain.safetensors", first)
        with pytest.raises(CheckpointError, match="not a ScoreDetector checkpoint .* S2M's detectron2 model_final"):
            load_detector(plain)


def padded_safetensors(path: Path, first: bytes | None) -> Path:
    """A one-tensor safetensors file whose header length (its first 8 bytes, little-endian) starts with ``first``."""
    for pad in range(0, 70000, 8):
        save_file({"w": torch.zeros(1)}, str(path), metadata={"pad": "x" * pad})
        if first is None or path.read_bytes()[: len(first)] == first:
            return path
    raise AssertionError(f"no padding gives a header starting with {first!r}")


def test_model_zoo_style_pkl_loads_like_the_pth(tmp_path) -> None:
    """A detectron2-named ``.pkl`` of numpy arrays (the model zoo's format, protocol 2) gives the same detections."""
    fx = d2_fixture("tiny")
    state = seeded_state([(k, s) for k, s in fx["keys"]], fx["seed"], fx["scales"])
    with (pkl := tmp_path / "model_final.pkl").open("wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, f, protocol=2)
    case = fx["cases"][0]
    got = load_detector(pkl).detect(score_map(case["seed"], *case["shape"]))
    torch.testing.assert_close(got.xyxy, torch.tensor(case["boxes"]), rtol=0, atol=1e-3)  # as above
    assert torch.allclose(got.scores, torch.tensor(case["scores"]), atol=1e-4)
