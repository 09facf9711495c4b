"""Convert tue-mps/eomt checkpoints (Lightning ``.ckpt`` or the ``pytorch_model.bin`` they publish) to a transformers
``EomtForUniversalSegmentation`` directory that :class:`oodseg.models.eomt.EoMT` loads with ``pretrained=<dir>``.

Source layout (tue-mps/eomt ``models/eomt.py``, ``models/vit.py``, ``models/scale_block.py``,
``training/lightning_module.py``, ``training/mask_classification_loss.py``): the Lightning module holds the network
under ``network.`` and the loss under ``criterion.``. The network is a timm ``VisionTransformer`` (DINOv2 with
register tokens, ``no_embed_class=True``: position embeddings for the patches only; timm
``models/vision_transformer.py``) at ``encoder.backbone``, the input normalisation buffers ``encoder.pixel_mean`` /
``encoder.pixel_std`` (applied to RGB / 255), and EoMT's own parts: ``q`` (query embedding), ``class_head``,
``mask_head`` (``Linear, GELU, Linear, GELU, Linear``), ``upscale`` (``ScaleBlock``: ``conv1`` transposed conv, GELU,
depthwise ``conv2``, ``norm`` LayerNorm2d) and the ``attn_mask_probs`` buffer (one masked-attention probability per
query block; ``len`` = ``num_blocks``).

Key mapping (tue-mps → transformers ``models/eomt/modeling_eomt.py``), ``B = encoder.backbone.``:

=====================================  ====================================================================
``B.cls_token`` / ``B.reg_token``      ``embeddings.cls_token`` / ``embeddings.register_tokens``
``B.pos_embed`` ``[1, N, D]``          ``embeddings.position_embeddings.weight`` ``[N, D]``
``B.patch_embed.proj``                 ``embeddings.patch_embeddings.projection``
``B.blocks.i.norm1`` / ``norm2``       ``layers.i.norm1`` / ``norm2``
``B.blocks.i.attn.qkv`` ``[3D, …]``    ``layers.i.attention.{q,k,v}_proj`` (rows split in thirds, q-k-v order
                                       of timm's ``reshape(B, N, 3, heads, head_dim)``)
``B.blocks.i.attn.proj``               ``layers.i.attention.out_proj``
``B.blocks.i.ls1.gamma`` / ``ls2``     ``layers.i.layer_scale1.lambda1`` / ``layer_scale2``
``B.blocks.i.mlp.fc1`` / ``fc2``       ``layers.i.mlp.fc1`` / ``fc2``; SwiGLU (timm ``SwiGLUPacked``, ViT-g):
                                       ``fc1`` halves → ``gate_proj`` / ``up_proj`` (``act(x1) · x2``,
                                       ``gate_last=False``), ``fc2`` → ``down_proj``
``B.norm``                             ``layernorm``
``q`` / ``class_head``                 ``query`` / ``class_predictor``
``mask_head.{0,2,4}``                  ``mask_head.fc{1,2,3}``
``upscale.j.{conv1,conv2,norm}``       ``upscale_block.block.j.{conv1,conv2,layernorm2d}``
``attn_mask_probs``                    ``attn_mask_probs``
``encoder.pixel_mean`` / ``_std``      the saved ``EomtImageProcessor``'s ``image_mean`` / ``image_std``
``criterion.empty_weight``             ``no_object_weight`` = its last entry (loss only)
=====================================  ====================================================================

Inferred from shapes: hidden size, layers, patch size, register tokens, image size (square ``pos_embed`` grid ×
patch), queries, labels (class head rows − 1), ``num_blocks``, upscale blocks, MLP ratio / SwiGLU. The head count is
not in any shape (``qkv`` is ``[3D, D]``): it defaults to ``D / 64`` (every DINOv2 ViT: S 6, B 12, L 16, g 24 heads)
and can be given. The check is strict: every transformers weight must come from the file and every tensor of the
file must be used, else :class:`~oodseg.models.checkpoint.CheckpointError` lists the missing / unexpected keys.

Masked-attention schedule: at eval tue-mps recomputes the mask in every query block and drops it for each query with
probability ``1 − attn_mask_probs[k]``; transformers skips blocks with probability 0 but then keeps the previous
block's mask. The two agree unless a block with probability 0 follows one with a positive probability, which tue-mps'
annealing (earlier blocks reach 0 first) never produces; such a schedule is refused.

Reading: ``torch.load(weights_only=True)`` only. Lightning pickles ``save_hyperparameters()`` output into the ``.ckpt``
(tue-mps does not ignore ``network``, so the whole ``nn.Module`` object is in ``hyper_parameters``), which the
weights-only unpickler refuses. The globals such a file names are listed statically
(``torch.serialization.get_unsafe_globals_in_checkpoint``) and allowlisted *as inert stand-ins* of our own class
(``torch.serialization.safe_globals([(stand_in, name)])``): nothing named in the file is imported or called, the
stand-ins only record their arguments, and only the tensors of ``state_dict`` are used. Modules ``torch`` blocks
(``os``, ``sys``, …) stay refused.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oodseg.models.checkpoint import CheckpointError, torch_load_reason

B = "encoder.backbone."
_NORM_KEYS = ("encoder.pixel_mean", "encoder.pixel_std")
_LOSS_KEY = "criterion.empty_weight"
_DERIVED = ("criterion.empty_weight",)  # transformers buffers set from the config, not read from the file
HEAD_DIM = 64


class _Inert:
    """Stand-in for a class or function a checkpoint's pickle names: records the arguments, runs nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def load_untrusted(path: str | Path, allow: Callable[[str], Any] | None = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with every non-allowlisted global of the file
    replaced by an inert stand-in, except those ``allow(name)`` resolves to a real object (numpy's
    array reconstruction for detectron2 files); CheckpointError (one line) on any failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    try:
        names, mmap = torch.serialization.get_unsafe_globals_in_checkpoint(str(path)), True
    except Exception:  # noqa: BLE001 - legacy (non-zip) format or not a torch file: the load below says which
        names, mmap = [], False
    real = {n: obj for n in names if allow is not None and (obj := allow(n)) is not None}
    stand_ins = [(real[n], n) if n in real else (type(f"Inert[{n}]", (_Inert,), {}), n) for n in names]
    try:  # mmap (zip files): optimizer states of a training checkpoint are never read from disk
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # garbage / truncated file or a refused pickle: one line naming the file
        reason = torch_load_reason(e)
        raise CheckpointError(path, f"cannot be read with torch.load(weights_only=True) ({reason})") from e


