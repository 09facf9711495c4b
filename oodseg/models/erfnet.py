"""ERFNet — Romera et al., "ERFNet: Efficient Residual Factorized ConvNet for Real-time Semantic Segmentation",
IEEE T-ITS 2018 (reference implementation: github.com/Eromera/erfnet_pytorch, ``train/erfnet.py``).

Architecture (paper Table 1; channels ``(c1, c2, c3) = (16, 64, 128)`` by default):

* encoder: downsampler(3→c1) [``encoder.initial_block``], downsampler(c1→c2), 5 × non-bottleneck-1D(c2, d=1),
  downsampler(c2→c3), 2 × [non-bt-1D(c3, d) for d in 2, 4, 8, 16] [``encoder.layers.0..14``]; plus
  ``encoder.output_conv`` (1×1, c3→K), used only by the original encoder-pretraining stage and kept so the published
  checkpoint loads strictly (frozen here: it never receives gradients);
* decoder: upsampler(c3→c2), 2 × non-bt-1D(c2), upsampler(c2→c1), 2 × non-bt-1D(c1) [``decoder.layers.0..5``],
  ``decoder.output_conv`` = ConvTranspose2d(c1→K, 2×2, stride 2) to full resolution.

Downsampler: ``BN(cat(conv3x3_s2(x) [c_out − c_in ch], maxpool2(x)))`` + ReLU; non-bottleneck-1D: two factorised
(3×1 → ReLU → 1×3) convolutions, the second pair dilated, BN after each pair, dropout, residual + ReLU; BN eps = 1e-3.

Published Cityscapes weights (``erfnet_pretrained.pth``): K = 20 outputs, channel 19 = void, saved from
``nn.DataParallel`` (``module.`` prefix; ``load_checkpoint`` strips it). Their input convention (reference
``train/main.py`` / ``eval/``): RGB ``ToTensor()`` i.e. scaled to [0, 1] with **no** mean/std normalisation, images
resized to 512×1024 (height 512). ``preprocess`` applies exactly that; ``predict`` resizes to ``input_size``
(default (512, 1024); ``None`` keeps the input resolution) and returns logits at that resolution with ``size`` = the
input size, so the scorer upsamples. The void channel is dropped from the outputs by default (``keep_void=False``),
so ``num_classes`` = 19 scored Cityscapes classes; ``void_class=False`` builds a K = ``num_classes`` network.

``width`` scales the three channel counts (``width=0.25`` → (4, 16, 32), a tiny CPU demo model) or ``channels``
gives them explicitly; the default config reproduces the published key/shape layout exactly.

``head="isomax"`` appends an :class:`~oodseg.models.heads.IsoMaxPlusHead` on the K-channel output of
``decoder.output_conv`` (so the published weights still load: ``create_model("erfnet", head="isomax",
checkpoint="erfnet_pretrained.pth", fresh=("head.",))``). A fresh head starts with identity prototypes, under
which it predicts the same classes as the logits below it: EIM fine-tuning starts from the base segmentation.

Inputs whose sides are not multiples of 8 are zero-padded at the bottom/right (three stride-2 stages need it: the
conv and the max-pool of a downsampler disagree on odd sizes) and the logits are cropped back.

Inference (eval mode, autograd off) runs each BN that follows a convolution folded into it (:func:`conv_bn`: two
passes over the activations fewer per non-bottleneck block) and every ReLU in place: the same function up to float
rounding (logits within ~1e-7), the forward at 512×1024 on one CPU thread ~13 % faster (``benchmarks/README.md``).
Training and autograd-enabled passes (ODIN's input gradient) run BN as it is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodseg.models.base import SegModel, to_nchw_uint8
from oodseg.models.factory import register_model
from oodseg.models.heads import IsoMaxPlusHead
from oodseg.outputs import PixelLogits

ENCODER_DILATIONS = (2, 4, 8, 16)
BN_EPS = 1e-3


def fold_bn(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d, cache: dict[str, Any]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv``'s weight and bias with the eval-mode ``bn`` after it folded in: ``W·s`` and ``(b − μ)·s + β``, with
    ``s = γ / √(σ² + ε)`` per output channel (dim 1 of a transposed conv's weight). Kept in ``cache`` until a tensor
    they come from changes in place (an optimiser step, a state-dict load) or is replaced (``.to()``); tensors
    made in inference mode keep no version counter, so theirs are recomputed each time."""
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    try:
        key: tuple | None = tuple((t.data_ptr(), t._version) for t in sources)
    except RuntimeError:  # inference tensors
        key = None
    if key is None or cache.get("key") != key:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
        cache.update(key=key, weight=conv.weight * scale.reshape(shape),
                     bias=(conv.bias - bn.running_mean) * scale + bn.bias)
    return cache["weight"], cache["bias"]


