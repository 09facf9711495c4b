"""Seeded detectron2-layout Mask2Former checkpoints and their reference outputs (fixtures of
``tests/test_mask2former_parity.py``).

``seeded_state_dict(keys, seed)`` builds a detectron2 ``MaskFormer`` state dict from its key list (names, shapes,
dtypes, in the file's order) with torch only, so the test rebuilds exactly the weights that the reference network
was run with. Values are drawn from one ``torch.Generator`` in key order, scaled so a forward pass stays in a
numerically ordinary range: weights ``N(0, 1/fan_in)``, biases ``0.1·N(0, 1)``, normalisation weights
``1 + 0.1·N(0, 1)``, BatchNorm running variance ``U(0.5, 1.5)``; Swin's ``relative_position_index`` is the index it
always holds (Liu et al., ICCV 2021), ``num_batches_tracked`` is 0 and ``criterion.empty_weight`` holds its
training value (ones, ``NO_OBJECT_WEIGHT`` last).

Fixture files (``tests/fixtures/mask2former_<name>.json.gz``): ``seed``, ``config_yaml`` (the reference config as
detectron2 dumps it next to ``model_final.pth``), ``keys`` (``[name, shape, dtype]``), ``image`` (``seed``, ``height``,
``width``) and ``expected``: reference outputs as ``{"shape", "slices" or "values", "sum", "abs_sum"}``.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).parent / "fixtures"


def relative_position_index(window: int) -> torch.Tensor:
    """Swin's pairwise relative-position index of a ``window × window`` window, ``[w², w²]`` int64."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _value(name: str, shape: list[int], dtype: str, g: torch.Generator, no_object: float) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if dtype == "int64":
        if leaf == "relative_position_index":
            return relative_position_index(math.isqrt(shape[0]))
        return torch.zeros(shape, dtype=torch.int64)
    if name == "criterion.empty_weight":
        w = torch.ones(shape)
        w[-1] = no_object
        return w
    if leaf == "running_var":
        return 0.5 + torch.rand(shape, generator=g)
    if leaf == "running_mean":
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=g) / math.sqrt(max(fan_in, 1))
    if leaf == "weight":  # every 1-D weight is a normalisation scale (LayerNorm, GroupNorm, BatchNorm)
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.1 * torch.randn(shape, generator=g)


def seeded_state_dict(keys: list[list[Any]], seed: int, no_object: float = 0.1) -> dict[str, torch.Tensor]:
    """The detectron2 state dict of ``keys`` (``[name, shape, dtype]``, file order) drawn from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return {name: _value(name, list(shape), dtype, g, no_object) for name, shape, dtype in keys}


def seeded_image(seed: int, height: int, width: int) -> torch.Tensor:
    """The fixture's input: uint8 RGB ``[H, W, 3]`` from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.int64).to(torch.uint8)


def load_fixture(name: str) -> dict[str, Any]:
    with gzip.open(FIXTURES / f"mask2former_{name}.json.gz", "rt") as f:
        return json.load(f)


def summary(t: torch.Tensor, step: tuple[int, ...]) -> dict[str, Any]:
    """``shape``, a strided subsample (``step`` per dim) and float64 sums of ``t`` (what a fixture records)."""
    t = t.detach().double()
    sub = t[tuple(slice(None, None, s) for s in step)]
    return {"shape": list(t.shape), "step": list(step), "values": [float(f"{v:.8g}") for v in sub.flatten().tolist()],
            "sum": float(t.sum()), "abs_sum": float(t.abs().sum())}


#: a detectron2 config of the tiny Swin Mask2Former (``hf_config("tiny", encoder_feedforward_dim=1024)``: the
#: reference fixes the deformable encoder's feed-forward width at 1024), written as a base + child pair
TINY_D2_BASE = """\
MODEL:
  META_ARCHITECTURE: MaskFormer
  BACKBONE: {NAME: D2SwinTransformer}
  SWIN: {EMBED_DIM: 16, DEPTHS: [1, 1, 1, 1], NUM_HEADS: [1, 1, 2, 2], WINDOW_SIZE: 4}
  PIXEL_MEAN: [123.675, 116.28, 103.53]
  PIXEL_STD: [58.395, 57.12, 57.375]
  SEM_SEG_HEAD:
    NAME: MaskFormerHead
    IN_FEATURES: [res2, res3, res4, res5]
    NUM_CLASSES: 19
    CONVS_DIM: 32
    MASK_DIM: 32
    PIXEL_DECODER_NAME: MSDeformAttnPixelDecoder
    TRANSFORMER_ENC_LAYERS: 1
    DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS: 2
  MASK_FORMER:
    TRANSFORMER_DECODER_NAME: MultiScaleMaskedTransformerDecoder
    TRANSFORMER_IN_FEATURE: multi_scale_pixel_decoder
    HIDDEN_DIM: 32
    NHEADS: 2
    DIM_FEEDFORWARD: 64
    DEC_LAYERS: 3
    NUM_OBJECT_QUERIES: 8
    DROPOUT: 0.0
INPUT: {FORMAT: RGB, MIN_SIZE_TEST: 64, MAX_SIZE_TEST: 128}
"""
TINY_D2_CHILD = """\
_BASE_: base.yaml
INPUT:
  MIN_SIZE_TRAIN: !!python/object/apply:eval ["[int(x * 0.1 * 1024) for x in range(5, 21)]"]
MODEL:
  SEM_SEG_HEAD: {DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES: [%s]}
"""


def write_tiny_d2(folder: Path, state: dict[str, torch.Tensor], levels: int = 3, extra: str = "") -> Path:
    """A detectron2 model directory (``base.yaml`` + ``config.yaml`` + ``model_final.pth``) of the tiny
    architecture with ``levels`` feature levels; ``extra`` YAML is appended to the child config."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(TINY_D2_BASE)
    names = ", ".join(["res2", "res3", "res4", "res5"][-levels:])
    (folder / "config.yaml").write_text(TINY_D2_CHILD % names + extra)
    torch.save({"model": state, "iteration": 7}, folder / "model_final.pth")
    return folder


def to_detectron2(hf_state: dict[str, torch.Tensor], table: dict[str, tuple[str, ...]], window: int
                  ) -> dict[str, torch.Tensor]:
    """A transformers state dict in detectron2's layout by inverting the converter's key table (for round trips;
    the table itself is checked against the reference network by test_mask2former_parity)."""
    out = {}
    for src, dsts in table.items():
        if src == "criterion.empty_weight":
            out[src] = hf_state[src].clone()
        elif not dsts:
            out[src] = relative_position_index(window)
        else:
            out[src] = torch.cat([hf_state[d] for d in dsts]).clone()
    return out
