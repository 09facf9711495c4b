"""Scorers vs hand-written numpy references, for both output kinds, both placements and several temperatures."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

import oodseg.scoring.scorers as scorers_mod
from oodseg.outputs import MaskOutputs, PixelLogits
from oodseg.scoring import (
    SCORERS,
    create_scorer,
    default_scorers,
    list_scorers,
    pixel_class_scores,
    register_scorer,
    score_many,
    scorer_applies,
    scorer_space,
)
from oodseg.scoring.context import SharedStats

TEMPERATURES = [0.1, 0.5, 1.0, 3.0]
NAMES = ["msp", "maxlogit", "maxentropy", "energy", "rba", "eim"]


# ---------------------------------------------------------------- numpy references (float64) -------------------
def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_score(name: str, z: np.ndarray, t_pl: float) -> np.ndarray:
    """Reference formulas over z [B,C,H,W] (already divided by the pixel-level temperature t_pl)."""
    if name == "msp":
        return 1.0 - np_softmax(z, 1).max(1)
    if name in ("maxlogit", "eim"):
        return -z.max(1)
    if name == "maxentropy":
        p = np_softmax(z, 1)
        return -(p * np.log(p)).sum(1)
    if name == "energy":
        m = z.max(1)
        return -t_pl * (m + np.log(np.exp(z - m[:, None]).sum(1)))
    if name == "rba":
        return -np.tanh(z).sum(1)
    raise AssertionError(name)


def np_mask_scores(cls: np.ndarray, masks: np.ndarray, t_cl: float) -> np.ndarray:
    """L[n,c,h,w] = Σ_q softmax(cls[n,q]/T)[c] · sigmoid(masks[n,q,h,w]), no-object dropped after the softmax."""
    p = np_softmax(cls / t_cl, -1)[..., :-1]
    sig = 1 / (1 + np.exp(-masks))
    out = np.zeros((cls.shape[0], p.shape[-1]) + masks.shape[-2:])
    for n in range(cls.shape[0]):
        for q in range(cls.shape[1]):
            for c in range(p.shape[-1]):
                out[n, c] += p[n, q, c] * sig[n, q]
    return out


def np_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes with half-pixel centres (PyTorch align_corners=False)."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        w = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            f = src - i0
            w[o, i0] += 1 - f
            w[o, i1] += f
        return w

    wh, ww = weights(x.shape[-2], size[0]), weights(x.shape[-1], size[1])
    return np.einsum("oh,...hw,pw->...op", wh, x, ww)


@pytest.fixture
def pixel_logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 4, 6, generator=g) * 3


@pytest.fixture
def mask_out() -> MaskOutputs:
    g = torch.Generator().manual_seed(1)
    return MaskOutputs(torch.randn(2, 7, 6, generator=g) * 2, torch.randn(2, 7, 5, 4, generator=g) * 3)


# ---------------------------------------------------------------- registry / API ----------------------------
def test_all_scorers_registered_and_spaces_are_plain_dicts():
    assert set(NAMES) <= set(list_scorers())
    for name in NAMES:
        space = scorer_space(name)
        assert space["temperature"] == {"type": "loguniform", "low": 0.05, "high": 20.0}
        space["temperature"]["low"] = 99.0  # a copy: mutating it must not change the registry
        assert scorer_space(name)["temperature"]["low"] == 0.05


def test_scorer_attributes_and_bad_arguments():
    s = create_scorer("energy", temperature=2.5, placement="pl")
    assert (s.name, s.temperature, s.placement) == ("energy", 2.5, "pl")
    with pytest.raises(KeyError, match="unknown scorer 'nope'"):
        create_scorer("nope")
    with pytest.raises(ValueError, match="placement"):
        create_scorer("msp", placement="xx")
    with pytest.raises(ValueError, match="temperature"):
        create_scorer("msp", temperature=0.0)
    with pytest.raises(TypeError, match="unknown parameters"):
        create_scorer("msp", alpha=1.0)
    with pytest.raises(TypeError, match="Tensor, PixelLogits or MaskOutputs"):
        create_scorer("msp")(np.zeros((1, 2, 3, 3)))


def test_new_scorer_is_one_function_plus_registration(pixel_logits):
    @register_scorer("test_top2_margin", space={"temperature": {"type": "choice", "values": [1.0]}})
    def top2_margin(z: torch.Tensor, temperature: float, k: int = 2) -> torch.Tensor:
        top = z.topk(k, dim=1).values
        return top[:, -1] - top[:, 0]

    try:
        assert "test_top2_margin" in list_scorers()
        assert scorer_space("test_top2_margin") == {"temperature": {"type": "choice", "values": [1.0]}}
        out = create_scorer("test_top2_margin", k=3)(pixel_logits).numpy()
        srt = np.sort(pixel_logits.numpy(), axis=1)
        np.testing.assert_allclose(out, srt[:, -3] - srt[:, -1], rtol=1e-6)
    finally:
        SCORERS._entries.pop("test_top2_margin")
        SCORERS._meta.pop("test_top2_margin")


# ---------------------------------------------------------------- formulas ----------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("placement", ["cl", "pl"])
def test_pixel_logits_match_reference(pixel_logits, name, temperature, placement):
    scorer = create_scorer(name, temperature=temperature, placement=placement)
    ref = np_score(name, pixel_logits.double().numpy() / temperature, temperature)
    for out in (pixel_logits, PixelLogits(pixel_logits)):
        got = scorer(out)
        assert got.shape == (2, 4, 6) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_mask_outputs_both_placements_match_reference(mask_out, name, temperature):
    cls, masks = mask_out.class_logits.double().numpy(), mask_out.mask_logits.double().numpy()
    ref_cl = np_score(name, np_mask_scores(cls, masks, temperature), 1.0)
    ref_pl = np_score(name, np_mask_scores(cls, masks, 1.0) / temperature, temperature)
    got_cl = create_scorer(name, temperature=temperature, placement="cl")(mask_out)
    got_pl = create_scorer(name, temperature=temperature, placement="pl")(mask_out)
    assert got_cl.shape == got_pl.shape == (2, 5, 4)
    np.testing.assert_allclose(got_cl.numpy(), ref_cl, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got_pl.numpy(), ref_pl, rtol=2e-5, atol=2e-5)


def test_maxlogit_pixel_temperature_is_monotone_but_class_temperature_is_not(mask_out):
    base = create_scorer("maxlogit", placement="pl")(mask_out)
    scaled = create_scorer("maxlogit", temperature=4.0, placement="pl")(mask_out)
    torch.testing.assert_close(scaled, base / 4.0)
    cl = create_scorer("maxlogit", temperature=4.0, placement="cl")(mask_out).flatten()
    rank_base, rank_cl = base.flatten().argsort(), cl.argsort()
    assert not torch.equal(rank_base, rank_cl)


def test_upsampling_is_bilinear_to_label_size(pixel_logits, mask_out):
    got = create_scorer("rba", temperature=2.0)(PixelLogits(pixel_logits, size=(9, 11)))
    ref = np_score("rba", np_bilinear(pixel_logits.double().numpy(), (9, 11)) / 2.0, 2.0)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    # explicit size argument overrides outputs.size; mask *logits* are upsampled before the sigmoid (reference order)
    got_m = create_scorer("msp", temperature=0.5)(mask_out, size=(10, 7))
    cls, masks = mask_out.class_logits.double().numpy(), mask_out.mask_logits.double().numpy()
    ref_m = np_score("msp", np_mask_scores(cls, np_bilinear(masks, (10, 7)), 0.5), 1.0)
    np.testing.assert_allclose(got_m.numpy(), ref_m, rtol=1e-5, atol=1e-5)


def test_full_frame_and_one_crop_mask_paths_agree():
    """The issue's repro: the same mask outputs as plain MaskOutputs and as one full-frame crop give one score."""
    g = torch.Generator().manual_seed(0)
    cl, ml = 3 * torch.randn(1, 20, 20, generator=g), 4 * torch.randn(1, 20, 24, 48, generator=g)
    plain = MaskOutputs(cl, ml, size=(96, 192))
    crop = MaskOutputs(cl, ml, size=(96, 192), crops=torch.tensor([[0, 0, 0, 96, 192]]), frame_size=(96, 192),
                       n_images=1)
    for name in ("rba", "msp", "energy"):
        torch.testing.assert_close(create_scorer(name)(plain), create_scorer(name)(crop), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_scored_in_float32(pixel_logits, mask_out, dtype):
    for out in (pixel_logits, mask_out):
        ref = create_scorer("energy", temperature=0.5)(out)
        got = create_scorer("energy", temperature=0.5)(out.to(dtype))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------- sliding-window crops ------------------------
def test_two_overlapping_crops_are_averaged():
    g = torch.Generator().manual_seed(2)
    cls, masks = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    # frame 4x6 of one image: crop A covers columns 0..3, crop B columns 2..5 (overlap: columns 2, 3)
    crops = torch.tensor([[0, 0, 0, 4, 4], [0, 0, 2, 4, 4]])
    out = MaskOutputs(cls, masks, crops=crops, frame_size=(4, 6), n_images=1)
    per_crop = np_mask_scores(cls.double().numpy(), masks.double().numpy(), 1.0)  # [2, 3, 4, 4]
    frame = np.zeros((3, 4, 6))
    frame[:, :, 0:2] = per_crop[0][:, :, 0:2]
    frame[:, :, 2:4] = (per_crop[0][:, :, 2:4] + per_crop[1][:, :, 0:2]) / 2
    frame[:, :, 4:6] = per_crop[1][:, :, 2:4]
    np.testing.assert_allclose(pixel_class_scores(out)[0].numpy(), frame, rtol=1e-6, atol=1e-6)
    got = create_scorer("rba")(out)
    np.testing.assert_allclose(got.numpy(), np_score("rba", frame[None], 1.0), rtol=1e-5, atol=1e-5)
    # with a final resize to the label size
    got_big = pixel_class_scores(out, size=(8, 12))
    np.testing.assert_allclose(got_big[0].numpy(), np_bilinear(frame, (8, 12)), rtol=1e-5, atol=1e-5)


def test_crops_are_resized_to_their_box_and_images_are_separate():
    g = torch.Generator().manual_seed(3)
    cls, masks = torch.randn(3, 2, 3, generator=g), torch.randn(3, 2, 2, 3, generator=g)
    # image 0: one 4x6 crop covering the frame (masks 2x3 → upsampled to 4x6); image 1: two 4x3 crops side by side.
    # As in the EoMT reference, a crop's mask *logits* are upsampled to its box before the sigmoid.
    crops = torch.tensor([[0, 0, 0, 4, 6], [1, 0, 0, 4, 3], [1, 0, 3, 4, 3]])
    out = MaskOutputs(cls, masks, crops=crops, frame_size=(4, 6), n_images=2, size=(4, 6))
    c, m = cls.double().numpy(), masks.double().numpy()

    def crop_scores(n: int, box: tuple[int, int]) -> np.ndarray:
        return np_mask_scores(c[n : n + 1], np_bilinear(m[n], box)[None], 0.7)[0]

    expect = np.zeros((2, 2, 4, 6))
    expect[0] = crop_scores(0, (4, 6))
    expect[1, :, :, :3] = crop_scores(1, (4, 3))
    expect[1, :, :, 3:] = crop_scores(2, (4, 3))
    # the other order (sigmoid at mask resolution, then resize) is measurably different on this input
    assert np.abs(np_bilinear(np_mask_scores(c, m, 0.7)[0], (4, 6)) - expect[0]).max() > 1e-3
    got = pixel_class_scores(out, temperature_cl=0.7)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-5, atol=1e-5)


