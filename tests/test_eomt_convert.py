"""tue-mps/eomt checkpoint conversion (oodseg.models.eomt_convert).

The reference is a tiny EoMT written here in tue-mps' module layout (tue-mps/eomt ``models/eomt.py``,
``models/vit.py``, ``models/scale_block.py``): a timm ``VisionTransformer`` with register tokens at
``encoder.backbone``, normalisation buffers on ``encoder``, and their ``q`` / ``class_head`` / ``mask_head`` /
``upscale`` / ``attn_mask_probs``, with their eval forward (queries joined before the last ``num_blocks`` blocks, a
mask prediction before each of them, a query's attention to patches restricted to its mask logits > 0 unless dropped
with probability ``1 − attn_mask_probs[k]``). Its per-pixel class scores must equal those of the converted
transformers model loaded through ``oodseg.models.eomt.EoMT(pretrained=dir)``.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import EomtConfig

from oodseg.models.checkpoint import CheckpointError
from oodseg.models.eomt import EoMT
from oodseg.models.eomt_convert import convert_checkpoint, main

S, P, D, DEPTH, HEADS, Q, C, REG, BLOCKS = 64, 8, 128, 3, 2, 5, 3, 2, 2  # D / HEADS = 64 (the default)
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
UNPICKLED: list[str] = []  # set by RefEoMT.__setstate__: proves the converter never rebuilt the pickled module


class ScaleBlock(nn.Module):
    """tue-mps ``ScaleBlock``: 2× transposed conv, GELU, depthwise 3×3 conv, LayerNorm2d."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


