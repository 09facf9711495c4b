"""ERFNet: published checkpoint layout, original-format loading vs an independent functional forward, checkpoint
errors, safetensors round trip, IsoMax+ head, preprocessing/predict conventions, param groups, registry, runtime."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodseg.models import (
    CheckpointError,
    IsoMaxPlusHead,
    Runtime,
    check_model_fits,
    check_partition,
    create_model,
    list_models,
    load_checkpoint,
    read_state_dict,
    save_safetensors,
)
from oodseg.outputs import PixelLogits

# Hand-written from Eromera/erfnet_pytorch train/erfnet.py (Net(num_classes=20)): key → shape.
# Downsampler(ci, co): conv [co-ci, ci, 3, 3]; ConvTranspose2d weights are [in, out, kh, kw].
PUBLISHED_SHAPES = {
    "module.encoder.initial_block.conv.weight": (13, 3, 3, 3),
    "module.encoder.initial_block.conv.bias": (13,),
    "module.encoder.initial_block.bn.running_var": (16,),
    "module.encoder.layers.0.conv.weight": (48, 16, 3, 3),
    "module.encoder.layers.0.bn.weight": (64,),
    "module.encoder.layers.1.conv3x1_1.weight": (64, 64, 3, 1),
    "module.encoder.layers.5.conv1x3_2.weight": (64, 64, 1, 3),
    "module.encoder.layers.6.conv.weight": (64, 64, 3, 3),
    "module.encoder.layers.7.conv3x1_2.weight": (128, 128, 3, 1),
    "module.encoder.layers.14.bn2.running_mean": (128,),
    "module.encoder.output_conv.weight": (20, 128, 1, 1),
    "module.decoder.layers.0.conv.weight": (128, 64, 3, 3),
    "module.decoder.layers.2.conv1x3_1.bias": (64,),
    "module.decoder.layers.3.conv.weight": (64, 16, 3, 3),
    "module.decoder.layers.5.bn1.weight": (16,),
    "module.decoder.output_conv.weight": (16, 20, 2, 2),
    "module.decoder.output_conv.bias": (20,),
}
# 3 downsamplers × 6 (conv w,b + bn w,b,mean,var) + 17 non-bt-1D × 16 (4 convs × 2 + 2 BN × 4)
# + 2 upsamplers × 6 + 2 output convs × 2; no num_batches_tracked (saved by PyTorch < 0.4).
PUBLISHED_NUM_KEYS = 3 * 6 + 17 * 16 + 2 * 6 + 2 * 2


def published_like_state_dict(seed: int = 0, with_counters: bool = False) -> OrderedDict[str, torch.Tensor]:
    """Random weights in the published layout (keys from a default ERFNet, values freshly drawn, BN stats realistic)."""
    g = torch.Generator().manual_seed(seed)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, ref in create_model("erfnet").state_dict().items():
        if key.endswith("num_batches_tracked"):
            if with_counters:
                out["module." + key] = torch.tensor(7)
            continue
        if key.endswith("running_var"):
            v = torch.rand(ref.shape, generator=g) + 0.5
        elif key.endswith("running_mean") or key.endswith(".bias"):
            v = 0.1 * torch.randn(ref.shape, generator=g)
        elif ref.ndim == 1:  # BN weight
            v = 1.0 + 0.1 * torch.randn(ref.shape, generator=g)
        else:
            fan_in = ref[0].numel() if "decoder" not in key or "conv3x1" in key or "conv1x3" in key else ref.shape[0]
            v = torch.randn(ref.shape, generator=g) / math.sqrt(fan_in)
        out["module." + key] = v
    return out


def functional_erfnet(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Independent ERFNet forward (paper Table 1) straight from a ``module.``-prefixed state dict, eval mode."""

    def w(name: str) -> torch.Tensor:
        return sd["module." + name]

    def bn(y: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(y, w(p + ".running_mean"), w(p + ".running_var"), w(p + ".weight"), w(p + ".bias"),
                            False, 0.0, 1e-3)

    def down(y: torch.Tensor, p: str) -> torch.Tensor:
        conv = F.conv2d(y, w(p + ".conv.weight"), w(p + ".conv.bias"), stride=2, padding=1)
        return F.relu(bn(torch.cat([conv, F.max_pool2d(y, 2, 2)], 1), p + ".bn"))

    def nb(y: torch.Tensor, p: str, d: int) -> torch.Tensor:
        z = F.relu(F.conv2d(y, w(p + ".conv3x1_1.weight"), w(p + ".conv3x1_1.bias"), padding=(1, 0)))
        z = F.relu(bn(F.conv2d(z, w(p + ".conv1x3_1.weight"), w(p + ".conv1x3_1.bias"), padding=(0, 1)), p + ".bn1"))
        z = F.relu(F.conv2d(z, w(p + ".conv3x1_2.weight"), w(p + ".conv3x1_2.bias"), padding=(d, 0), dilation=(d, 1)))
        z = bn(F.conv2d(z, w(p + ".conv1x3_2.weight"), w(p + ".conv1x3_2.bias"), padding=(0, d), dilation=(1, d)),
               p + ".bn2")
        return F.relu(z + y)

    def up(y: torch.Tensor, p: str) -> torch.Tensor:
        z = F.conv_transpose2d(y, w(p + ".conv.weight"), w(p + ".conv.bias"), stride=2, padding=1, output_padding=1)
        return F.relu(bn(z, p + ".bn"))

    y = down(x, "encoder.initial_block")
    y = down(y, "encoder.layers.0")
    for i in range(1, 6):
        y = nb(y, f"encoder.layers.{i}", 1)
    y = down(y, "encoder.layers.6")
    for i, d in zip(range(7, 14 + 1), [2, 4, 8, 16, 2, 4, 8, 16]):
        y = nb(y, f"encoder.layers.{i}", d)
    y = up(y, "decoder.layers.0")
    y = nb(nb(y, "decoder.layers.1", 1), "decoder.layers.2", 1)
    y = up(y, "decoder.layers.3")
    y = nb(nb(y, "decoder.layers.4", 1), "decoder.layers.5", 1)
    return F.conv_transpose2d(y, w("decoder.output_conv.weight"), w("decoder.output_conv.bias"), stride=2)


def test_registry_lists_models():
    from oodseg.models import model_output_kind
    from oodseg.models.eomt import EoMT
    from oodseg.models.erfnet import ERFNet
    from oodseg.models.timm_seg import TimmSeg

    assert {"erfnet", "eomt", "timm_seg"} <= set(list_models())
    # the kind declared at registration (read without building a model) is the one the classes return
    for name, cls in (("erfnet", ERFNet), ("eomt", EoMT), ("timm_seg", TimmSeg)):
        assert model_output_kind(name) == cls.output_kind
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        create_model("nope")


def test_default_config_matches_published_layout():
    keys = {("module." + k): tuple(v.shape) for k, v in create_model("erfnet").state_dict().items()
            if not k.endswith("num_batches_tracked")}
    assert len(keys) == PUBLISHED_NUM_KEYS == 306
    for k, shape in PUBLISHED_SHAPES.items():
        assert keys[k] == shape, k


def test_original_format_checkpoint_loads_and_matches_functional_reference(tmp_path: Path):
    sd = published_like_state_dict(seed=1)
    path = tmp_path / "erfnet_pretrained.pth"
    torch.save(sd, path)
    model = create_model("erfnet", checkpoint=str(path), keep_void=True).eval()
    x = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x).logits
        ref = functional_erfnet(sd, x)
    assert ours.shape == ref.shape == (1, 20, 64, 128)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # default: void channel (index 19) dropped
    dropped = create_model("erfnet", checkpoint=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped(x).logits, ours[:, :19])
    # the same weights with BN counters (PyTorch >= 0.4 saves) and nested {'state_dict': ...} also load
    path2 = tmp_path / "nested.pt"
    torch.save({"epoch": 3, "state_dict": published_like_state_dict(seed=1, with_counters=True)}, path2)
    again = create_model("erfnet", checkpoint=str(path2), keep_void=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, ours)