def conv_bn(x: torch.Tensor, conv: nn.Module, bn: nn.BatchNorm2d, cache: dict[str, Any]) -> torch.Tensor:
    """``bn(conv(x))``; in inference (eval-mode BN, autograd off) one convolution with ``bn`` folded in
    (:func:`fold_bn`), which skips a pass over the activations. A wrapped conv (a LoRA adapter) runs as it is."""
    if bn.training or torch.is_grad_enabled() or type(conv) not in (nn.Conv2d, nn.ConvTranspose2d):
        return bn(conv(x))
    weight, bias = fold_bn(conv, bn, cache)
    if isinstance(conv, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, bias, conv.stride, conv.padding, conv.output_padding, conv.groups,
                                  conv.dilation)
    return conv._conv_forward(x, weight, bias)


class DownsamplerBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        if c_out <= c_in:
            raise ValueError(f"downsampler needs c_out > c_in, got {c_in}→{c_out}")
        self.conv = nn.Conv2d(c_in, c_out - c_in, 3, stride=2, padding=1, bias=True)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu_(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))


class NonBottleneck1D(nn.Module):
    def __init__(self, channels: int, dropout: float, dilation: int) -> None:
        super().__init__()
        c, d = channels, dilation
        self.conv3x1_1 = nn.Conv2d(c, c, (3, 1), padding=(1, 0), bias=True)
        self.conv1x3_1 = nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=True)
        self.bn1 = nn.BatchNorm2d(c, eps=BN_EPS)
        self.conv3x1_2 = nn.Conv2d(c, c, (3, 1), padding=(d, 0), dilation=(d, 1), bias=True)
        self.conv1x3_2 = nn.Conv2d(c, c, (1, 3), padding=(0, d), dilation=(1, d), bias=True)
        self.bn2 = nn.BatchNorm2d(c, eps=BN_EPS)
        self.dropout = nn.Dropout2d(dropout)
        self._folded: tuple[dict, dict] = ({}, {})  # conv_bn's caches, not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu_(conv_bn(F.relu_(self.conv3x1_1(x)), self.conv1x3_1, self.bn1, self._folded[0]))
        y = conv_bn(F.relu_(self.conv3x1_2(y)), self.conv1x3_2, self.bn2, self._folded[1])
        if self.dropout.p > 0:
            y = self.dropout(y)
        return F.relu_(y + x)


class UpsamplerBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=True)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self._folded: dict[str, Any] = {}  # conv_bn's cache, not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu_(conv_bn(x, self.conv, self.bn, self._folded))


class Encoder(nn.Module):
    def __init__(self, channels: tuple[int, int, int], n_out: int, dropout: tuple[float, float]) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.initial_block = DownsamplerBlock(3, c1)
        layers: list[nn.Module] = [DownsamplerBlock(c1, c2)]
        layers += [NonBottleneck1D(c2, dropout[0], 1) for _ in range(5)]
        layers.append(DownsamplerBlock(c2, c3))
        layers += [NonBottleneck1D(c3, dropout[1], d) for _ in range(2) for d in ENCODER_DILATIONS]
        self.layers = nn.ModuleList(layers)
        self.output_conv = nn.Conv2d(c3, n_out, 1, bias=True)  # encoder-only pretraining head, unused here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.initial_block(x)
        for layer in self.layers:
            x = layer(x)
        return x