def test_crops_must_cover_and_fit_the_frame():
    cls, masks = torch.randn(1, 2, 3), torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="cover"):
        pixel_class_scores(MaskOutputs(cls, masks, crops=torch.tensor([[0, 0, 0, 4, 4]]), frame_size=(4, 6)))
    with pytest.raises(ValueError, match="does not fit"):
        pixel_class_scores(MaskOutputs(cls, masks, crops=torch.tensor([[0, 0, 4, 4, 4]]), frame_size=(4, 6)))


# ---------------------------------------------------------------- score_many ---------------------------------
def test_score_many_matches_single_calls_and_groups_by_class_temperature(mask_out, pixel_logits, monkeypatch):
    specs = [
        create_scorer("msp", 1.0, "cl"),
        create_scorer("energy", 1.0, "cl"),
        create_scorer("rba", 2.0, "pl"),
        create_scorer("msp", 3.0, "pl"),
        create_scorer("energy", 2.0, "cl"),
        create_scorer("maxlogit", 2.0, "cl"),
    ]
    singles = [s(mask_out, size=(6, 5)) for s in specs]
    calls = []
    real = scorers_mod.pixel_class_scores

    def counting(outputs, temperature_cl=1.0, size=None):
        calls.append(temperature_cl)
        return real(outputs, temperature_cl, size)

    monkeypatch.setattr(scorers_mod, "pixel_class_scores", counting)
    many = score_many(mask_out, specs, size=(6, 5))
    assert sorted(calls) == [1.0, 2.0]  # T_cl=1 (cl T=1 and every pl scorer) and T_cl=2
    for a, b in zip(many, singles):
        torch.testing.assert_close(a, b)
    calls.clear()
    score_many(pixel_logits, specs, size=(8, 12))  # per-pixel logits: one resize whatever the temperatures
    assert calls == [1.0]
    calls.clear()
    half = pixel_logits.half()
    got = score_many(PixelLogits(half), specs, chunk_pixels=6)  # at their size: cast block by block, no copy
    assert calls == []
    for a, b in zip(got, score_many(half.float(), specs, chunk_pixels=0)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 12])  # one row / a row and a bit / two rows of width 5 per block