def test_truncated_checkpoint_error_names_file(tmp_path: Path):
    good = tmp_path / "good.pth"
    torch.save(published_like_state_dict(), good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth.*weights_only"):
        create_model("erfnet", checkpoint=str(bad))
    with pytest.raises(CheckpointError, match="missing.pth.*not found"):
        read_state_dict(tmp_path / "missing.pth")


def test_wrong_checkpoint_error_names_keys(tmp_path: Path):
    sd = published_like_state_dict()
    del sd["module.decoder.output_conv.bias"]
    sd["module.decoder.extra.weight"] = torch.zeros(3)
    sd["module.encoder.initial_block.conv.weight"] = torch.zeros(13, 3, 5, 5)
    path = tmp_path / "wrong.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        create_model("erfnet", checkpoint=str(path))
    msg = str(info.value)
    assert "wrong.pth" in msg
    assert "1 missing key(s): decoder.output_conv.bias" in msg
    assert "1 unexpected key(s): decoder.extra.weight" in msg
    assert "encoder.initial_block.conv.weight (file [13, 3, 5, 5] vs model [13, 3, 3, 3])" in msg
    # non-strict loads the rest and reports the same keys
    model = create_model("erfnet")
    report = load_checkpoint(model, path, strict=False)
    assert report.missing == ["decoder.output_conv.bias"] and report.unexpected == ["decoder.extra.weight"]
    torch.testing.assert_close(model.state_dict()["decoder.layers.0.conv.weight"],
                               sd["module.decoder.layers.0.conv.weight"])


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_fit_check_on_the_meta_device_raises_what_loading_raises(tmp_path: Path, fmt: str):
    """``check_model_fits`` reads names and shapes only (the legacy pre-zip ``.pth`` format cannot be memory-mapped),
    on a meta-device model, and must agree with the real load: the same message, and silence on a file that loads."""
    wrong = {k: v for k, v in published_like_state_dict().items() if k != "module.decoder.output_conv.bias"}
    wrong["module.encoder.initial_block.conv.weight"] = torch.zeros(13, 3, 5, 5)
    good = {k.removeprefix("module."): v for k, v in published_like_state_dict().items()}
    paths = []
    for name, sd in (("wrong", wrong), ("good", good)):
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
            paths.append(tmp_path / f"{name}.safetensors")
        else:
            torch.save({"state_dict": sd}, tmp_path / f"{name}.pth", _use_new_zipfile_serialization=fmt == "zip")
            paths.append(tmp_path / f"{name}.pth")
    with pytest.raises(CheckpointError) as loading:
        create_model("erfnet", checkpoint=str(paths[0]))
    with pytest.raises(CheckpointError) as checking:
        check_model_fits("erfnet", checkpoint=str(paths[0]))
    assert str(checking.value) == str(loading.value) and "1 missing key(s): decoder.output_conv.bias" in str(
        loading.value)
    check_model_fits("erfnet", checkpoint=str(paths[1]))
    create_model("erfnet", checkpoint=str(paths[1]))  # the file the check passes loads
    with pytest.raises(CheckpointError, match="does not fit ERFNet"):  # a keyword that changes the shapes
        check_model_fits("erfnet", checkpoint=str(paths[1]), width=0.5)


def test_tiny_width_and_safetensors_round_trip(tmp_path: Path):
    model = create_model("erfnet", width=0.25, num_classes=5, void_class=False, input_size=None).eval()
    assert model.export_cfg()["channels"] == [4, 16, 32]
    path = save_safetensors(model, tmp_path / "m.safetensors", {"step": 3, "note": "x"})
    again = create_model(checkpoint=path).eval()
    x = torch.rand(1, 3, 37, 45)  # not a multiple of 8: padded internally, cropped back
    with torch.no_grad():
        a, b = model(x).logits, again(x).logits
    assert a.shape == (1, 5, 37, 45)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    from oodseg.models.checkpoint import read_safetensors_metadata

    meta = read_safetensors_metadata(path)
    assert meta["oodseg.model"] == "erfnet" and meta["step"] == "3" and meta["note"] == "x"
    with pytest.raises(CheckpointError, match="m.safetensors.*does not fit"):
        load_checkpoint(create_model("erfnet", width=0.5), path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.safetensors.*not a readable safetensors"):
        load_checkpoint(model, cut)


def test_inference_folds_each_bn_into_its_convolution_and_follows_weight_changes():
    """Eval mode without autograd runs each BN that follows a conv folded into it: no such BN module runs, the
    logits equal BN run as it is (autograd on) up to float rounding, and the fold follows in-place changes of the
    weights and statistics (an optimiser step) and a state-dict load."""
    torch.manual_seed(0)
    model = create_model("erfnet", width=0.25, input_size=None).eval()

    def perturb(m: torch.nn.Module) -> None:  # non-trivial statistics (a fresh BN is the identity)
        with torch.no_grad():
            for bn in (b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    perturb(model)
    x = torch.rand(2, 3, 32, 64)
    folded_bns = [model.encoder.layers[1].bn1, model.encoder.layers[1].bn2, model.decoder.layers[0].bn]
    ran: list[int] = []
    for bn in folded_bns:
        bn.register_forward_hook(lambda *_: ran.append(1))

    def check() -> torch.Tensor:
        with torch.enable_grad():
            ref = model(x).logits.detach()
        assert len(ran) == len(folded_bns)  # BN as it is with autograd on
        ran.clear()
        with torch.inference_mode():
            got = model(x).logits
        assert not ran  # folded
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        return got

    first = check()
    with torch.inference_mode():
        torch.testing.assert_close(model(x).logits, first, rtol=0, atol=0)  # the cached fold: the same bits
    with torch.no_grad():  # an optimiser step: weights and statistics change in place
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.mul_(1.1)
    assert not torch.allclose(check(), first)
    other = create_model("erfnet", width=0.25, input_size=None)
    perturb(other)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(check(), other.eval()(x).logits, rtol=0, atol=0)


def test_preprocess_and_predict_conventions():
    model = create_model("erfnet", width=0.25, input_size=(32, 64)).eval()
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.integers(0, 256, (2, 48, 80, 3), dtype=np.uint8))
    x = model.preprocess(img)
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), img.numpy() / 255.0, rtol=1e-6)  # [0,1], no mean/std
    torch.testing.assert_close(model.preprocess(img.permute(0, 3, 1, 2)), x)
    out = model.predict(img)
    assert isinstance(out, PixelLogits) and out.size == (48, 80) and out.logits.shape == (2, 19, 32, 64)
    with torch.no_grad():
        ref = model(F.interpolate(x, size=(32, 64), mode="bilinear", align_corners=False, antialias=True)).logits
    torch.testing.assert_close(out.logits, ref)
    with pytest.raises(TypeError, match="uint8"):
        model.preprocess(img.float())


