"""Convert detectron2 Mask2Former checkpoints (``config.yaml`` + ``model_final.pth``: facebookresearch/Mask2Former,
RbA's model zoo and the methods built on them) to a transformers ``Mask2FormerForUniversalSegmentation`` directory
that :class:`oodseg.models.mask2former.Mask2Former` loads with ``pretrained=<dir>``.

Config (:class:`~oodseg.models.detectron2_config.D2Config`, ``_BASE_`` resolved): backbone ``D2SwinTransformer``
(``MODEL.SWIN``: embed dim, depths, heads, window, patch size, MLP ratio) or ``build_resnet_backbone``
(``MODEL.RESNETS``: depth 50/101, BN / SyncBN / FrozenBN, ``STRIDE_IN_1X1``); ``MSDeformAttnPixelDecoder``
(``CONVS_DIM``, ``MASK_DIM``, ``TRANSFORMER_ENC_LAYERS``, ``DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES`` → the feature
level count, 3 upstream, 1 in RbA's ``*_1dl`` models); ``MultiScaleMaskedTransformerDecoder`` (``DEC_LAYERS`` =
transformers' ``decoder_layers``: the reference builds ``DEC_LAYERS − 1`` layers plus the prediction on the learned
queries, and so does transformers; ``NUM_OBJECT_QUERIES``, ``HIDDEN_DIM``, ``NHEADS``, ``DIM_FEEDFORWARD``,
``PRE_NORM``); ``NUM_CLASSES``; loss weights; ``PIXEL_MEAN`` / ``PIXEL_STD`` (0..255) and ``INPUT.FORMAT`` (a ``BGR``
model gets its first convolution's input channels and the statistics reversed, so it takes RGB); ``MIN_SIZE_TEST`` /
``MAX_SIZE_TEST`` and ``SIZE_DIVISIBILITY`` (saved in ``preprocessor_config.json``). Any other value of these keys is
refused in one line naming it.

Key mapping (detectron2 → transformers; ``E = model.pixel_level_module.encoder.``, ``PD = model.pixel_level_module.
decoder.``, ``TM = model.transformer_module.``), see :func:`key_map`: Swin ``backbone.patch_embed.{proj,norm}`` →
``E.swin.embeddings.{patch_embeddings.projection,norm}``, ``backbone.layers.i.blocks.j.{norm1, attn.qkv (rows split
q/k/v), attn.proj, attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}`` → ``…{layernorm_before,
attention.{q,k,v}_proj, attention.o_proj, attention.relative_position_bias.relative_position_bias_table,
layernorm_after, mlp.fc1, mlp.fc2}``, ``layers.i.downsample`` → same, ``backbone.norm{i}`` →
``E.hidden_states_norms.stage{i+1}`` (``relative_position_index`` is checked against the one transformers computes);
ResNet ``backbone.stem.conv1[.norm]`` → ``E.embedder.embedder.{convolution,normalization}``,
``backbone.res{s+2}.b.{shortcut,conv1,conv2,conv3}[.norm]`` → ``E.encoder.stages.s.layers.b.{shortcut,layer.0,
layer.1,layer.2}.{convolution,normalization}``; pixel decoder ``input_proj.i`` → ``PD.input_projections.i``,
``transformer.level_embed`` → ``PD.level_embed``, ``transformer.encoder.layers.j.{self_attn.*, norm1, linear1,
linear2, norm2}`` → ``PD.encoder.layers.j.{self_attn.*, self_attn_layer_norm, fc1, fc2, final_layer_norm}``,
``mask_features`` → ``PD.mask_projection``, ``{adapter,layer}_k[.norm]`` → ``PD.{adapter,layer}_k.{0,1}``; predictor
``transformer_self_attention_layers.i.{self_attn.in_proj (split q/k/v), self_attn.out_proj, norm}`` →
``TM.decoder.layers.i.{self_attn.{q,k,v}_proj, self_attn.out_proj, self_attn_layer_norm}``,
``transformer_cross_attention_layers.i.{multihead_attn, norm}`` → ``…{cross_attn, cross_attn_layer_norm}``,
``transformer_ffn_layers.i.{linear1, linear2, norm}`` → ``…{fc1, fc2, final_layer_norm}``, ``decoder_norm`` →
``TM.decoder.layernorm``, ``query_feat`` / ``query_embed`` / ``level_embed`` → ``TM.queries_features`` /
``queries_embedder`` / ``level_embed``, ``input_proj.i`` → ``TM.input_projections.i``, ``class_embed`` →
``class_predictor``, ``mask_embed.layers.k`` → ``TM.decoder.mask_predictor.mask_embedder.k.0``;
``criterion.empty_weight`` is checked for its length (the loss's no-object weight comes from ``NO_OBJECT_WEIGHT``).
``MASK_FORMER.DROPOUT`` becomes ``dropout``, which transformers also uses as the decoder's layer-drop probability in
training (the Cityscapes configs set 0). Strict: every transformers tensor must come from
the file and every tensor of the file must be used.

Reading: :func:`oodseg.models.detectron2_weights.read_detectron2_weights` (``.pth`` weights-only, ``.pkl`` numpy-only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from oodseg.models.checkpoint import CheckpointError
from oodseg.models.detectron2_config import D2Config
from oodseg.models.detectron2_weights import read_detectron2_weights
from oodseg.models.mask2former_arch import build_hf
from oodseg.models.mask2former_keys import PD, Converted, E, derived_keys, hf_config_from_d2, key_map

FORMAT = "detectron2-mask2former"
def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """detectron2 ``model_final.pth`` / model-zoo ``.pkl`` of a Mask2Former → ``{key: tensor}``."""
    return read_detectron2_weights(path, "sem_seg_head.predictor.", "Mask2Former")


def _fmt(keys: Sequence[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_state_dict(
    path: Path, state: Mapping[str, torch.Tensor], conv: Converted, hf: Any
) -> dict[str, torch.Tensor]:
    """Map ``state`` onto ``hf``'s state dict through :func:`key_map` (qkv rows split, level embeddings reshaped;
    BGR models get RGB first convolutions); CheckpointError naming the file for any missing, unexpected, unfilled
    or mis-shaped key, so nothing loads half-converted."""
    table = key_map(conv)
    missing = [k for k in table if k not in state and k != "criterion.empty_weight"]
    unexpected = [k for k in state if k not in table]
    if missing or unexpected:
        parts = [f"{len(missing)} missing key(s): {_fmt(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected key(s): {_fmt(unexpected)}"] if unexpected else []
        raise CheckpointError(path, "does not fit its config.yaml: " + "; ".join(parts))
    own = hf.state_dict()
    buffers = dict(hf.named_buffers())
    out: dict[str, torch.Tensor] = {}
    for src, dsts in table.items():
        if not dsts:
            continue
        tensor = state[src]
        if src in ("backbone.patch_embed.proj.weight", "backbone.stem.conv1.weight") and conv.bgr:
            tensor = tensor.flip(1)  # BGR → RGB input channels
        if src.endswith("level_embed") and tensor.ndim == 2 and dsts[0].startswith(PD):
            tensor = tensor.reshape(own[dsts[0]].shape)
        out.update(zip(dsts, tensor.chunk(len(dsts), dim=0) if len(dsts) > 1 else (tensor,)))
    for src in (k for k, v in table.items() if not v and k.endswith("relative_position_index")):
        ours = buffers[src.replace("backbone.layers.", f"{E}swin.encoder.layers.").replace(
            ".attn.", ".attention.relative_position_bias.")]
        if state[src].numel() != ours.numel() or not torch.equal(state[src].flatten().to(ours.dtype), ours.flatten()):
            raise CheckpointError(path, f"{src} is not Swin's relative-position index for window "
                                        f"{conv.config.backbone_config.window_size}")
    _check_filled(path, out, own, conv)
    _check_no_object(path, state, conv)
    return {k: v.contiguous() for k, v in out.items()}


def _check_filled(
    path: Path, out: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], conv: Converted
) -> None:
    derived = derived_keys(conv) | ({k for k in own if k.endswith("num_batches_tracked")} if conv.frozen_bn else set())
    unfilled = sorted(set(own) - set(out) - derived)
    surplus = sorted(set(out) - set(own))
    shapes = [f"{k} ({list(out[k].shape)} vs {list(own[k].shape)})" for k in out if k in own
              and out[k].shape != own[k].shape]
    if unfilled or surplus or shapes:
        raise CheckpointError(path, f"does not fill transformers' Mask2Former: unfilled {_fmt(unfilled) or '-'}; "
                                    f"unknown {_fmt(surplus) or '-'}; shape mismatches {_fmt(shapes) or '-'}")


def _check_no_object(path: Path, state: Mapping[str, torch.Tensor], conv: Converted) -> None:
    weight = state.get("criterion.empty_weight")
    classes = conv.config.num_labels + 1
    if weight is not None and weight.numel() != classes:
        raise CheckpointError(path, f"criterion.empty_weight has {weight.numel()} entries, the class head {classes}")


def resolve_inputs(src: Sequence[str]) -> tuple[Path, Path]:
    """``[model_dir]`` (``config.yaml`` + ``model_final.pth`` in it) or ``[config.yaml, weights]`` → the two paths."""
    if len(src) == 1:
        folder = Path(src[0])
        if not folder.is_dir():
            raise CheckpointError(folder, "give a detectron2 model directory (config.yaml + model_final.pth) or "
                                          "CONFIG WEIGHTS")
        weights = [folder / n for n in ("model_final.pth", "model_final.pkl") if (folder / n).is_file()]
        if not (folder / "config.yaml").is_file() or not weights:
            raise CheckpointError(folder, "needs config.yaml and model_final.pth (or .pkl)")
        return folder / "config.yaml", weights[0]
    config, weights = (Path(p) for p in src)
    if config.suffix not in (".yaml", ".yml"):
        raise CheckpointError(config, "the first input must be the detectron2 config.yaml")
    return config, weights


def convert_checkpoint(src: Sequence[str | Path], dst_dir: str | Path) -> Path:
    """detectron2 model (``[dir]`` or ``[config.yaml, model_final.pth]``) → transformers directory ``dst_dir``
    (``config.json``, ``model.safetensors``, ``preprocessor_config.json``). Returns ``dst_dir``."""
    from transformers import Mask2FormerImageProcessor

    config_path, weights_path = resolve_inputs([str(p) for p in src])
    conv = hf_config_from_d2(D2Config(config_path))
    state = read_weights(weights_path)
    hf = build_hf(conv.config).eval()
    weights = convert_state_dict(weights_path, state, conv, hf)
    hf.load_state_dict(weights, strict=False)  # strictness checked above; derived tensors stay as built
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(dst))
    size = {"shortest_edge": conv.test_size[0], "longest_edge": conv.test_size[1]} if conv.test_size else None
    Mask2FormerImageProcessor(
        image_mean=[v / 255.0 for v in conv.mean], image_std=[v / 255.0 for v in conv.std], size=size,
        size_divisor=conv.size_divisibility, ignore_index=conv.config.ignore_value,
    ).save_pretrained(str(dst))
    return dst


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m oodseg convert-checkpoint --format {FORMAT}",
        description="Convert a detectron2 Mask2Former checkpoint (facebookresearch/Mask2Former, RbA's model zoo: "
        "config.yaml + model_final.pth, _BASE_ resolved; .pkl model-zoo files read as numpy arrays only) to a "
        "transformers Mask2FormerForUniversalSegmentation directory for the mask2former model (pretrained=OUT).",
    )
    p.add_argument("paths", metavar="IN", nargs="+",
                   help="MODEL_DIR (with config.yaml + model_final.pth) or CONFIG.yaml WEIGHTS.pth, then OUT")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``convert-checkpoint --format detectron2-mask2former (MODEL_DIR | CONFIG WEIGHTS) OUT``; exit 0 / 2."""
    try:
        args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    if len(args.paths) not in (2, 3):
        print("error: give MODEL_DIR OUT or CONFIG.yaml WEIGHTS OUT", file=sys.stderr)
        return 2
    try:
        dst = convert_checkpoint(args.paths[:-1], args.paths[-1])
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from transformers import Mask2FormerConfig

    c = Mask2FormerConfig.from_pretrained(str(dst))
    print(f"wrote {dst}: Mask2Former {c.backbone_config.model_type} backbone, {c.decoder_layers} decoder layers, "
          f"{c.num_queries} queries, {c.num_labels} classes, {getattr(c, 'num_feature_levels', 3)} feature level(s)")
    return 0
