"""The contract every registered entry keeps, checked for each name its registry lists (timm's ``test_models.py``
style): a new model, scorer, loss, dataset or prompter gets these tests by being registered. A new model must add
its small test configuration to :data:`TINY` (the test says so when it is missing).

* model: builds, ``predict`` on uint8 images gives its declared output kind at the images' size (a model reading files
  of its own per image, ``reads_sources``, gets their sources: ``tests/fixtures/precomputed``), the training forward
  gives finite float outputs (models with a network);
* scorer: on every output kind it applies to, a finite float map ``[B, H, W]`` per image;
* loss: on every model it is made for, a finite scalar whose gradient reaches the model;
* dataset: a sample of the synthetic suite in the reader's layout is a uint8 ``[H, W, 3]`` image with a uint8 label of
  the same size in the label convention of its kind;
* prompter: boxes inside the frame from a score map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oodseg.data import DataError, create_dataset, dataset_info, list_datasets
from oodseg.losses import create_loss, list_losses, loss_info
from oodseg.models import ImageSource, create_model, list_models
from oodseg.outputs import MaskOutputs, PixelLogits, ScoreMaps
from oodseg.refine import ScoreCalibration, create_prompter, list_prompters
from oodseg.scoring import SCORERS, create_fit, create_scorer, list_scorers, scorer_applies

#: registered model → a small configuration (seconds on a CPU)
TINY = {
    "erfnet": {"channels": [4, 8, 16], "input_size": None},
    "eomt": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64,
                        "patch_size": 16, "num_queries": 6, "num_blocks": 1, "num_labels": 19}},
    "timm_seg": {"backbone": "test_resnet", "decoder_channels": 16},
    "tdos": {"clip": "tiny", "window": 64},
    "mask2former": {"backbone": "tiny"},
    "precomputed": {"folder": str(Path(__file__).parent / "fixtures" / "precomputed")},
}
KIND = {"pixel": PixelLogits, "mask": MaskOutputs, "score": ScoreMaps}
EXAMPLE = {"pixel": "erfnet", "mask": "mask2former"}  # a model of each output kind
IMAGES = torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
CROPS = IMAGES[:, :, :64].contiguous()  # square training crops: the window size of the ViT models' tiny configs


def tiny(name: str, **extra) -> torch.nn.Module:
    assert name in TINY, f"registered model {name!r} has no small test configuration: add it to TINY"
    torch.manual_seed(0)
    return create_model(name, **{**TINY[name], **extra})


@pytest.mark.parametrize("name", list_models())
def test_model_contract(name):
    model = tiny(name).eval()
    sources = [ImageSource("contract", str(i), f"img{i}.png") for i in range(len(IMAGES))]
    with torch.inference_mode():
        out = model.predict(IMAGES, **({"sources": sources} if model.reads_sources else {}))
    assert isinstance(out, KIND[model.output_kind]) and out.size == tuple(IMAGES.shape[1:3])
    if model.reads_sources:  # saved maps: no network to train
        return
    train_out = model.train()(model.preprocess(CROPS))
    train_out = train_out[0] if isinstance(train_out, tuple) else train_out
    for t in (getattr(train_out, f, None) for f in ("logits", "class_logits", "mask_logits")):
        assert t is None or (t.is_floating_point() and torch.isfinite(t).all())


def outputs_of(kind: str, ood: tuple[int, ...] = ()) -> PixelLogits | MaskOutputs | ScoreMaps:
    g = torch.Generator().manual_seed(1)
    c = 19 + len(ood)
    if kind == "score":
        return ScoreMaps(torch.randn(2, 32, 48, generator=g), size=(32, 48))
    if kind == "pixel":
        return PixelLogits(torch.randn(2, c, 16, 24, generator=g), size=(32, 48), ood_channels=ood)
    return MaskOutputs(torch.randn(2, 5, c + 1, generator=g), torch.randn(2, 5, 16, 24, generator=g), size=(32, 48),
                       ood_channels=ood)


@pytest.mark.parametrize("kind", ["pixel", "mask", "score"])
@pytest.mark.parametrize("name", list_scorers())
def test_scorer_contract(name, kind):
    meta = SCORERS.meta(name)
    if kind not in meta["kinds"]:
        pytest.skip(f"{name} does not read {kind} outputs")
    if meta["fit"] or meta["needs"]:
        return posthoc_contract(name, kind)
    ood = () if scorer_applies(name, ()) else (19,)
    score = create_scorer(name)(outputs_of(kind, ood), size=(32, 48))
    assert score.shape == (2, 32, 48) and score.is_floating_point() and torch.isfinite(score).all()


def posthoc_contract(name: str, kind: str) -> None:
    """A scorer that learns from training data or runs the network: on the example model of each kind it applies
    to, fitted on one batch (``predict(features=True)`` when the model exposes features), given model and images."""
    model = tiny(EXAMPLE[kind]).eval()
    if not scorer_applies(name, model.ood_channels, kind, model.has_features):
        pytest.skip(f"{name} does not apply to {EXAMPLE[kind]}")
    with torch.inference_mode():
        out = model.predict(IMAGES, **({"features": True} if model.has_features else {}))
    fit_name = SCORERS.meta(name)["fit"]
    fit = None
    if fit_name:
        labels = torch.randint(0, 19, IMAGES.shape[:3], generator=torch.Generator().manual_seed(3)).to(torch.uint8)
        fit = create_fit(fit_name).update(out, labels, ["a", "b"])
    score = create_scorer(name, fit=fit)(out, size=(32, 48), model=model, images=IMAGES)
    assert score.shape == (2, 32, 48) and score.is_floating_point() and torch.isfinite(score).all()


@pytest.mark.parametrize("name", list_losses())
def test_loss_contract(name):
    info = loss_info(name)
    for model_name in info.models or [EXAMPLE[k] for k in info.kinds]:
        model = tiny(model_name, **info.model_cfg).train()
        out = model(model.preprocess(CROPS))
        out = out[0] if isinstance(out, tuple) else out
        target = torch.randint(0, 19, (2, 64, 64), generator=torch.Generator().manual_seed(2))
        outlier = torch.zeros(2, 64, 64, dtype=torch.bool)
        outlier[:, 10:20, 10:30] = True
        loss = create_loss(name)(out, target, outlier)
        assert loss.ndim == 0 and torch.isfinite(loss), (name, model_name)
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), (name, model_name)


@pytest.mark.parametrize("name", [n for n in list_datasets() if n != "folder"])
def test_dataset_contract(name, tiny_suite):
    try:
        ds = create_dataset(name, root=str(tiny_suite))
    except DataError:  # the SMIYC release layouts: tests/test_data_readers.py writes and reads them
        pytest.skip(f"the synthetic suite does not write {name}'s layout")
    sample = ds.load(ds.samples[0])
    image, label = sample["image"], np.asarray(sample["label"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert label.dtype == np.uint8 and label.shape == image.shape[:2]
    allowed = {0, 1, 255} if dataset_info(name).kind == "anomaly" else set(range(19)) | {255}
    assert set(np.unique(label).tolist()) <= allowed


def prompter_args(name: str) -> dict:
    """What a prompter needs besides its defaults: the detector prompter a (random, tiny) detector."""
    if name == "detector":
        from oodseg.models.detector import build_detector

        torch.manual_seed(0)
        return {"detector": build_detector(backbone="tiny", min_size=64, max_size=96, score_thresh=0.0).eval()}
    return {}


@pytest.mark.parametrize("name", list_prompters())
def test_prompter_contract(name):
    score = np.zeros((64, 96), np.float32)
    score[10:20, 30:50] = 1.0
    boxes = create_prompter(name, **prompter_args(name))(score, calibration=ScoreCalibration(0.5, 0.0, 1.0))
    xyxy = boxes.xyxy.numpy()
    assert boxes.scores.dtype == torch.float32 and len(xyxy) == len(boxes.scores)
    assert (xyxy[:, 0] >= 0).all() and (xyxy[:, 2] <= 96).all() and (xyxy[:, 1] >= 0).all() and (xyxy[:, 3] <= 64).all()
    assert name != "components" or len(xyxy) == 1  # the one component