@dataclass(frozen=True)
class SourceState:
    """A tue-mps state dict: ``tensors`` under network-relative names (``encoder.backbone.…``, ``q.weight``, …;
    loss keys keep ``criterion.``); ``names`` maps each back to its key in the file (for messages)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    names: dict[str, str]
    prefix: str  # "network." (Lightning) or "" (the network's own state dict)

    def file_key(self, key: str) -> str:
        return self.names.get(key, self.prefix + key)

    def require(self, key: str, why: str) -> torch.Tensor:
        if key not in self.tensors:
            raise CheckpointError(self.path, f"missing key {self.file_key(key)} (needed for {why})")
        return self.tensors[key]


def read_tue_mps(path: str | Path) -> SourceState:
    """Read a tue-mps checkpoint (``{"state_dict": …}`` Lightning file or a bare state dict, keys with or without the
    ``network.`` prefix; ``._orig_mod`` of ``torch.compile`` dropped) → :class:`SourceState`."""
    path = Path(path)
    raw = load_untrusted(path)
    if isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping):
        raise CheckpointError(path, "is a detectron2 checkpoint ({'model': state_dict}): for Mask2Former use "
                                    "convert-checkpoint --format detectron2-mask2former CONFIG.yaml WEIGHTS OUT")
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(path, f"expected a Lightning checkpoint or a state dict, got {type(raw).__name__}")
    bad = [str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"state dict entries that are not tensors: {', '.join(bad[:5])}")
    clean = {re.sub(r"(^|\.)_orig_mod\.", r"\1", str(k)): str(k) for k in raw}
    if any(k.startswith("network." + B) for k in clean):
        prefix = "network."
    elif any(k.startswith(B) for k in clean):
        prefix = ""
    else:
        shown = ", ".join(list(clean)[:4])
        raise CheckpointError(path, f"not a tue-mps/eomt checkpoint: no 'network.{B}*' keys (found {shown}, ...)")
    tensors, names = {}, {}
    for key, original in clean.items():
        rel = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        tensors[rel], names[rel] = raw[original], original
    if any(k.startswith((B + "rope_embeddings", B + "blocks.0.attention.")) for k in tensors):
        raise CheckpointError(
            path,
            "tue-mps EoMT with a DINOv3 (transformers, RoPE) backbone is not supported: "
            "EomtForUniversalSegmentation is the DINOv2/timm architecture",
        )
    return SourceState(path, tensors, names, prefix)


def _count(state: SourceState, prefix: str) -> int:
    """``1 + max i`` over keys ``prefix.i.…`` (0 if none): a missing middle entry then shows as missing keys."""
    found = [int(m.group(1)) for k in state.tensors if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def _swiglu_hidden(dim: int, ratio: int) -> int:
    """transformers' ``EomtSwiGLUFFN`` width: ``int(D·ratio)`` → two thirds, rounded up to a multiple of 8."""
    return (int(int(dim * ratio) * 2 / 3) + 7) // 8 * 8


