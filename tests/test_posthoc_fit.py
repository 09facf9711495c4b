"""Fit states merge exactly in any order, the feature contract of the models, and the post-hoc registrations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from oodseg.models import create_model
from oodseg.outputs import PixelLogits
from oodseg.platform.tuning.spaces import tune_space
from oodseg.scoring import (
    SCORERS,
    ScorerInputError,
    create_fit,
    create_scorer,
    default_scorers,
    fit_from_state,
    list_scorers,
    scorer_applies,
    scorer_space,
)

FITS = {"max_logit_stats": {}, "class_gaussians": {"num_classes": 4}, "feature_bank": {"num_classes": 4, "cap": 23},
        "activation_histogram": {}}


def batch(n: int = 5):
    """Per-image model outputs (logits, features not on the 2^-10 grid) and labels with void pixels."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, 4, 12, 10, generator=g) * 4
    feats = torch.relu(torch.randn(n, 6, 6, 5, generator=g) * 2) + torch.rand(n, 6, 6, 5, generator=g)
    labels = torch.randint(0, 4, (n, 12, 10), generator=g).to(torch.uint8)
    labels[:, :3] = 255
    return logits, feats, labels, [f"img{i}" for i in range(n)]


def fit(name: str, images: list[int]):
    logits, feats, labels, ids = batch()
    state = create_fit(name, **FITS[name])
    if images:
        state.update(PixelLogits(logits[images], features=feats[images]), labels[images], [ids[i] for i in images])
    return state


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["config"] == sb["config"] and sa["state"].keys() == sb["state"].keys()
    for key in sa["state"]:
        x, y = np.asarray(sa["state"][key]), np.asarray(sb["state"][key])
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), key


@pytest.mark.parametrize("name", list(FITS))
def test_fit_merged_from_shards_in_any_order_equals_one_pass(name):
    one_pass = fit(name, [0, 1, 2, 3, 4])
    shards = [[3], [0, 4], [], [2, 1]]
    for order in itertools.permutations(range(len(shards))):
        merged = fit(name, [])
        for i in order:
            merged.merge(fit(name, shards[i]))
        assert_same_state(merged, one_pass)
    tree = fit(name, [4]).merge(fit(name, [1, 3])).merge(fit(name, [0]).merge(fit(name, [2])))
    assert_same_state(tree, one_pass)
    assert_same_state(fit_from_state(name, one_pass.state_dict()), one_pass)


def test_fitted_parameters_match_numpy_on_the_rounded_values():
    logits, feats, _, _ = batch()
    stats = fit("max_logit_stats", [0, 1, 2, 3, 4])
    m, pred = logits.double().max(1)
    m = torch.round(m * 1024) / 1024  # the fit's documented rounding to 2^-10
    mean, std = stats.mean_std()
    for c in range(4):
        assert abs(mean[c] - m[pred == c].mean().item()) < 1e-9
        assert abs(std[c] - m[pred == c].std().item()) < 1e-9
    q = torch.round(feats.double() * 1024) / 1024
    assert abs(fit("activation_histogram", [0, 1, 2, 3, 4]).threshold(90.0) - np.percentile(q.numpy(), 90)) < 1e-12


def test_feature_bank_is_capped_seeded_and_a_subset():
    full = create_fit("feature_bank", num_classes=4, cap=10**6)
    logits, feats, labels, ids = batch()
    full.update(PixelLogits(logits, features=feats), labels, ids)
    small = fit("feature_bank", [0, 1, 2, 3, 4])
    assert len(small.keys) == 23 < len(full.keys) == int((labels[:, ::2, ::2] != 255).sum())
    assert set(small.keys.tolist()) <= set(full.keys.tolist())
    assert np.array_equal(small.keys, np.sort(full.keys)[:23])  # the 23 smallest seeded keys
    other = create_fit("feature_bank", num_classes=4, cap=23, seed=1).update(
        PixelLogits(logits, features=feats), labels, ids)
    assert not np.array_equal(other.pixels, small.pixels)
    with pytest.raises(ValueError, match="config"):
        small.merge(other)


@pytest.mark.parametrize("arch,cfg", [("erfnet", {"width": 0.25, "input_size": None}),
                                      ("timm_seg", {"backbone": "convnext_atto", "decoder_channels": 16})])