class Encoder(nn.Module):
    def __init__(self, swiglu: bool) -> None:
        super().__init__()
        mlp = {"mlp_ratio": 5.375, "mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU} if swiglu else {"mlp_ratio": 4.0}
        self.backbone = VisionTransformer(
            img_size=S,
            patch_size=P,
            embed_dim=D,
            depth=DEPTH,
            num_heads=HEADS,
            init_values=1e-5,
            reg_tokens=REG,
            no_embed_class=True,
            num_classes=0,
            **mlp,
        )
        self.register_buffer("pixel_mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(STD).view(1, 3, 1, 1))


def attention(attn: nn.Module, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """timm ``Attention`` weights used explicitly: softmax(q·kᵀ/√d) v, disallowed pairs at −inf."""
    b, n, c = x.shape
    d = c // attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, d).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * d**-0.5
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class RefEoMT(nn.Module):
    """Reference EoMT in tue-mps' layout; ``forward`` takes RGB in [0, 1] and returns the final (mask, class) logits."""

    def __init__(self, swiglu: bool = False, probs: tuple[float, ...] = (1.0, 1.0)) -> None:
        super().__init__()
        self.encoder = Encoder(swiglu)
        self.num_blocks = len(probs)
        self.register_buffer("attn_mask_probs", torch.tensor(probs))
        self.q = nn.Embedding(Q, D)
        self.class_head = nn.Linear(D, C + 1)
        self.mask_head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.upscale = nn.Sequential(*[ScaleBlock(D) for _ in range(max(1, int(math.log2(P)) - 2))])

    def __setstate__(self, state: dict) -> None:
        UNPICKLED.append(type(self).__name__)
        super().__setstate__(state)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bb = self.encoder.backbone
        queries, patches = x[:, :Q], x[:, Q + bb.num_prefix_tokens :]
        feat = patches.transpose(1, 2).reshape(len(x), D, *bb.patch_embed.grid_size)
        return torch.einsum("bqc,bchw->bqhw", self.mask_head(queries), self.upscale(feat)), self.class_head(queries)

    def allowed(self, x: torch.Tensor, masks: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        start = Q + self.encoder.backbone.num_prefix_tokens
        grid = F.interpolate(masks, size=self.encoder.backbone.patch_embed.grid_size, mode="bilinear")
        allowed = torch.ones(b, n, n, dtype=torch.bool)
        allowed[:, :Q, start:] = grid.flatten(2) > 0
        dropped = torch.rand(b, Q) > prob  # these queries see every patch in this block
        allowed[:, :Q, start:][dropped] = True
        return allowed

    def forward(self, rgb01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bb = self.encoder.backbone
        x = bb._pos_embed(bb.patch_embed((rgb01 - self.encoder.pixel_mean) / self.encoder.pixel_std))
        first = len(bb.blocks) - self.num_blocks
        allowed = None
        for i, block in enumerate(bb.blocks):
            if i == first:
                x = torch.cat([self.q.weight.expand(len(x), -1, -1), x], dim=1)
            if i >= first:
                allowed = self.allowed(x, self.predict(bb.norm(x))[0], self.attn_mask_probs[i - first])
            x = x + block.ls1(attention(block.attn, block.norm1(x), allowed))
            x = x + block.ls2(block.mlp(block.norm2(x)))
        return self.predict(bb.norm(x))


def make_ref(swiglu: bool = False, probs: tuple[float, ...] = (1.0, 1.0), seed: int = 0) -> RefEoMT:
    torch.manual_seed(seed)
    net = RefEoMT(swiglu, probs).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():  # random everywhere, so a swapped or skipped tensor shows
            p.normal_(1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")) else 0.0, 0.1)
    return net


def lightning_ckpt(net: RefEoMT, path: Path, hparams: bool = True, drop: str = "", add: str = "") -> Path:
    sd = {"network." + k: v for k, v in net.state_dict().items() if "network." + k != drop}
    sd["criterion.empty_weight"] = torch.tensor([1.0] * C + [0.1])
    if add:
        sd[add] = torch.zeros(D)
    ckpt = {"epoch": 1, "global_step": 7, "pytorch-lightning_version": "2.5.1", "state_dict": sd}
    if hparams:  # as Lightning's save_hyperparameters() stores them for tue-mps: the network object included
        ckpt |= {"hyper_parameters": {"network": net, "num_classes": C, "img_size": (S, S)}, "hparams_name": "kwargs"}
    torch.save(ckpt, path)
    return path


def class_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """L[c] = Σ_q softmax(class_q)[c] · sigmoid(mask_q upsampled to S×S), c over the real classes."""
    masks = F.interpolate(mask_logits, size=(S, S), mode="bilinear", align_corners=False)
    return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], masks.sigmoid())


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (2, S, S, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)


@pytest.mark.parametrize("swiglu,probs", [(False, (0.0, 1.0)), (True, (1.0, 1.0))])
def test_converted_model_matches_reference(tmp_path, images, swiglu, probs):
    net = make_ref(swiglu, probs)
    src = lightning_ckpt(net, tmp_path / "last.ckpt")
    with pytest.raises(pickle.UnpicklingError):  # the plain weights-only load refuses the pickled network
        torch.load(src, map_location="cpu", weights_only=True)
    out = convert_checkpoint(src, tmp_path / "hf")
    assert UNPICKLED == []
    cfg = EomtConfig.from_pretrained(out)
    assert (cfg.image_size, cfg.patch_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (S, P, DEPTH, HEADS)
    assert (cfg.num_queries, cfg.num_labels, cfg.num_blocks, cfg.num_register_tokens) == (Q, C, BLOCKS, REG)
    assert cfg.use_swiglu_ffn is swiglu and cfg.no_object_weight == pytest.approx(0.1)

    model = EoMT(pretrained=str(out)).eval()
    assert model._mean == pytest.approx(MEAN) and model._std == pytest.approx(STD)
    with torch.no_grad():
        ref_masks, ref_cls = net(images.permute(0, 3, 1, 2).float() / 255.0)
        ours = model(model.preprocess(images))
    torch.testing.assert_close(ours.class_logits, ref_cls, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        class_scores(ours.class_logits, ours.mask_logits), class_scores(ref_cls, ref_masks), rtol=1e-4, atol=1e-5
    )
    with torch.no_grad():  # the masked attention matters here, so the schedule above was really exercised
        net.attn_mask_probs.zero_()
        unmasked = class_scores(*reversed(net(images.permute(0, 3, 1, 2).float() / 255.0)))
    assert (unmasked - class_scores(ref_cls, ref_masks)).abs().max() > 1e-3


def test_stale_mask_schedule_is_refused(tmp_path):
    src = lightning_ckpt(make_ref(probs=(1.0, 0.0)), tmp_path / "x.ckpt", hparams=False)
    with pytest.raises(CheckpointError, match=r"stale mask"):
        convert_checkpoint(src, tmp_path / "hf")


@pytest.mark.parametrize(
    "key",
    [
        "network.encoder.backbone.blocks.1.ls2.gamma",
        "network.q.weight",
        "network.encoder.pixel_std",
        "network.upscale.0.conv2.weight",
    ],
)
def test_missing_key_is_named(tmp_path, key):
    src = lightning_ckpt(make_ref(), tmp_path / "x.ckpt", hparams=False, drop=key)
    with pytest.raises(CheckpointError, match="missing") as err:
        convert_checkpoint(src, tmp_path / "hf")
    assert key in str(err.value) and str(src) in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_unexpected_key_is_named(tmp_path):
    key = "network.encoder.backbone.blocks.0.attn.q_norm.weight"
    src = lightning_ckpt(make_ref(), tmp_path / "x.ckpt", hparams=False, add=key)
    with pytest.raises(CheckpointError, match="1 unexpected key") as err:
        convert_checkpoint(src, tmp_path / "hf")
    assert key in str(err.value)


def test_unreadable_or_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(garbage, tmp_path / "hf")
    assert "\n" not in str(err.value) and str(garbage) in str(err.value)
    foreign = tmp_path / "erfnet.pth"
    torch.save({"state_dict": {"encoder.initial_block.conv.weight": torch.zeros(3)}}, foreign)
    with pytest.raises(CheckpointError, match="not a tue-mps/eomt checkpoint"):
        convert_checkpoint(foreign, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="not found"):
        convert_checkpoint(tmp_path / "absent.ckpt", tmp_path / "hf")


def test_cli_help_round_trip_and_errors(tmp_path, capsys):
    assert main(["--help"]) == 0
    assert "convert-checkpoint" in capsys.readouterr().out
    net = make_ref()
    src = lightning_ckpt(net, tmp_path / "last.ckpt")
    assert main([str(src), str(tmp_path / "cli"), "--image-size", str(S)]) == 0
    assert "wrote" in capsys.readouterr().out
    api = convert_checkpoint(src, tmp_path / "api")
    a, b = EoMT(pretrained=str(api)).state_dict(), EoMT(pretrained=str(tmp_path / "cli")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(b["hf.query.weight"], net.q.weight)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("hello")
    for argv in ([str(garbage), str(tmp_path / "g")], [str(src), str(tmp_path / "s"), "--image-size", "48"]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
