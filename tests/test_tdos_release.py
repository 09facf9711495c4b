"""TDOS as released: the test protocol (keep-ratio resize, 512/341 windows, probabilities upsampled before the
softmax), the per-benchmark OOD class weight, the context decoder's bias-free q/k/v, the base preset's pixel FFN and
NegLabel's per-part-of-speech selection. Expected layouts are transcribed by hand from mmseg's ``slide_inference``
loop and mmcv's ``rescale_size`` (``song1248/TextDrivenOODSegmentation``), not computed by the code under test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import oodseg.models.tdos  # noqa: F401  (registers "tdos")
from oodseg.losses.tdos import RELEASE_OOD_WEIGHTS, TdosLoss
from oodseg.models import create_model
from oodseg.models.tdos import negatives as N
from oodseg.models.tdos.decoder import PixelDecoder
from oodseg.models.tdos.merge import merge_queries
from oodseg.models.tdos.model import PRESETS, _resolve
from oodseg.models.tdos.release import keep_ratio_size, slide_windows
from oodseg.models.tdos.text import ContextAttention, ContextDecoder
from oodseg.scoring import create_scorer


@pytest.mark.parametrize(("hw", "scale", "frame"), [
    ((1024, 2048), (2048, 1024), (1024, 2048)),  # Fishyscapes / Cityscapes: unchanged
    ((720, 1280), (512, 512), (288, 512)),  # Road Anomaly: s = min(512/1280, 512/720) = 0.4
    ((1024, 2048), (1280, 720), (640, 1280)),  # SMIYC-AT 2048×1024 frames: s = min(0.625, 0.703)
    ((1080, 1920), (1280, 720), (720, 1280)),  # SMIYC-AT 1920×1080 frames: s = 2/3
    ((1080, 1920), (1920, 1080), (1080, 1920)),  # SMIYC-OT: unchanged
    ((333, 500), (2048, 1024), (1024, 1538)),  # upscaling: s = min(4.096, 3.075), int(500·s + 0.5) = 1538
])
def test_keep_ratio_resize_as_mmcv(hw, scale, frame):
    assert keep_ratio_size(*hw, scale) == frame


def test_release_window_layouts():
    # 2048×1024: 3 rows (0, 341, 1024−512) × 6 columns (0, 341, 682, 1023, 1364, 2048−512)
    wins = slide_windows(1024, 2048, 512, 341)
    assert len(wins) == 18 and {w[2:] for w in wins} == {(512, 512)}
    assert sorted({w[0] for w in wins}) == [0, 341, 512]
    assert sorted({w[1] for w in wins}) == [0, 341, 682, 1023, 1364, 1536]
    # SMIYC-AT at 1280×720: 2 × 4 windows (rows 0, 208; columns 0, 341, 682, 768)
    wins = slide_windows(720, 1280, 512, 341)
    assert sorted({w[0] for w in wins}) == [0, 208] and sorted({w[1] for w in wins}) == [0, 341, 682, 768]
    assert len(wins) == 8
    # Road Anomaly at 512×288: one window of the frame's own height
    assert slide_windows(288, 512, 512, 341) == [(0, 0, 288, 512)]
    for h, w in [(1024, 2048), (720, 1280), (288, 512), (1080, 1920)]:
        cover = torch.zeros(h, w)
        for top, left, wh, ww in slide_windows(h, w, 512, 341):
            cover[top : top + wh, left : left + ww] += 1
        assert bool((cover > 0).all())
    with pytest.raises(ValueError, match="stride"):
        slide_windows(100, 100, 64, 65)


def test_model_uses_the_release_layout_per_benchmark():
    m = create_model("tdos", clip="tiny", window=512, protocol="release", test_scale="fs_lost_found")
    frame, wins = m.frame_and_windows(1024, 2048)
    assert frame == (1024, 2048) and len(wins) == 18 and m.cfg.test_scale == (2048, 1024)
    m = create_model("tdos", clip="tiny", window=512, protocol="release", test_scale="road_anomaly")
    assert m.frame_and_windows(720, 1280) == ((288, 512), [(0, 0, 288, 512)])
    m = create_model("tdos", clip="tiny", window=512, protocol="release", test_scale="road_anomaly_21")
    frame, wins = m.frame_and_windows(1080, 1920)
    assert frame == (720, 1280) and len(wins) == 8
    assert m.export_cfg()["test_scale"] == (1280, 720) and m.export_cfg()["protocol"] == "release"
    with pytest.raises(ValueError, match="test_scale 'mars'"):
        create_model("tdos", clip="tiny", protocol="release", test_scale="mars")
    with pytest.raises(ValueError, match="protocol"):
        create_model("tdos", clip="tiny", protocol="slide")


def test_release_predict_equals_the_release_pipeline():
    """A tiny model, a 50×90 image, test_scale (120, 60) → frame 60×108 (s = 1.2), window 64 / stride 42 → three
    60×64 windows (left 0, 42, 44), each padded to 64×64. Reference: the release's order written out here — per window
    ``seg = Σ_q softmax(cls_q)[:20]·sigmoid(mask_q)`` at the mask resolution, bilinear to the window, windows
    averaged, bilinear to the image, softmax over the 20 channels, channel 19 (``ood``)."""
    from torchvision.transforms.v2 import functional as tvF

    torch.manual_seed(0)
    m = create_model("tdos", clip="tiny", window=64, protocol="release", test_scale=[120, 60]).eval()
    image = torch.randint(0, 256, (1, 50, 90, 3), dtype=torch.uint8)
    out = m.predict(image)
    assert out.frame_size == (60, 108) and out.size == (50, 90)
    assert out.crops.tolist() == [[0, 0, 0, 60, 64], [0, 0, 42, 60, 64], [0, 0, 44, 60, 64]]
    assert tuple(out.mask_logits.shape) == (3, 20, 60, 64) and bool(out.mask_logits.isfinite().all())
    got = create_scorer("p_ood")(out)

    x8 = tvF.resize(image.permute(0, 3, 1, 2), [60, 108], interpolation=tvF.InterpolationMode.BILINEAR,
                    antialias=False)
    x = m._normalise(x8)
    frame, count = torch.zeros(1, 20, 60, 108), torch.zeros(1, 1, 60, 108)
    with torch.no_grad():
        for left in (0, 42, 44):
            crop = F.pad(x[:, :, :, left : left + 64], (0, 0, 0, 4))  # 60 → 64 rows, zeros after normalisation
            c, mk, _, _ = m._run(crop)
            c, mk = merge_queries(c[-1], mk[-1], 20)
            seg = torch.einsum("bqc,bqhw->bchw", c.softmax(-1)[..., :20], mk.sigmoid())
            seg = F.interpolate(seg, size=(64, 64), mode="bilinear", align_corners=False)[..., :60, :]
            frame[..., left : left + 64] += seg
            count[..., left : left + 64] += 1
    ref = F.softmax(F.interpolate(frame / count, size=(50, 90), mode="bilinear", align_corners=False), dim=1)[:, 19]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_default_protocol_is_unchanged_by_the_option():
    torch.manual_seed(0)
    m = create_model("tdos", clip="tiny", window=64).eval()
    out = m.predict(torch.randint(0, 256, (1, 50, 90, 3), dtype=torch.uint8))
    assert m.cfg.protocol == "windows" and out.frame_size == (64, 115) and tuple(out.mask_logits.shape[-2:]) == (16, 16)


def test_ood_class_weight_per_benchmark():
    assert TdosLoss().class_weights[19] == 10.0  # our default: the Cityscapes config's value
    for name, weight in {"cityscapes": 10, "road_anomaly_21": 10, "fs_lost_found": 4, "fs_static": 4,
                         "road_anomaly": 4, "road_obstacle_21": 4}.items():
        w = TdosLoss(ood_weight=name).class_weights
        assert w[19] == weight == RELEASE_OOD_WEIGHTS[name] and w[:19].eq(1).all() and w[20] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="ood_weight 'mars'"):
        TdosLoss(ood_weight="mars")


def test_base_preset_pixel_ffn_is_the_release_2048():
    cfg = _resolve("openai/clip-vit-base-patch16", {})
    assert cfg is PRESETS["base"] or cfg == PRESETS["base"]
    assert (cfg.pixel_ffn, cfg.decoder_ffn, cfg.pixel_layers, cfg.decoder_layers) == (2048, 2048, 6, 9)
    dec = PixelDecoder(768, cfg.dim, cfg.heads, 1, cfg.pixel_ffn, 512, 70)
    assert dec.layers[0].ffn[0].out_features == 2048


def test_context_attention_has_no_qkv_bias_and_matches_the_release_formula():
    torch.manual_seed(0)
    att = ContextAttention(8, 2)
    assert att.q_proj.bias is None and att.k_proj.bias is None and att.v_proj.bias is None
    assert att.proj.bias is not None
    names = {n for n, _ in ContextDecoder(16, 8, 2, 1, 0.0).named_parameters()}
    assert not any("in_proj" in n or (n.endswith("_proj.bias") and "layers" in n) for n in names)
    q, kv = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    # the release's Attention.forward: per-head einsum, scale d_head^-½, softmax over keys, output projection
    qh = att.q_proj(q).reshape(3, 5, 2, 4)
    kh = att.k_proj(kv).reshape(3, 7, 2, 4)
    vh = att.v_proj(kv).reshape(3, 7, 2, 4)
    a = (torch.einsum("bnkc,bmkc->bknm", qh, kh) * 4 ** -0.5).softmax(-1)
    ref = att.proj(torch.einsum("bknm,bmkc->bnkc", a, vh).reshape(3, 5, 8))
    torch.testing.assert_close(att(q, kv, kv), ref)


def test_negative_mining_ranks_each_part_of_speech_apart():
    """Hand-made embeddings: each word sits at angle θ from the only ID direction (similarity cos θ). NegLabel ranks
    nouns among nouns and adjectives among adjectives, keeps ``keep`` of each, and lists nouns first."""
    angles = {"n0": 1.5, "n1": 1.0, "n2": 0.5, "n3": 0.2, "a0": 1.4, "a1": 1.2, "a2": 0.3, "a3": 0.1}

    def encode(prompts: list[str]) -> torch.Tensor:
        rows = []
        for p in prompts:
            w = next((w for w in angles if f" {w} " in f" {p} "), None)
            a = angles.get(w, 0.0)
            rows.append([math.cos(a), math.sin(a)])
        return torch.tensor(rows)

    cands = [(w, "adj" if w.startswith("a") else "noun") for w in angles]
    groups, _ = N.mine_negative_groups(cands, ["road"], encode, n_groups=2, keep=0.5)
    # joint ranking would give n0, a0, a1, n1; per part of speech: nouns n0, n1 then adjectives a0, a1
    assert groups == [["n0", "n1"], ["a0", "a1"]]
    adj_only = [c for c in cands if c[1] == "adj"]
    assert N.mine_negative_groups(adj_only, ["road"], encode, n_groups=2, keep=0.5)[0] == [["a0"], ["a1"]]


def test_negative_mining_defaults_are_neglabels():
    import inspect

    sig = inspect.signature(N.mine_negative_groups)
    assert sig.parameters["percentile"].default == 0.95 and sig.parameters["keep"].default == 0.15
    args = N._parser().parse_args(["--wordnet", "--out", "x.json"])
    assert (args.pos, args.percentile, args.keep, args.groups) == ("adj", 0.95, 0.15, 50)
    # the 0.95 quantile (linear interpolation, torch.quantile) of the similarities to 21 ID classes, by hand
    sims = torch.linspace(-1, 1, 21)[None]
    assert float(N.similarity_scores(torch.eye(21), sims, 0.95)) == pytest.approx(-1 + 2 * 0.95, abs=1e-6)


def test_tdos_released_config_parses_and_dry_checks(tmp_path):
    """configs/tdos_released.yaml with the hub CLIP replaced by the tiny random one and scratch paths: it parses into
    the fine-tuning job's config, passes the job's pre-Ray validation, and the model and loss it names build with the
    release's FS L&F protocol (test scale 2048×1024, 512/341 windows) and OOD weight 4."""
    from pathlib import Path

    from oodseg.config import parse_config
    from oodseg.losses import create_loss
    from oodseg.platform.jobs.finetune import validate
    from oodseg.platform.trainer import FinetuneConfig, resolve_data

    neg = tmp_path / "neg.json"
    N.write_groups(neg, [[f"w{g}{i}" for i in range(3)] for g in range(50)], [[0.0] * 3] * 50)
    config = Path(__file__).resolve().parents[1] / "configs" / "tdos_released.yaml"
    cfg = parse_config(FinetuneConfig, ["--config", str(config), "--set", f"storage_path={tmp_path / 'runs'}",
                                        "--set", f"train.data_root={tmp_path}", "--set", "train.coco_root=null",
                                        "--set", "train.model_cfg.clip=tiny", "--set", f"train.model_cfg.negatives={neg}",
                                        "--set", "use_gpu=false"])
    tc = cfg.train
    assert (tc.lr, tc.weight_decay, tc.schedule, tc.warmup, tc.steps, tuple(tc.crop)) == (
        1e-4, 1e-5, "poly", 1500, 20000, (512, 512))
    cfg = resolve_data(cfg, tmp_path / "cache")  # what the job does before validating: init 'scratch' → None
    assert cfg.train.init is None
    validate(cfg)
    model = create_model(tc.model, **{**tc.model_cfg, "window": 512})
    assert model.cfg.protocol == "release" and model.cfg.test_scale == (2048, 1024) and len(model.groups) == 50
    assert len(model.frame_and_windows(1024, 2048)[1]) == 18
    assert create_loss(tc.loss, **tc.loss_cfg).class_weights[19] == 4.0
