"""TDOS (tiny random CLIP on CPU): text path vs get_text_features, the 70 → 20 merge, each loss term against a direct
reference, the OOD augmentation, predict shapes, training steps, safetensors round trip, negative mining, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oodseg.models.tdos  # noqa: F401  (registers "tdos")
from oodseg.losses import tdos as L
from oodseg.models import CheckpointError, check_partition, create_model, save_safetensors
from oodseg.models.tdos import negatives as N
from oodseg.models.tdos.augment import adain_tokens, token_mask
from oodseg.models.tdos.clip import load_clip, load_tokenizer, text_features
from oodseg.models.tdos.merge import merge_queries, merge_score_map
from oodseg.models.tdos.model import TdosOutputs
from oodseg.models.tdos.text import CITYSCAPES_OOD_CLASSES, PromptTextEncoder, encode_embeddings
from oodseg.outputs import MaskOutputs
from oodseg.scoring import pixel_class_scores


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tdos", clip="tiny", window=128)


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(1)
    clip, _ = load_clip("tiny")
    return clip.eval(), load_tokenizer("tiny", clip)


def _target(b: int = 2, h: int = 64, w: int = 128) -> torch.Tensor:
    t = torch.zeros(b, h, w, dtype=torch.long)
    t[:, : h // 2] = 10  # sky
    t[:, h // 2 :, : w // 2] = 13  # car
    t[:, 40:56, 64:96] = 254  # pasted outlier
    t[:, :4] = 255
    return t


# ---------------------------------------------------------------------------------------------------- text side


def test_text_path_without_context_equals_get_text_features(tiny_clip):
    clip, tok = tiny_clip
    ids = tok(["road", "traffic light", "a clean origami of a bus"], 10)
    enc = PromptTextEncoder(clip, ids, tok.sot_id, tok.eot_id, n_ctx=0, n_negative=0, neg_len=1)
    ref = clip.get_text_features(input_ids=ids).pooler_output
    torch.testing.assert_close(enc(), ref, rtol=1e-5, atol=1e-6)


def test_context_and_negatives_receive_gradients_towers_do_not(model):
    model.zero_grad()
    model.text().square().sum().backward()
    assert model.text.ctx.grad is not None and model.text.ctx.grad.abs().sum() > 0
    assert model.text.neg.grad is not None and model.text.neg.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.clip.parameters())
    model.zero_grad()


def test_equal_token_counts_give_different_embeddings(model):
    tok = load_tokenizer("tiny", model.clip)
    assert tok(["road"]).shape == tok(["wall"]).shape  # both one word-token
    with torch.no_grad():
        emb = F.normalize(model.text(), dim=-1)
        assert float(emb[0] @ emb[3]) < 1 - 1e-4  # road vs wall
        # the release's pooling (EOT index not shifted by n_ctx) lands inside the shared context block: a collision
        x = model.text.token_embeddings()
        eot = model.text.eot[[0, 3]]
        released = encode_embeddings(model.clip, x[[0, 3]], eot)
    torch.testing.assert_close(released[0], released[1])


# ------------------------------------------------------------------------------------------------------ merging


def test_merge_queries_and_score_map_by_hand():
    cls = torch.arange(5 * 4, dtype=torch.float32).view(1, 5, 4)  # K=5 queries, C=3 classes + no-object
    masks = torch.tensor([1.0, 2.0, -1.0, 5.0, 0.5]).view(1, 5, 1, 1).expand(1, 5, 2, 2)
    mc, mm = merge_queries(cls, masks, 3)
    assert mc.shape == (1, 3, 4) and mm.shape == (1, 3, 2, 2)
    torch.testing.assert_close(mc[0, :2], cls[0, :2])
    torch.testing.assert_close(mc[0, 2], torch.tensor([12.0, 13.0, 14.0, 15.0]))  # mean of rows 2, 3, 4
    torch.testing.assert_close(mm[0, :, 0, 0], torch.tensor([1.0, 2.0, 5.0]))  # max of -1, 5, 0.5
    torch.testing.assert_close(merge_score_map(masks, 3)[0, :, 1, 1], torch.tensor([1.0, 2.0, 5.0]))


def test_per_pixel_scores_and_p_ood_against_numpy():
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(1, 70, 21, generator=g)
    masks = torch.randn(1, 70, 3, 2, generator=g)
    mc, mm = merge_queries(cls, masks, 20)
    got = pixel_class_scores(MaskOutputs(mc, mm, ood_channels=(19,)))
    c, m = cls.double().numpy()[0], masks.double().numpy()[0]
    mc_np = np.concatenate([c[:19], c[19:].mean(0, keepdims=True)])
    mm_np = np.concatenate([m[:19], m[19:].max(0, keepdims=True)])
    prob = np.exp(mc_np) / np.exp(mc_np).sum(-1, keepdims=True)
    ref = np.einsum("qc,qhw->chw", prob[:, :20], 1 / (1 + np.exp(-mm_np)))
    np.testing.assert_allclose(got[0].numpy(), ref, rtol=1e-5, atol=1e-6)
    p_ood = torch.softmax(got, dim=1)[0, 19].numpy()
    np.testing.assert_allclose(p_ood, np.exp(ref[19]) / np.exp(ref).sum(0), rtol=1e-5)


# -------------------------------------------------------------------------------------------------------- losses


def test_targets_identity_assignment_and_class_weights():
    t = torch.tensor([[[255, 255, 10, 10, 10, 10],
                       [13, 13, 254, 254, 10, 10],
                       [13, 13, 254, 255, 0, 0]]])
    tt = L.semantic_with_ood(t)
    assert int((tt == 19).sum()) == 3 and not bool((tt == 254).any()) and int((tt == 255).sum()) == 3
    labels, present = L.identity_targets(tt)
    expect = torch.full((20,), 20)
    expect[[0, 10, 13, 19]] = torch.tensor([0, 10, 13, 19])
    assert torch.equal(labels[0], expect) and torch.equal(present[0], expect < 20)
    om = torch.zeros_like(t)
    om[0, 0, 5] = 1
    with_mask = L.semantic_with_ood(t, om)
    assert with_mask[0, 0, 5] == 19 and int((with_mask == 19).sum()) == 1  # 254 not flagged → void
    assert int((with_mask == 255).sum()) == 6

    logits = torch.randn(2, 20, 21, generator=torch.Generator().manual_seed(0))
    lab = torch.randint(0, 21, (2, 20), generator=torch.Generator().manual_seed(1))
    w = torch.tensor([1.0] * 19 + [10.0, 0.1])
    num = den = 0.0
    for b in range(2):
        for q in range(20):
            y = int(lab[b, q])
            lp = logits[b, q].double() - torch.logsumexp(logits[b, q].double(), 0)
            num += float(w[y]) * -float(lp[y])
            den += float(w[y])
    assert math.isclose(float(L.class_loss(logits, lab, w)), num / den, rel_tol=1e-5)


def test_point_sampling_and_mask_losses_against_references():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 6, 7), generator=g)
    image, cls = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])
    coords = torch.rand(3, 50, 2, generator=g)
    masks = torch.stack([(target[i] == c).float() for i, c in zip(image.tolist(), cls.tolist(), strict=True)])
    torch.testing.assert_close(L.indicator_sample(target, image, cls, coords), L.point_sample(masks, coords))
    # point_sample at one point by hand: bilinear in pixel-centre coordinates
    x = torch.arange(12.0).view(1, 3, 4)
    v = L.point_sample(x, torch.tensor([[[0.5, 0.5]]]))  # centre: between pixels (1,1),(1,2) at x=1.5, y=1.0
    assert math.isclose(float(v), 5.5, rel_tol=1e-6)

    pred = torch.randn(3, 50, generator=g)
    tgt = L.point_sample(masks, coords)
    bce, dice = L.mask_point_losses(pred, tgt)
    p, t = torch.sigmoid(pred).double().numpy(), tgt.double().numpy()
    bce_ref = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
    dice_ref = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()
    assert math.isclose(float(bce), bce_ref, rel_tol=1e-5) and math.isclose(float(dice), dice_ref, rel_tol=1e-5)


def test_importance_points_pick_the_most_uncertain_candidates():
    logits = torch.linspace(-4, 4, 32).view(1, 1, 32).expand(2, 16, 32).contiguous()
    torch.manual_seed(3)
    pts = L.importance_points(logits, n_points=20, oversample=3.0, importance=0.75)
    torch.manual_seed(3)
    cand = torch.rand(2, 60, 2)
    unc = -L.point_sample(logits, cand).abs()
    best = torch.gather(cand, 1, unc.topk(15, dim=1).indices[..., None].expand(-1, -1, 2))
    assert pts.shape == (2, 20, 2) and bool(((pts >= 0) & (pts <= 1)).all())
    torch.testing.assert_close(pts[:, :15], best)


def test_pixel_text_and_textual_regulariser_against_references():
    g = torch.Generator().manual_seed(0)
    score = torch.randn(2, 20, 4, 8, generator=g)
    t = L.semantic_with_ood(_target(2, 16, 32))
    up = F.interpolate(score / 0.07, size=(16, 32), mode="bilinear", align_corners=False).double()
    lp = up - torch.logsumexp(up, 1, keepdim=True)
    valid = t != 255
    ref = -lp.gather(1, t.clamp(max=19)[:, None])[:, 0][valid].mean()
    assert math.isclose(float(L.pixel_text_loss(score, t, 0.07)), float(ref), rel_tol=1e-5)
    torch.manual_seed(0)
    est = float(L.pixel_text_loss(score, t, 0.07, n_pixels=20000))
    assert abs(est - float(ref)) < 0.03 * float(ref)

    text = torch.randn(3, 6, 5, generator=g)
    anchors = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    tn = F.normalize(text.double(), dim=-1).numpy()
    s = tn[:, :4] @ anchors.double().numpy().T  # [3, 4, 4]
    ref = np.mean([-(s[b, k, k] - np.log(np.exp(s[b, k]).sum())) for b in range(3) for k in range(4)])
    assert math.isclose(float(L.textual_regulariser(text, anchors)), ref, rel_tol=1e-5)


def test_tdos_loss_is_the_weighted_sum_of_its_terms():
    g = torch.Generator().manual_seed(0)
    preds = [(torch.randn(2, 20, 21, generator=g), torch.randn(2, 20, 8, 16, generator=g)) for _ in range(3)]
    out = TdosOutputs(class_logits=preds[-1][0], mask_logits=preds[-1][1],
                      aux_class_logits=(preds[0][0], preds[1][0]), aux_mask_logits=(preds[0][1], preds[1][1]),
                      score_map=torch.randn(2, 20, 2, 4, generator=g),
                      text_embeddings=torch.randn(2, 70, 16, generator=g),
                      reg_targets=F.normalize(torch.randn(20, 16, generator=g), dim=-1))
    target = _target(2, 32, 64)
    loss = L.TdosLoss(num_points=64)
    torch.manual_seed(0)
    total = float(loss(out, target))
    t = L.semantic_with_ood(target)
    labels, present = L.identity_targets(t)
    w = torch.tensor([1.0] * 19 + [10.0, 0.1])
    torch.manual_seed(0)
    ref = 0.0
    for c, m in preds:
        ref += 2.0 * float(L.class_loss(c, labels, w))
        image, cls = present.nonzero(as_tuple=True)
        coords = L.importance_points(m[image, cls], 64, 3.0, 0.75)
        pred, tgt = L.point_sample(m[image, cls], coords), L.indicator_sample(t, image, cls, coords)
        bce, dice = L.mask_point_losses(pred, tgt)
        ref += 5.0 * float(bce) + 5.0 * float(dice)
    ref += float(L.pixel_text_loss(out.score_map, t, 0.07)) + float(L.textual_regulariser(out.text_embeddings,
                                                                                          out.reg_targets))
    assert math.isclose(total, ref, rel_tol=1e-5)
    with pytest.raises(TypeError, match="TdosOutputs"):
        loss(MaskOutputs(preds[0][0], preds[0][1]), target)


# -------------------------------------------------------------------------------------------------- augmentation


def test_adain_changes_only_masked_tokens_towards_inlier_statistics():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 1 + 12, 4, generator=g) * 3 + 1
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 0] = True
    out = adain_tokens(hidden, mask, torch.tensor([True, False]), alpha=1.0, noise=0.0)
    torch.testing.assert_close(out[:, 0], hidden[:, 0])  # CLS
    torch.testing.assert_close(out[1], hidden[1])  # image not drawn
    keep = torch.cat([torch.ones(1, dtype=torch.bool), ~mask[0]])
    torch.testing.assert_close(out[0, keep], hidden[0, keep])
    moved, inl = out[0, 1:][mask[0]].double(), hidden[0, 1:][~mask[0]].double()
    # AdaIN with alpha 1: the mask tokens take the inlier statistics
    torch.testing.assert_close(moved.mean(0), inl.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moved.std(0, unbiased=False), inl.std(0, unbiased=False), rtol=1e-3, atol=1e-3)
    assert bool((out[0, 1:][mask[0]] != hidden[0, 1:][mask[0]]).all())
    tm = token_mask(torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0]]], dtype=torch.bool), 2)
    assert tm.tolist() == [[True, False]]


def test_released_cls_query_noise_is_a_no_op():
    """The release's ViT augmentation: attn(x_noisy_cls, x, x) on the mask tokens equals attn(x, x, x) (up to
    float64 rounding of the different kernel paths), while a noisy patch query does change its row."""
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(8, 2).double()
    x = torch.randn(1 + 9, 2, 8, dtype=torch.float64)
    noise = torch.zeros_like(x)
    noise[0] = torch.randn(2, 8, dtype=torch.float64)
    clean = attn(x, x, x)[0]
    torch.testing.assert_close(attn(x + noise, x, x)[0][1:], clean[1:], rtol=0, atol=1e-12)
    assert not torch.allclose(attn(x + noise.roll(1, 0), x, x)[0][1], clean[1])


def test_model_augmentation_acts_in_training_only():
    torch.manual_seed(0)
    m = create_model("tdos", clip="tiny", augment_prob=1.0, augment_alpha=1.0)
    x = torch.randn(2, 3, 64, 128)
    t = _target(2, 64, 128)
    m.train()
    feats = [m.vision(x)[2]]
    tokens = m._outlier_tokens(x, t, None)
    from oodseg.models.tdos.augment import OutlierTokenAugment

    feats.append(m.vision(x, OutlierTokenAugment(m.augment, tokens))[2])
    assert tokens.any() and not torch.allclose(feats[0], feats[1])
    m.eval()
    torch.testing.assert_close(m(x).mask_logits, m(x, target=t).mask_logits)


# ------------------------------------------------------------------------------------------------- model contract


def test_dense_embeddings_match_the_vision_model(model):
    x = torch.randn(1, 3, 64, 96)
    vm = model.clip.vision_model
    with torch.no_grad():
        ref = model.clip.visual_projection(vm.post_layernorm(vm(pixel_values=x, interpolate_pos_encoding=True)
                                                             .last_hidden_state))
        feats, glob, dense = model.vision(x)
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), ref[:, 1:])
    torch.testing.assert_close(glob, ref[:, 0])
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_predict_shapes_and_ood_channels(model):
    model.eval()
    images = torch.randint(0, 256, (2, 100, 150, 3), dtype=torch.uint8)
    out = model.predict(images)
    assert type(out) is MaskOutputs and out.ood_channels == (19,) and model.ood_channels == (19,)
    assert out.class_logits.shape == (4, 20, 21) and out.mask_logits.shape == (4, 20, 32, 32)
    assert out.frame_size == (128, 192) and out.size == (100, 150) and out.n_images == 2
    assert out.crops[:, 2].tolist() == [0, 64, 0, 64]
    assert pixel_class_scores(out).shape == (2, 20, 100, 150)
    assert model.output_kind == "mask" and not model.own_loss and model.num_classes == 20


def test_param_groups_partition_trainable_parameters():
    m = create_model("tdos", clip="tiny")
    groups = m.param_groups()
    check_partition(m, groups)
    assert groups["backbone"] == [] and groups["text"] == [] and len(groups["context"]) == 2
    assert not any(p.requires_grad for p in m.clip.parameters())
    assert {f"blocks.{i}" for i in range(4)} <= set(groups)
    unfrozen = create_model("tdos", clip="tiny", freeze_towers=False)
    check_partition(unfrozen, unfrozen.param_groups())
    assert unfrozen.param_groups()["backbone"] and unfrozen.param_groups()["text"]


@pytest.mark.slow  # trains
def test_training_steps_lower_the_loss_and_leave_towers_unchanged():
    torch.manual_seed(0)
    m = create_model("tdos", clip="tiny", augment="off", pixel_attn="global").train()
    loss_fn = L.TdosLoss(num_points=128)
    x, t = torch.randn(2, 3, 64, 128), _target(2, 64, 128)
    towers = {k: v.clone() for k, v in m.clip.state_dict().items()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    def evaluate() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return float(loss_fn(m(x, target=t), t))

    before = evaluate()
    for _ in range(8):
        opt.zero_grad()
        loss_fn(m(x, target=t), t).backward()
        opt.step()
    assert evaluate() < 0.9 * before
    assert all(torch.equal(v, m.clip.state_dict()[k]) for k, v in towers.items())


def test_safetensors_round_trip_with_negatives(tmp_path):
    words = [f"word{i}" for i in range(10)]
    torch.manual_seed(0)
    m = create_model("tdos", clip="tiny", negatives=[words[:5], words[5:]], n_negative=2).eval()
    assert m.reg_targets.shape == (22, 16) and m.reg_targets.abs().sum() > 0
    json.dumps(m.export_cfg())
    path = save_safetensors(m, tmp_path / "tdos.safetensors")
    m2 = create_model(checkpoint=path).eval()
    torch.testing.assert_close(m2.reg_targets, m.reg_targets)
    images = torch.randint(0, 256, (1, 64, 96, 3), dtype=torch.uint8)
    a, b = m.predict(images), m2.predict(images)
    torch.testing.assert_close(a.class_logits, b.class_logits)
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    with pytest.raises(CheckpointError, match="tdos.safetensors.*shape mismatch"):
        create_model(checkpoint=path, n_ctx=2)


# ------------------------------------------------------------------------------------------------ negative mining


def test_mining_orders_groups_by_distance():
    """Hand-made embeddings: word i has similarity cos(θ_i) to the only ID direction, so distance order = index."""
    words = [f"w{i}" for i in range(12)]
    angles = {w: 0.1 + 0.12 * i for i, w in enumerate(words)}

    def encode(prompts: list[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            w = p.split()[-1]
            a = angles.get(w, 0.0)  # ID prompts ("the nice road", …) lie on the x axis
            out.append([math.cos(a), math.sin(a)])
        return torch.tensor(out)

    cands = [(w, "noun") for w in reversed(words)]
    groups, scores = N.mine_negative_groups(cands, ["road", "sky"], encode, n_groups=3, keep=0.75)
    assert groups == [["w11", "w10", "w9"], ["w8", "w7", "w6"], ["w5", "w4", "w3"]]
    assert scores[0][0] == pytest.approx(math.cos(angles["w11"]))
    with pytest.raises(ValueError, match="my-words: 12 candidate words .* for 20 groups"):
        N.mine_negative_groups(cands, ["road"], encode, n_groups=20, source="my-words")


def test_wordnet_vocabulary_through_nltk(monkeypatch):
    import sys
    import types

    class FakeWordNet:
        @staticmethod
        def all_lemma_names(pos: str) -> list[str]:
            return {"n": ["ice_cream", "dog"], "a": ["blue"]}[pos]

    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = FakeWordNet()
    monkeypatch.setitem(sys.modules, "nltk", types.ModuleType("nltk"))
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)
    assert N.wordnet_vocabulary(["noun", "adj"]) == [("dog", "noun"), ("ice cream", "noun"), ("blue", "adj")]
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.delitem(sys.modules, "nltk.corpus")
    with pytest.raises(RuntimeError, match="--wordlist FILE"):
        N.wordnet_vocabulary(["noun"])


def test_cli_writes_groups_that_the_model_reads(tmp_path, tiny_clip, capsys):
    with pytest.raises(SystemExit) as e:
        N.main(["--help"])
    assert e.value.code == 0 and "--wordlist" in capsys.readouterr().out
    words = tmp_path / "words.txt"
    words.write_text("# vocabulary\n" + "\n".join(f"thing{i}" for i in range(30)) + "\nroad\n")
    out = tmp_path / "neg.json"
    assert N.main(["--clip", "tiny", "--wordlist", str(words), "--out", str(out), "--groups", "5", "--keep", "1"]) == 0
    data = json.loads(out.read_text())
    flat = [s for g in data["scores"] for s in g]
    assert len(data["groups"]) == 5 and all(len(g) == 6 for g in data["groups"]) and flat == sorted(flat)
    assert "road" not in {w for g in data["groups"] for w in g}
    # independent recomputation of one score with the same (seed-0) tiny CLIP: by default the words are adjectives
    # ("This is a {w} photo", TDOS's selection) scored by the 0.95 quantile of the ID similarities (NegLabel)
    torch.manual_seed(0)
    clip, _ = load_clip("tiny")
    tok = load_tokenizer("tiny", clip)
    idv = text_features(clip, tok, [N.ID_TEMPLATE.format(c) for c in CITYSCAPES_OOD_CLASSES[:-1]])
    w0 = text_features(clip, tok, [f"This is a {data['groups'][0][0]} photo"])
    sims = np.sort((w0 @ idv.T).double().numpy()[0])
    assert data["percentile"] == 0.95 and float(np.quantile(sims, 0.95)) == pytest.approx(flat[0], abs=1e-5)
    m = create_model("tdos", clip="tiny", negatives=str(out), n_negative=5)
    assert m.groups == data["groups"] and m.reg_targets.shape[0] == 25
    short = tmp_path / "short.txt"
    short.write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="short.txt: 3 candidate words"):
        N.main(["--clip", "tiny", "--wordlist", str(short), "--out", str(out), "--groups", "5"])


def test_local_clip_directory_with_its_own_tokenizer(tmp_path, monkeypatch):
    """A saved CLIPModel + CLIPTokenizer directory (byte-level vocabulary, no merges) loads offline; its tokenizer's
    ids pooled at the first EOT give get_text_features."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from oodseg.models.tdos.clip import TINY_TEXT, TINY_VISION

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path / "clip")
    text = {**TINY_TEXT, "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=16)).save_pretrained(
        tmp_path / "clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    small = {"dim": 32, "heads": 2, "decoder_layers": 1, "decoder_ffn": 32, "pixel_layers": 1, "pixel_ffn": 32,
             "context_width": 32, "context_heads": 2, "context_layers": 1, "n_negative": 2, "window": 64}
    m = create_model("tdos", clip=str(tmp_path / "clip"), **small).eval()
    assert m.text.ids[7, 0] == 512 and (m.text.ids[7] == 513).any()  # "traffic sign": SOT … EOT pad
    clip, tok = m.clip, load_tokenizer(str(tmp_path / "clip"), m.clip)
    ids = tok(["road", "traffic light", "a clean origami of a bus"], 16)
    enc = PromptTextEncoder(clip, ids, tok.sot_id, tok.eot_id, n_ctx=0, n_negative=0, neg_len=1)
    with torch.no_grad():
        torch.testing.assert_close(enc(), clip.get_text_features(input_ids=ids).pooler_output, rtol=1e-5, atol=1e-6)
        ref = F.normalize(clip.get_text_features(input_ids=tok(["a clean origami of a road"])).pooler_output, dim=-1)
    torch.testing.assert_close(m.reg_targets[:1], ref)
    assert m.predict(torch.zeros(1, 64, 64, 3, dtype=torch.uint8)).class_logits.shape == (1, 20, 21)


# ----------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(
        tmp_path / "vit")
    with pytest.raises(ValueError, match=r"vit.*model_type is 'vit', not 'clip'"):
        create_model("tdos", clip=str(tmp_path / "vit"))
    with pytest.raises(ValueError, match="class_names: expected .* got 19 names"):
        create_model("tdos", clip="tiny", class_names=CITYSCAPES_OOD_CLASSES[:-1])
    neg = tmp_path / "neg.json"
    N.write_groups(neg, [["a"], ["b"]], [[0.0], [0.1]])
    with pytest.raises(ValueError, match="neg.json: holds 2 word groups but the model has n_negative=50"):
        create_model("tdos", clip="tiny", negatives=str(neg))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a oodseg.tdos.negatives/1 file"):
        N.read_groups(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="class_token_ids"):
        create_model("tdos", clip=create_model("tdos", clip="tiny").clip.config.to_dict())
    with pytest.raises(TypeError, match="unknown option"):
        create_model("tdos", clip="tiny", n_queries=3)
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        create_model("tdos", clip="tiny")(torch.randn(1, 3, 40, 64))