def test_score_many_cpu_row_blocks_equal_whole_batch(mask_out, pixel_logits, chunk):
    for outputs in (mask_out, PixelLogits(pixel_logits), replace(mask_out, ood_channels=(2,))):
        specs = [create_scorer(n, t, p) for n in default_scorers() if scorer_applies(n, outputs.ood_channels)
                 for t, p in ((1.0, "cl"), (0.5, "pl"))]
        whole = score_many(outputs, specs, size=(6, 5), chunk_pixels=0)
        blocks = score_many(outputs, specs, size=(6, 5), chunk_pixels=chunk)
        for a, b in zip(whole, blocks):
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # ≤ 1-2 ulp: SIMD vs scalar tails


def test_msp_keeps_resolution_for_confident_pixels():
    """1 − MSP of very confident pixels stays distinct (and equals the float64 reference), so the histogram-binned
    pixel metrics can still rank them."""
    z = torch.zeros(1, 3, 1, 4, dtype=torch.float32)
    z[0, 0, 0] = torch.tensor([14.0, 15.0, 16.0, 17.0])
    got = create_scorer("msp")(z).double().flatten().numpy()
    ref = 1.0 - np_softmax(z.double().numpy(), 1).max(1).flatten()
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert np.all(np.diff(got) < 0) and got.min() > 0