class Decoder(nn.Module):
    def __init__(self, channels: tuple[int, int, int], n_out: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.layers = nn.ModuleList(
            [
                UpsamplerBlock(c3, c2),
                NonBottleneck1D(c2, 0.0, 1),
                NonBottleneck1D(c2, 0.0, 1),
                UpsamplerBlock(c2, c1),
                NonBottleneck1D(c1, 0.0, 1),
                NonBottleneck1D(c1, 0.0, 1),
            ]
        )
        self.output_conv = nn.ConvTranspose2d(c1, n_out, 2, stride=2, padding=0, output_padding=0, bias=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate map: the decoder layers' output ``[B, c1, H/2, W/2]`` (input of ``output_conv``)."""
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_conv(self.features(x))


@register_model("erfnet")
class ERFNet(SegModel):
    """ERFNet (Romera et al. 2018) as a per-pixel :class:`SegModel`: [0, 1] RGB input without mean/std, resized to
    ``input_size``; logits of ``num_classes`` Cityscapes classes (void channel dropped unless ``keep_void``);
    optional IsoMax+ head. Layers and published-weight layout: module docstring.

    ``param_groups()``: ``backbone`` = encoder, ``decoder`` = decoder layers, ``head`` = ``decoder.output_conv``
    (+ IsoMax+ head); ``blocks.0`` = ``encoder.initial_block``, ``blocks.1..15`` = ``encoder.layers``,
    ``blocks.16..21`` = ``decoder.layers``.
    """

    output_kind = "pixel"
    has_features = True

    def __init__(
        self,
        num_classes: int = 19,
        void_class: bool = True,
        keep_void: bool = False,
        width: float = 1.0,
        channels: tuple[int, int, int] | list[int] | None = None,
        head: str = "linear",
        dropout: tuple[float, float] | list[float] = (0.03, 0.3),
        input_size: tuple[int, int] | list[int] | None = (512, 1024),
    ) -> None:
        if head not in ("linear", "isomax"):
            raise ValueError(f"head must be 'linear' or 'isomax', got {head!r}")
        if keep_void and not void_class:
            raise ValueError("keep_void=True needs void_class=True")
        n_out = num_classes + int(void_class)
        super().__init__(num_classes + int(keep_void))
        if channels is None:
            channels = tuple(max(4, round(c * width)) for c in (16, 64, 128))
        ch = tuple(int(c) for c in channels)
        if len(ch) != 3:
            raise ValueError(f"channels must have 3 entries (c1, c2, c3), got {channels!r}")
        self.cfg: dict[str, Any] = dict(
            num_classes=num_classes,
            void_class=void_class,
            keep_void=keep_void,
            channels=list(ch),
            head=head,
            dropout=[float(p) for p in dropout],
            input_size=None if input_size is None else [int(s) for s in input_size],
        )
        self.n_scored = self.num_classes
        self.encoder = Encoder(ch, n_out, (float(dropout[0]), float(dropout[1])))
        self.decoder = Decoder(ch, n_out)
        self.encoder.output_conv.requires_grad_(False)
        self.head = IsoMaxPlusHead(n_out, n_out, init="identity") if head == "isomax" else None
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))

    def export_cfg(self) -> dict[str, Any]:
        return dict(self.cfg)

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 RGB → float RGB in [0, 1] (the reference ``ToTensor()``; no mean/std), on the model's device."""
        x = to_nchw_uint8(images_uint8).to(self.device, non_blocking=True)
        return x.float().div_(255.0)

    def forward(self, x: torch.Tensor, features: bool = False) -> PixelLogits:
        """Logits ``[B, num_classes, H, W]`` at the input resolution (void channel dropped unless ``keep_void``);
        ``features=True``: also the decoder's penultimate map ``[B, c1, ⌈H/2⌉, ⌈W/2⌉]`` (the input of
        ``decoder.output_conv``, after the last non-bottleneck block's ReLU), from the same pass."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % 8, (-w) % 8
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        f = self.decoder.features(self.encoder(x))
        logits = self.classify(f, (h, w))
        return PixelLogits(logits, features=f[..., : (h + 1) // 2, : (w + 1) // 2] if features else None)

    def classify(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``decoder.output_conv`` (a 2×2 stride-2 transposed conv: each feature pixel makes its own 2×2 block of
        logits) and the IsoMax+ head if any, cropped to ``size``."""
        y = self.decoder.output_conv(features)
        if self.head is not None:
            y = self.head(y)
        return y[:, : self.n_scored, : size[0], : size[1]]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        unused = {id(p) for p in self.encoder.output_conv.parameters()}  # frozen: pre-training-only conv
        head = list(self.decoder.output_conv.parameters()) + (list(self.head.parameters()) if self.head else [])
        groups: dict[str, list[nn.Parameter]] = {
            "backbone": [p for p in self.encoder.parameters() if id(p) not in unused],
            "decoder": list(self.decoder.layers.parameters()),
            "head": head,
        }
        blocks = [self.encoder.initial_block, *self.encoder.layers, *self.decoder.layers]
        for i, block in enumerate(blocks):
            groups[f"blocks.{i}"] = list(block.parameters())
        return groups
