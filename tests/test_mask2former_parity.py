"""Mask2Former through ``convert-checkpoint --format detectron2-mask2former`` against the reference network.

How the fixtures (``tests/fixtures/mask2former_<name>.json.gz``) were made, outside this repository (the reference code
is not part of oodseg): facebookresearch/detectron2 at 02b5c4e2, facebookresearch/Mask2Former at 9b0651c and
NazirNayal8/RbA at cf263d5, run from their source trees on the CPU (torch 2.14.1, no detectron2 build: an empty
``MultiScaleDeformableAttention`` module makes ``MSDeformAttn`` use its pure-PyTorch ``ms_deform_attn_core_pytorch``;
RbA's modeling package imported without its data package). For each config: ``cfg = get_cfg()``,
``add_deeplab_config(cfg)``, ``add_maskformer2_config(cfg)``, ``cfg.merge_from_file(CONFIG)``, ``MODEL.DEVICE cpu``,
``MODEL.WEIGHTS ""``; ``model = build_model(cfg).eval()``; its state-dict key list (names, shapes, dtypes) →
``sd = mask2former_ref.seeded_state_dict(keys, SEED)``; ``torch.save({"model": sd, "iteration": 0},
"model_final.pth")`` (with the state dict's module-version metadata) and ``cfg.dump()`` as ``config.yaml``; a second
``build_model(cfg)`` loaded with ``DetectionCheckpointer(model).load("model_final.pth")`` (checked equal to ``sd``) and
run on ``mask2former_ref.seeded_image(IMAGE_SEED, H, W)`` as ``model([{"image": CHW float RGB, "height": H,
"width": W}])``; recorded: the ``sem_seg_head`` outputs ``pred_logits`` / ``pred_masks`` (a forward hook),
``out[0]["sem_seg"]`` and RbA's score ``−tanh(sem_seg).sum(0)`` (RbA ``evaluate_ood.py``: ``get_RbA``), each as shape,
strided values and sums (:func:`mask2former_ref.summary`). Configs (seed, image seed, H × W):

* ``swin_tiny``: Mask2Former ``configs/cityscapes/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_90k.yaml``
  (0, 1, 250 × 500);
* ``r50``: Mask2Former ``configs/cityscapes/semantic-segmentation/maskformer2_R50_bs16_90k.yaml`` (1, 2, 150 × 270);
* ``swin_tiny_1dl``: RbA ``configs/cityscapes/semantic-segmentation/swin/single_decoder_layer/
  maskformer2_swin_tiny_bs16_90k_1dl.yaml``, 1 decoder layer and 1 feature level (2, 3, 256 × 480);
* ``rba_swin_b_1dl``: RbA ``ckpts/swin_b_1dl/config.yaml``, the released Swin-B model's config (3, 4, 128 × 256).

Here the same checkpoint is rebuilt from the key list and seed with torch only, converted by the CLI, loaded with
``create_model("mask2former", pretrained=OUT)``, and compared: class and mask logits of the network, and ``predict``'s
outputs through the scoring layer (``pixel_class_scores`` = ``sem_seg``, the ``rba`` scorer = RbA's score), each within
1e-4 of the reference relative to the largest reference magnitude (``atol = 1e-4 · max|ref|``, ``rtol = 1e-4``).
H × W not divisible by 32 (swin_tiny, r50) exercise the reference's zero padding and crop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mask2former_ref import load_fixture, seeded_image, seeded_state_dict

from oodseg.models import create_model
from oodseg.models.convert import main
from oodseg.scoring import create_scorer, pixel_class_scores


def _close(name: str, actual: torch.Tensor, expected: dict) -> float:
    """Compare ``actual`` with a fixture entry (shape, strided values, sums); returns the max relative error."""
    assert list(actual.shape) == expected["shape"], name
    sub = actual.double()[tuple(slice(None, None, s) for s in expected["step"])].flatten()
    ref = torch.tensor(expected["values"], dtype=torch.float64)
    scale = float(ref.abs().max())
    torch.testing.assert_close(sub, ref, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")
    total = float(actual.double().sum())
    assert abs(total - expected["sum"]) <= 1e-4 * expected["abs_sum"], name
    return float((sub - ref).abs().max()) / scale


@pytest.mark.parametrize("name", [
    "swin_tiny_1dl",
    pytest.param("swin_tiny", marks=pytest.mark.slow),
    pytest.param("r50", marks=pytest.mark.slow),
    pytest.param("rba_swin_b_1dl", marks=pytest.mark.slow),
])
def test_converted_checkpoint_matches_reference(name, tmp_path):
    fx = load_fixture(name)
    src = tmp_path / "d2"
    src.mkdir()
    (src / "config.yaml").write_text(fx["config_yaml"])
    torch.save({"model": seeded_state_dict(fx["keys"], fx["seed"]), "iteration": 0}, src / "model_final.pth")
    assert main(["--format", "detectron2-mask2former", str(src), str(tmp_path / "hf")]) == 0
    (src / "model_final.pth").unlink()
    model = create_model("mask2former", pretrained=str(tmp_path / "hf")).eval()
    im = fx["image"]
    img = seeded_image(im["seed"], im["height"], im["width"])[None]
    h, w, d = im["height"], im["width"], model.size_divisibility
    with torch.no_grad():
        raw = model(F.pad(model.preprocess(img), (0, -(-w // d) * d - w, 0, -(-h // d) * d - h)))
        out = model.predict(img)
    exp = fx["expected"]
    _close("class_logits", raw.class_logits, exp["class_logits"])
    _close("mask_logits", raw.mask_logits, exp["mask_logits"])
    _close("sem_seg", pixel_class_scores(out)[0], exp["sem_seg"])
    _close("rba", create_scorer("rba")(out)[0], exp["rba"])