def test_msp_with_tied_maxima():
    """Two classes tied at the maximum: MSP = 1/2 (three-way tie: 1/3), so 1 − MSP = 1/2 (2/3)."""
    z = torch.tensor([[3.0, 3.0, -50.0], [1.0, 1.0, 1.0]]).T.reshape(1, 3, 1, 2)
    np.testing.assert_allclose(create_scorer("msp")(z).flatten().numpy(), [0.5, 2 / 3], rtol=1e-6)


# ---------------------------------------------------------------- OOD class channels ---------------------------
def test_p_ood_and_in_distribution_scorers_on_outputs_with_an_ood_class(mask_out):
    """A hand-built TDOS-like output (5 channels, channel 2 = ood): p_ood = softmax over all 5 channels at channel 2;
    every other scorer sees channels {0,1,3,4} only, exactly as if the ood channel did not exist."""
    ood = replace(mask_out, ood_channels=(2,))
    cls, masks = mask_out.class_logits.double().numpy(), mask_out.mask_logits.double().numpy()
    L = np_mask_scores(cls, masks, 1.0)  # [B, 5, h, w]
    got = create_scorer("p_ood")(ood).numpy()
    np.testing.assert_allclose(got, np_softmax(L, 1)[:, 2], rtol=1e-5, atol=1e-6)
    assert ((got >= 0) & (got <= 1)).all()
    keep = [0, 1, 3, 4]
    for name in ("msp", "rba", "energy"):
        np.testing.assert_allclose(create_scorer(name)(ood).numpy(), np_score(name, L[:, keep], 1.0), rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="needs a model with OOD class channels"):
        create_scorer("p_ood")(mask_out)
    assert scorer_applies("p_ood", (2,)) and not scorer_applies("p_ood", ()) and scorer_applies("msp", ())