def _mlp_shape(state: SourceState, dim: int) -> tuple[int, bool]:
    """``(mlp_ratio, use_swiglu_ffn)`` from block 0's ``fc1`` / ``fc2`` (packed SwiGLU: ``fc1`` is twice as wide)."""
    fc1 = state.require(B + "blocks.0.mlp.fc1.weight", "the MLP width")
    fc2 = state.require(B + "blocks.0.mlp.fc2.weight", "the MLP width")
    out1, in2 = int(fc1.shape[0]), int(fc2.shape[1])
    if out1 == in2 and out1 % dim == 0:
        return out1 // dim, False
    if out1 == 2 * in2:
        ratio = next((r for r in range(1, 17) if _swiglu_hidden(dim, r) == in2), None)
        if ratio is not None:
            return ratio, True
    raise CheckpointError(
        state.path,
        f"MLP fc1 {list(fc1.shape)} / fc2 {list(fc2.shape)} fit no transformers EoMT "
        "MLP (integer ratio) or SwiGLU width",
    )


def _image_size(state: SourceState, patch: int, image_size: int | None) -> int:
    """The training image size: ``pos_embed`` must be a square grid of patches; a given size must fit it."""
    path = state.path
    positions = int(state.require(B + "pos_embed", "the image size").shape[-2])
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise CheckpointError(path, f"pos_embed has {positions} positions, not a square patch grid (non-square "
                                    "training size, or class-token positions: only no_embed_class ViTs are supported)")
    if image_size is None:
        return grid * patch
    if image_size % patch or (image_size // patch) ** 2 != positions:
        raise CheckpointError(path, f"--image-size {image_size} does not fit pos_embed ({positions} positions of "
                                    f"patch {patch}: image size {grid * patch})")
    return int(image_size)


def infer_config(
    state: SourceState, *, image_size: int | None = None, num_heads: int | None = None, layer_norm_eps: float = 1e-6
) -> Any:
    """The ``EomtConfig`` of ``state`` from tensor shapes; ``image_size`` (default: the square ``pos_embed`` grid ×
    patch size) must fit ``pos_embed``; ``num_heads`` defaults to ``hidden / 64``."""
    from transformers import EomtConfig

    path = state.path
    dim = int(state.require(B + "cls_token", "the hidden size").shape[-1])
    registers = int(state.require(B + "reg_token", "the register tokens (transformers' EoMT needs them)").shape[1])
    proj = state.require(B + "patch_embed.proj.weight", "the patch size")
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(path, f"patch_embed.proj.weight {list(proj.shape)} is not a square-patch conv")
    patch = int(proj.shape[-1])
    image_size = _image_size(state, patch, image_size)
    heads = num_heads or (dim // HEAD_DIM if dim % HEAD_DIM == 0 else 0)
    if heads <= 0 or dim % heads:
        raise CheckpointError(path, f"hidden size {dim} is not a multiple of {HEAD_DIM}: give num_heads (--num-heads)")
    layers = _count(state, B + "blocks")
    blocks = int(state.require("attn_mask_probs", "num_blocks").numel())
    if not 0 < blocks <= layers:
        raise CheckpointError(path, f"{layers} ViT blocks and {blocks} query blocks (attn_mask_probs) do not fit")
    classes = int(state.require("class_head.weight", "the number of labels").shape[0]) - 1
    ratio, swiglu = _mlp_shape(state, dim)
    state.require("upscale.0.conv1.weight", "the upscale blocks")
    extra: dict[str, Any] = {}
    if _LOSS_KEY in state.tensors:
        weight = state.tensors[_LOSS_KEY]
        if weight.numel() != classes + 1:
            raise CheckpointError(
                path, f"{state.file_key(_LOSS_KEY)} has {weight.numel()} entries, the class head {classes + 1}"
            )
        extra["no_object_weight"] = float(weight[-1])
    return EomtConfig(
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=int(image_size),
        patch_size=patch,
        num_register_tokens=registers,
        num_queries=int(state.require("q.weight", "the number of queries").shape[0]),
        num_labels=classes,
        num_blocks=blocks,
        num_upscale_blocks=_count(state, "upscale"),
        mlp_ratio=ratio,
        use_swiglu_ffn=swiglu,
        layer_norm_eps=float(layer_norm_eps),
        **extra,
    )


def _pairs(src: str, dst: str, leaves: Sequence[str] = ("weight", "bias")) -> dict[str, tuple[str, ...]]:
    return {f"{src}.{leaf}": (f"{dst}.{leaf}",) for leaf in leaves}


def key_map(config: Any) -> dict[str, tuple[str, ...]]:
    """tue-mps (network-relative) key → transformers key(s); several targets = the source is split along dim 0."""
    table: dict[str, tuple[str, ...]] = {
        B + "cls_token": ("embeddings.cls_token",),
        B + "reg_token": ("embeddings.register_tokens",),
        B + "pos_embed": ("embeddings.position_embeddings.weight",),
        "q.weight": ("query.weight",),
        "attn_mask_probs": ("attn_mask_probs",),
        **_pairs(B + "patch_embed.proj", "embeddings.patch_embeddings.projection"),
        **_pairs(B + "norm", "layernorm"),
        **_pairs("class_head", "class_predictor"),
    }
    for n, idx in enumerate((0, 2, 4), start=1):
        table.update(_pairs(f"mask_head.{idx}", f"mask_head.fc{n}"))
    for j in range(config.num_upscale_blocks):
        src, dst = f"upscale.{j}", f"upscale_block.block.{j}"
        table.update(_pairs(f"{src}.conv1", f"{dst}.conv1"))
        table.update(_pairs(f"{src}.conv2", f"{dst}.conv2", ("weight",)))
        table.update(_pairs(f"{src}.norm", f"{dst}.layernorm2d"))
    for i in range(config.num_hidden_layers):
        src, dst = f"{B}blocks.{i}", f"layers.{i}"
        for leaf in ("weight", "bias"):
            table[f"{src}.attn.qkv.{leaf}"] = tuple(f"{dst}.attention.{p}_proj.{leaf}" for p in "qkv")
            if config.use_swiglu_ffn:
                table[f"{src}.mlp.fc1.{leaf}"] = (f"{dst}.mlp.gate_proj.{leaf}", f"{dst}.mlp.up_proj.{leaf}")
                table[f"{src}.mlp.fc2.{leaf}"] = (f"{dst}.mlp.down_proj.{leaf}",)
        if not config.use_swiglu_ffn:
            table.update(_pairs(f"{src}.mlp.fc1", f"{dst}.mlp.fc1"))
            table.update(_pairs(f"{src}.mlp.fc2", f"{dst}.mlp.fc2"))
        table.update(_pairs(f"{src}.attn.proj", f"{dst}.attention.out_proj"))
        table.update(_pairs(f"{src}.norm1", f"{dst}.norm1"))
        table.update(_pairs(f"{src}.norm2", f"{dst}.norm2"))
        table[f"{src}.ls1.gamma"] = (f"{dst}.layer_scale1.lambda1",)
        table[f"{src}.ls2.gamma"] = (f"{dst}.layer_scale2.lambda1",)
    return table


def _fmt(keys: Sequence[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_schedule(state: SourceState) -> None:
    """Refuse a probability-0 query block after a positive one (transformers would reuse a stale mask there)."""
    probs = state.tensors["attn_mask_probs"].flatten().tolist()
    stale = [k for k in range(len(probs)) if probs[k] == 0 and any(p > 0 for p in probs[:k])]
    if stale:
        raise CheckpointError(
            state.path,
            f"attn_mask_probs {probs}: query block(s) {stale} have probability 0 after a "
            "masked block, which transformers' EoMT evaluates with a stale mask",
        )


def convert_state_dict(state: SourceState, config: Any, own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map ``state`` onto the transformers state dict ``own`` (names/shapes); strict."""
    table = key_map(config)
    consumed = set(table) | set(_NORM_KEYS) | {_LOSS_KEY}
    missing = [f"{state.file_key(k)} (→ {', '.join(v)})" for k, v in table.items() if k not in state.tensors]
    missing += [state.file_key(k) for k in _NORM_KEYS if k not in state.tensors]
    unexpected = [state.file_key(k) for k in state.tensors if k not in consumed]
    if missing or unexpected:
        parts = [f"{len(missing)} missing key(s): {_fmt(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected key(s): {_fmt(unexpected)}"] if unexpected else []
        raise CheckpointError(state.path, "does not fit the tue-mps EoMT layout: " + "; ".join(parts))
    out: dict[str, torch.Tensor] = {}
    for src, dsts in table.items():
        tensor = state.tensors[src]
        if src == B + "pos_embed" and tensor.ndim == 3:
            tensor = tensor[0]
        parts_ = tensor.chunk(len(dsts), dim=0) if len(dsts) > 1 else (tensor,)
        out.update(zip(dsts, parts_))
    unfilled = sorted(set(own) - set(out) - set(_DERIVED))
    surplus = sorted(set(out) - set(own))
    mismatched = [
        f"{k} ({list(out[k].shape)} vs {list(own[k].shape)})" for k in out if k in own and out[k].shape != own[k].shape
    ]
    if unfilled or surplus or mismatched:
        raise CheckpointError(
            state.path,
            f"does not fill transformers' EoMT: unfilled {_fmt(unfilled) or '-'}; "
            f"unknown {_fmt(surplus) or '-'}; shape mismatches {_fmt(mismatched) or '-'}",
        )
    return {k: v.contiguous() for k, v in out.items()}


def convert_checkpoint(
    src: str | Path,
    dst_dir: str | Path,
    *,
    image_size: int | None = None,
    num_heads: int | None = None,
    layer_norm_eps: float = 1e-6,
) -> Path:
    """tue-mps checkpoint ``src`` → transformers directory ``dst_dir`` (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json`` with the checkpoint's ``pixel_mean`` / ``pixel_std``). Returns ``dst_dir``.

    Args:
        src: Lightning ``.ckpt`` or bare state dict (``pytorch_model.bin``), read with ``weights_only=True``.
        dst_dir: output directory, created if needed; files already in it are overwritten.
        image_size: square input size in pixels; None: the ``pos_embed`` grid × patch size.
        num_heads: attention heads; None: hidden size / 64.
        layer_norm_eps: LayerNorm epsilon (timm ViT: 1e-6).
    """
    from transformers import EomtForUniversalSegmentation, EomtImageProcessor

    state = read_tue_mps(src)
    config = infer_config(state, image_size=image_size, num_heads=num_heads, layer_norm_eps=layer_norm_eps)
    _check_schedule(state)
    model = EomtForUniversalSegmentation(config).eval()
    weights = convert_state_dict(state, config, model.state_dict())
    model.load_state_dict(weights, strict=False)  # strictness checked above; only _DERIVED buffers stay as built
    mean, std = (state.tensors[k].flatten().tolist() for k in _NORM_KEYS)
    if len(mean) != 3 or len(std) != 3:
        raise CheckpointError(state.path, f"pixel_mean / pixel_std must hold 3 values, got {len(mean)} / {len(std)}")
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst))
    size = {"shortest_edge": config.image_size, "longest_edge": None}
    EomtImageProcessor(image_mean=mean, image_std=std, size=size, do_split_image=True).save_pretrained(str(dst))
    return dst


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m oodseg convert-checkpoint [--format tue-mps-eomt]",
        description="Convert a tue-mps/eomt checkpoint (Lightning .ckpt or pytorch_model.bin) to a transformers "
        "EomtForUniversalSegmentation directory for the eomt model (pretrained=OUT).",
    )
    p.add_argument("src", metavar="IN", help="tue-mps checkpoint file")
    p.add_argument("dst", metavar="OUT", help="output directory (created; files in it are overwritten)")
    p.add_argument("--image-size", type=int, default=None, help="square input size S (default: from pos_embed)")
    p.add_argument("--num-heads", type=int, default=None, help=f"attention heads (default: hidden size / {HEAD_DIM})")
    p.add_argument("--layer-norm-eps", type=float, default=1e-6, help="LayerNorm epsilon (timm ViT: 1e-6)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``convert-checkpoint IN OUT [--image-size N] [--num-heads N] [--layer-norm-eps F]``; exit 0 / 2."""
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or a usage error (2): return the code instead of exiting
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        dst = convert_checkpoint(
            args.src, args.dst, image_size=args.image_size, num_heads=args.num_heads, layer_norm_eps=args.layer_norm_eps
        )
    except (CheckpointError, OSError) as e:  # a bad input file, or an output directory that cannot be written
        print(f"error: {e}", file=sys.stderr)  # the one-line form of oodseg.platform.cli
        return 2
    from transformers import EomtConfig

    c = EomtConfig.from_pretrained(str(dst))
    print(
        f"wrote {dst}: EoMT {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
        f"{c.num_queries} queries, {c.num_labels} classes, image {c.image_size}, patch {c.patch_size}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