def test_models_expose_features_from_the_same_pass(arch, cfg):
    torch.manual_seed(0)
    model = create_model(arch, **cfg).eval()
    images = torch.randint(0, 256, (2, 36, 44, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    plain, with_f = model.predict(images), model.predict(images, features=True)
    assert plain.features is None and with_f.features is not None
    assert torch.equal(plain.logits, with_f.logits) and with_f.size == (36, 44)
    with torch.no_grad():
        again = model.classify(with_f.features, tuple(plain.logits.shape[-2:]))
    if arch == "erfnet":  # a 2×2 stride-2 head: cropping the features crops the logits exactly
        torch.testing.assert_close(again, plain.logits, rtol=0, atol=0)
    else:  # the bilinear upsampling of cropped features differs only at the last rows / columns
        torch.testing.assert_close(again[..., :32, :32], plain.logits[..., :32, :32], rtol=1e-5, atol=1e-5)


def test_registrations_and_errors():
    assert {"sml", "mahalanobis", "knn", "react", "gen", "odin", "energy_blur"} <= set(list_scorers())
    assert {"sml", "mahalanobis", "knn", "react", "odin"}.isdisjoint(default_scorers())
    assert {"gen", "energy_blur", "msp"} <= set(default_scorers())
    for name in ("sml", "mahalanobis", "knn", "react", "gen", "odin", "energy_blur"):  # Tune accepts every space
        assert set(tune_space(scorer_space(name))) == set(scorer_space(name))
    assert SCORERS.meta("knn")["fit"] == "feature_bank" and "network" in SCORERS.meta("odin")["needs"]
    assert not scorer_applies("react", (), kind="mask") and not scorer_applies("odin", (), kind="mask")
    assert scorer_applies("sml", (), kind="mask") and not scorer_applies("knn", (), features=False)
    out = PixelLogits(torch.randn(1, 4, 6, 5))
    with pytest.raises(ScorerInputError, match="needs a fit"):
        create_scorer("sml")(out)
    with pytest.raises(ScorerInputError, match="features=True"):
        create_scorer("knn", fit=fit("feature_bank", [0]))(out)
    with pytest.raises(ScorerInputError, match="model= and images="):
        create_scorer("odin")(out)
    with pytest.raises(TypeError, match="unknown parameters"):
        create_scorer("gen", alpha=1.0)


def test_eomt_features_are_the_last_layers_mask_embeddings_and_feed_the_feature_scorers():
    tiny = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
            "num_queries": 6, "num_blocks": 1, "num_register_tokens": 1, "num_labels": 4, "mlp_ratio": 2}
    torch.manual_seed(0)
    model = create_model("eomt", config=tiny, window_batch=1).eval()
    images = torch.randint(0, 256, (2, 32, 48, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    plain, out = model.predict(images), model.predict(images, features=True)
    assert plain.features is None and out.features.shape == (4, 32, 16, 16)  # 2 windows per image, 4× the grid
    assert torch.equal(plain.mask_logits, out.mask_logits) and torch.equal(plain.class_logits, out.class_logits)
    hf = model.hf  # the embeddings recomputed from the last hidden state through transformers' own modules
    x = model.preprocess(images)[:, :, :, :32]
    with torch.no_grad():
        last = hf(pixel_values=x).last_hidden_state
        tokens = last[:, 6 + hf.embeddings.num_prefix_tokens :].transpose(1, 2).reshape(2, 32, 4, 4)
        torch.testing.assert_close(out.features[[0, 2]], hf.upscale_block(tokens))
    labels = torch.randint(0, 4, (2, 32, 48), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    for scorer, name in (("mahalanobis", "class_gaussians"), ("knn", "feature_bank"), ("sml", "max_logit_stats")):
        cfg = {} if name == "max_logit_stats" else {"num_classes": 4}
        state = create_fit(name, **cfg).update(out, labels, ["a", "b"])
        maps = create_scorer(scorer, fit=state)(out)
        assert maps.shape == (2, 32, 48) and bool(torch.isfinite(maps).all())
    bank = create_fit("feature_bank", num_classes=4).update(out, labels, ["a", "b"])
    assert len(bank.keys) == 4 * 256 and len(set(bank.images.tolist())) == 4  # one hash key per window