# ---------------------------------------------------------------- shared reductions ----------------------------
def former_ops(name: str, z: torch.Tensor, t: float) -> torch.Tensor:
    """The scorers' own standalone ops (``torch.logsumexp``, a boolean max mask), for a bit-for-bit comparison of
    the ones whose bits sharing must not change."""
    if name == "msp":
        d = z - z.amax(dim=1, keepdim=True)
        is_max = d == 0
        rest = d.exp_().masked_fill_(is_max, 0.0).sum(dim=1) + (is_max.sum(dim=1) - 1)
        return rest / (1.0 + rest)
    if name in ("maxlogit", "eim"):
        return -z.amax(dim=1)
    if name in ("energy", "energy_blur"):
        return -t * torch.logsumexp(z, dim=1)
    raise AssertionError(name)


def blockwise(name: str, z: torch.Tensor, t: float, rows: int) -> torch.Tensor:
    """``former_ops`` applied as ``score_many`` applies scorers on the CPU: per image, per block of ``rows`` rows."""
    return torch.stack([torch.cat([former_ops(name, z[b : b + 1, :, r : r + rows], t)[0]
                                   for r in range(0, z.shape[2], rows)]) for b in range(z.shape[0])])


def tied_logits() -> torch.Tensor:
    """fp16-rounded logits (many exact ties), two whole channels tied and one pixel where every class ties."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(2, 19, 9, 33, generator=g) * 4).half().float()
    z[:, 3] = z[:, 5]
    z[0, :, 0, 0] = 2.0
    return z


@pytest.mark.parametrize("t", [1.0, 0.5])
def test_shared_reductions_give_the_standalone_bits(t):
    """Scorers sharing one block's max / exp / logsumexp / off-top mass (``score_many``) produce exactly the bits of
    the standalone ops (``torch.logsumexp``, a boolean max mask), with tied maxima, whole or in row blocks."""
    z = tied_logits()
    names = ["msp", "maxlogit", "eim", "energy"]
    specs = [create_scorer(n, t, "pl") for n in names + ["gen", "maxentropy", "rba"]]
    zt = z / t if t != 1.0 else z
    for chunk, rows in ((0, None), (40, 1), (70, 2)):
        got = score_many(z, specs, chunk_pixels=chunk)
        for name, s in zip(names, got):
            ref = former_ops(name, zt, t) if rows is None else blockwise(name, zt, t, rows)
            assert torch.equal(s, ref), (name, chunk)


@pytest.mark.parametrize("chunk", [0, 40])
def test_scorers_alone_equal_scorers_sharing(chunk):
    """Each scorer computed alone (its reductions made on demand) has the same bits as in a ``score_many`` of all
    default scorers (reductions shared), and the entropy-style scorers built on the shared reductions match their
    float64 definitions on tied logits (ties: 1 − MSP = 1/2 for a 2-way tie, entropy log 19 where all tie)."""
    z = tied_logits()
    names = [n for n in default_scorers() if scorer_applies(n, ())]
    together = score_many(z, [create_scorer(n) for n in names], chunk_pixels=chunk)
    for name, s in zip(names, together):
        assert torch.equal(s, score_many(z, [create_scorer(name)], chunk_pixels=chunk)[0]), name
    zd = z.double().numpy()
    p = np_softmax(zd, 1)
    refs = {"maxentropy": -(p * np.log(p)).sum(1), "msp": 1.0 - p.max(1),
            "gen": ((p * (1.0 - p)) ** 0.1).sum(1)}
    for name, ref in refs.items():
        np.testing.assert_allclose(together[names.index(name)].numpy(), ref, rtol=2e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(together[names.index("maxentropy")][0, 0, 0].item(), np.log(19), rtol=1e-6)


def test_confident_pixels_keep_their_entropy_and_gen_resolution():
    """Near-one-hot pixels: entropy and GEN stay within 1e-5 relative of float64 (``log S`` and ``1 − p`` in
    float32 would round the top class's share to 0)."""
    z = torch.zeros(1, 3, 1, 4)
    z[0, 0, 0] = torch.tensor([12.0, 14.0, 16.0, 18.0])
    p = np_softmax(z.double().numpy(), 1)
    for name, ref in (("maxentropy", -(p * np.log(p)).sum(1)), ("gen", ((p * (1.0 - p)) ** 0.1).sum(1))):
        np.testing.assert_allclose(create_scorer(name)(z).double().numpy(), ref, rtol=1e-5, err_msg=name)


def test_shared_logsumexp_is_torchs_on_infinite_and_nan_maxima():
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([[0.0, inf], [1.0, -inf], [2.0, 1.0], [-inf, -inf], [nan, 1.0]]).T.reshape(1, 2, 1, 5)
    for uses in (None, ("logsumexp",)):
        torch.testing.assert_close(SharedStats(z.clone(), uses, owns_z=True).logsumexp(), torch.logsumexp(z, dim=1),
                                   rtol=0, atol=0, equal_nan=True)


PIXELWISE = [n for n in list_scorers() if SCORERS.meta(n)["reads"] == "classes"]


@pytest.mark.parametrize("name", PIXELWISE)
def test_reductions_overwritten_after_their_last_use_keep_the_bits(name, monkeypatch):
    """A scorer alone, its block's reductions overwritten in place once nothing it declares (``uses``) reads them
    (the temperature-divided block, a fp16 input's float32 copy), gives the bits it gives with every reduction
    kept, whole or in blocks; the caller's logits, float32 or fp16, NCHW or channels-last, are left as they were."""
    ood = (2,) if SCORERS.meta(name)["ood"] else ()
    z = tied_logits()
    for logits in (z, z.half(), z.contiguous(memory_format=torch.channels_last)):
        before = logits.clone()
        for t, chunk in ((1.0, 0), (0.5, 0), (1.0, 70), (0.5, 70)):
            got = score_many(PixelLogits(logits, ood_channels=ood), [create_scorer(name, t)], chunk_pixels=chunk)
            with monkeypatch.context() as m:
                m.setitem(SCORERS.meta(name), "uses", None)
                kept = score_many(PixelLogits(logits, ood_channels=ood), [create_scorer(name, t)], chunk_pixels=chunk)
            assert torch.equal(got[0], kept[0]), (name, logits.dtype, t, chunk)
        assert torch.equal(logits, before)


def test_scorer_pairs_sharing_released_reductions_keep_the_bits(monkeypatch):
    """Every pair of pixel-wise scorers on one block (the fp16 block's own float32 copy, T = 1 and 0.5): each map
    has the bits it has alone with every reduction kept."""
    z = tied_logits().half()
    names = [n for n in PIXELWISE if not SCORERS.meta(n)["ood"]]
    for t in (1.0, 0.5):
        with monkeypatch.context() as m:
            for n in names:
                m.setitem(SCORERS.meta(n), "uses", None)
            kept = {n: score_many(z, [create_scorer(n, t)], chunk_pixels=70)[0] for n in names}
        for a, b in itertools.combinations(names, 2):
            got = score_many(z, [create_scorer(a, t), create_scorer(b, t)], chunk_pixels=70)
            assert torch.equal(got[0], kept[a]) and torch.equal(got[1], kept[b]), (a, b, t)


def test_shared_stats_overwrite_only_what_nobody_reads_again():
    """With ``uses=("rest",)`` an owned ``z`` takes ``z − max``, then ``below``, and ``exp`` takes ``e·below``;
    reading an entry after its last use raises; what a scorer declares, and an unowned ``z``, stay as they are."""
    z = tied_logits()
    st = SharedStats(z.clone(), ("rest",), owns_z=True)
    ref = SharedStats(z.clone())
    assert torch.equal(st.rest(), ref.rest())
    assert torch.equal(st.z, ref.below())  # z's storage: z − max, then −sign of it
    for spent in ("shifted", "exp", "below", "exp_below"):
        with pytest.raises(RuntimeError, match=f"{spent}\\(\\) read after its last declared use"):
            getattr(st, spent)()
    kept = SharedStats(z.clone(), ("rest", "below"))
    assert torch.equal(kept.rest(), ref.rest()) and torch.equal(kept.below(), ref.below())
    assert torch.equal(kept.z, z)
    with pytest.raises(ValueError, match="unknown shared reductions.*'softmax'"):
        SharedStats(z, ("softmax",))