def test_isomax_head_matches_numpy_reference():
    head = IsoMaxPlusHead(6, 4)
    with torch.no_grad():
        head.distance_scale.fill_(-2.5)  # |s| is used
    f = torch.randn(2, 6, 3, 5)
    out = head(f).detach().numpy()
    fn = f.numpy().transpose(0, 2, 3, 1)
    fn = fn / np.linalg.norm(fn, axis=-1, keepdims=True)
    p = head.prototypes.detach().numpy()
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    ref = -2.5 * np.linalg.norm(fn[..., None, :] - p, axis=-1)  # [B,H,W,C]
    np.testing.assert_allclose(out, ref.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-6)
    assert out.max() <= 0 and out.min() >= -2.5 * 2 - 1e-5  # unit vectors: distance in [0, 2]


def test_isomax_identity_prototypes_rank_classes_like_the_logits():
    z = torch.randn(3, 7, 4, 5) * 4
    head = IsoMaxPlusHead(7, 7, init="identity")
    with torch.no_grad():
        d2 = (head(z) / -head.distance_scale.abs()) ** 2
    zn = z / z.norm(dim=1, keepdim=True)
    torch.testing.assert_close(d2, 2 - 2 * zn, rtol=1e-5, atol=1e-5)  # ‖ẑ − e_c‖² = 2 − 2·ẑ_c
    torch.testing.assert_close(head(z).argmax(1), z.argmax(1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="in_channels >= num_classes"):
        IsoMaxPlusHead(3, 5, init="identity")
    with pytest.raises(ValueError, match="init"):
        IsoMaxPlusHead(3, 5, init="zeros")


def test_isomax_erfnet_loads_published_weights(tmp_path: Path):
    sd = published_like_state_dict(seed=3)
    path = tmp_path / "erfnet_pretrained.pth"
    torch.save(sd, path)
    model = create_model("erfnet", head="isomax", checkpoint=str(path), fresh=("head.",)).eval()
    torch.testing.assert_close(
        model.state_dict()["decoder.output_conv.weight"], sd["module.decoder.output_conv.weight"]
    )
    x = torch.rand(2, 3, 32, 64)
    out = model(x).logits
    assert out.shape == (2, 19, 32, 64) and bool((out <= 0).all())
    # the fresh head (identity prototypes) predicts what the published linear model predicts, pixel for pixel
    linear = create_model("erfnet", checkpoint=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(out.argmax(1), linear(x).logits.argmax(1), rtol=0, atol=0)
    groups = model.param_groups()
    assert {id(model.head.prototypes), id(model.head.distance_scale)} <= {id(p) for p in groups["head"]}


def test_param_groups_partition_and_blocks():
    model = create_model("erfnet", width=0.25)
    groups = model.param_groups()
    check_partition(model, groups)
    assert sorted(k for k in groups if not k.startswith("blocks.")) == ["backbone", "decoder", "head"]
    assert len([k for k in groups if k.startswith("blocks.")]) == 1 + 15 + 6
    assert groups["blocks.21"] == list(model.decoder.layers[5].parameters())
    assert not any(p.requires_grad for p in model.encoder.output_conv.parameters())


def test_runtime_cpu_defaults_and_autocast():
    rt = Runtime(device="cpu")
    assert rt.dtype == torch.float32
    model = rt.prepare(create_model("erfnet", width=0.25, input_size=None))
    a = torch.randn(4, 4)
    with rt.autocast():
        assert (a @ a).dtype == torch.float32
    with Runtime(device="cpu", precision="bf16").autocast():
        assert (a @ a).dtype == torch.bfloat16
    assert model.device.type == "cpu"
    with pytest.raises(ValueError, match="precision"):
        Runtime(precision="int8")
