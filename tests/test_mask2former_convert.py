"""convert-checkpoint --format detectron2-mask2former: a hub-format model and the detectron2 checkpoint of the same
weights give the same outputs (``_BASE_`` configs, 3 and 1 feature levels, BGR models); bad input fails in one line.

The detectron2 checkpoints here are written from a tiny transformers model by inverting the converter's key table
(``mask2former_ref.to_detectron2``); that table is checked against the reference network in test_mask2former_parity.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from mask2former_ref import to_detectron2, write_tiny_d2

from oodseg.models import create_model
from oodseg.models.checkpoint import CheckpointError
from oodseg.models.convert import main
from oodseg.models.detectron2_config import D2Config
from oodseg.models.mask2former_arch import build_hf, hf_config
from oodseg.models.mask2former_convert import convert_checkpoint, read_weights
from oodseg.models.mask2former_keys import hf_config_from_d2, key_map

FMT = ["--format", "detectron2-mask2former"]


def tiny_hub(folder: Path, levels: int = 3, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A hub-format directory (save_pretrained + image processor) of the tiny model; returns it and its weights."""
    from transformers import Mask2FormerImageProcessor

    torch.manual_seed(seed)
    hf = build_hf(hf_config("tiny", encoder_feedforward_dim=1024, num_feature_levels=levels)).eval()
    with torch.no_grad():  # non-trivial values everywhere (transformers zero-initialises some of them)
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(str(folder))
    Mask2FormerImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                              size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(str(folder))
    return folder, hf.state_dict()


def d2_state(tmp: Path, state: dict[str, torch.Tensor], levels: int = 3) -> dict[str, torch.Tensor]:
    conv = hf_config_from_d2(D2Config(write_tiny_d2(tmp / "layout", {}, levels) / "config.yaml"))
    return to_detectron2(state, key_map(conv), window=4)


def predict_both(a: Path, b: Path, **cfg) -> tuple:
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 70, 100, 3), dtype=np.uint8))
    return tuple(create_model("mask2former", pretrained=str(p), **cfg).eval().predict(img) for p in (a, b))


@pytest.mark.parametrize("levels", [3, 1])
def test_hub_format_and_converted_detectron2_agree(tmp_path, levels):
    hub, state = tiny_hub(tmp_path / "hub", levels)
    d2 = write_tiny_d2(tmp_path / "d2", d2_state(tmp_path, state, levels), levels)
    assert main([*FMT, str(d2), str(tmp_path / "out")]) == 0
    for cfg in ({}, {"test_size": "checkpoint"}):
        x, y = predict_both(hub, tmp_path / "out", **cfg)
        assert x.frame_size == y.frame_size == ((64, 91) if cfg else (70, 100))
        torch.testing.assert_close(x.class_logits, y.class_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.mask_logits, y.mask_logits, rtol=1e-5, atol=1e-5)
    # CONFIG WEIGHTS form, and the config's settings in the written directory
    assert main([*FMT, str(d2 / "config.yaml"), str(d2 / "model_final.pth"), str(tmp_path / "out2")]) == 0
    model = create_model("mask2former", pretrained=str(tmp_path / "out2"), test_size="checkpoint")
    assert model.test_size == (64, 128) and model.size_divisibility == 32
    assert getattr(model.hf.config, "num_feature_levels", 3) == levels and model.hf.config.num_queries == 8
    np.testing.assert_allclose(model._mean, [0.485, 0.456, 0.406], atol=1e-6)


def test_bgr_model_takes_rgb_after_conversion(tmp_path):
    """A BGR checkpoint (first conv sees B, G, R; mean/std in that order) converts to the same RGB model."""
    _, state = tiny_hub(tmp_path / "hub")
    rgb = d2_state(tmp_path, state)
    bgr = dict(rgb, **{"backbone.patch_embed.proj.weight": rgb["backbone.patch_embed.proj.weight"].flip(1)})
    write_tiny_d2(tmp_path / "rgb", rgb)
    write_tiny_d2(tmp_path / "bgr", bgr, extra="  PIXEL_MEAN: [103.53, 116.28, 123.675]\n"
                                               "  PIXEL_STD: [57.375, 57.12, 58.395]\nINPUT: {FORMAT: BGR}\n")
    for name in ("rgb", "bgr"):
        convert_checkpoint([tmp_path / name], tmp_path / f"{name}-out")
    x, y = predict_both(tmp_path / "rgb-out", tmp_path / "bgr-out")
    torch.testing.assert_close(x.class_logits, y.class_logits, rtol=1e-5, atol=1e-5)


def test_pkl_model_zoo_file_reads_numpy_only(tmp_path):
    _, state = tiny_hub(tmp_path / "hub")
    d2 = d2_state(tmp_path, state)
    zoo = {"model": {k: v.numpy() for k, v in d2.items()}, "__author__": "zoo", "matching_heuristics": True}
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(zoo, protocol=2))
    read = read_weights(tmp_path / "m.pkl")
    assert set(read) == set(d2) and all(torch.equal(read[k], d2[k]) for k in d2)

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": {"a": Evil()}}))
    with pytest.raises(CheckpointError, match="pathlib.*is not allowed"):
        read_weights(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()


def test_pth_with_numpy_arrays_reads_under_weights_only(tmp_path):
    torch.save({"model": {"sem_seg_head.predictor.query_feat.weight": np.ones((2, 3), np.float32)}},
               tmp_path / "np.pth")
    assert torch.equal(read_weights(tmp_path / "np.pth")["sem_seg_head.predictor.query_feat.weight"],
                       torch.ones(2, 3))


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main([*FMT, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_fail_in_one_line(tmp_path, capsys):
    _, state = tiny_hub(tmp_path / "hub")
    good = d2_state(tmp_path, state)
    out = str(tmp_path / "out")
    garbage = write_tiny_d2(tmp_path / "garbage", {})
    (garbage / "model_final.pth").write_bytes(b"\x00not a checkpoint" * 50)
    assert "cannot be read with torch.load(weights_only=True)" in _one_line_error(capsys, [str(garbage), out])
    wrong = write_tiny_d2(tmp_path / "wrong", {"network.encoder.backbone.cls_token": torch.zeros(1, 1, 8)})
    assert "not a detectron2 Mask2Former checkpoint" in _one_line_error(capsys, [str(wrong), out])
    missing = write_tiny_d2(tmp_path / "missing", {k: v for k, v in good.items() if "query_feat" not in k})
    assert "1 missing key(s): sem_seg_head.predictor.query_feat.weight" in _one_line_error(capsys, [str(missing), out])
    extra = write_tiny_d2(tmp_path / "extra", {**good, "sem_seg_head.predictor.ood_head.weight": torch.zeros(2)})
    assert "unexpected key(s): sem_seg_head.predictor.ood_head.weight" in _one_line_error(capsys, [str(extra), out])
    shaped = write_tiny_d2(tmp_path / "shaped",
                           {**good, "sem_seg_head.predictor.query_feat.weight": torch.zeros(9, 32)})
    assert "shape mismatches" in _one_line_error(capsys, [str(shaped), out])
    ape = write_tiny_d2(tmp_path / "ape", good, extra="  SWIN: {APE: true}\n")
    assert "unsupported MODEL.SWIN.APE: True" in _one_line_error(capsys, [str(ape), out])
    vit = write_tiny_d2(tmp_path / "vit", good, extra="  BACKBONE: {NAME: D2ViT}\n")
    assert "unsupported MODEL.BACKBONE.NAME: 'D2ViT'" in _one_line_error(capsys, [str(vit), out])
    levels = write_tiny_d2(tmp_path / "levels", good,
                           extra="  SEM_SEG_HEAD: {DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES: [res3]}\n")
    assert "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES" in _one_line_error(capsys, [str(levels), out])
    (tmp_path / "cycle.yaml").write_text("_BASE_: cycle.yaml\n")
    cycle = [str(tmp_path / "cycle.yaml"), str(garbage / "model_final.pth"), out]
    assert "_BASE_ cycle" in _one_line_error(capsys, cycle)
    assert "needs config.yaml" in _one_line_error(capsys, [str(tmp_path / "hub"), out])
    assert not Path(out).exists()
    assert main([*FMT, "--help"]) == 0 and "detectron2" in capsys.readouterr().out


def test_convert_command_lists_formats_and_defaults_to_eomt(tmp_path, capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "detectron2-mask2former" in text and "tue-mps-eomt" in text and "CONFIG.yaml" in text
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(1)}}, tmp_path / "d2.pth")
    assert main([str(tmp_path / "d2.pth"), str(tmp_path / "out")]) == 2  # the tue-mps reader, as before
    assert "--format detectron2-mask2former" in capsys.readouterr().err
    assert main(["--format", "caffe", "x", "y"]) == 2 and "unknown --format 'caffe'" in capsys.readouterr().err
