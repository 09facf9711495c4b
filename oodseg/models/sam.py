"""Segment Anything (Kirillov et al., ICCV 2023) as a promptable segmenter, through transformers' ``SamModel``.

:class:`SamSegmenter` is the ``SamPredictor`` of the original code (``facebookresearch/segment-anything:
segment_anything/predictor.py``) rebuilt on transformers: the image is encoded once (:meth:`SamSegmenter.embed`
→ :class:`SamImage`) and every prompt batch reuses that embedding.

* Preprocessing is the checkpoint's ``SamImageProcessor`` (resize so the longest side is ``size["longest_edge"]``,
  ImageNet normalisation, zero-pad bottom/right to ``pad_size``), so embeddings equal those of the reference
  ``SamProcessor`` + ``SamModel`` path.
* Prompts are given in original-image pixels and rescaled to the resized frame exactly as ``SamProcessor`` does
  (``x · w'/W``, ``y · h'/H`` with ``(h', w')`` the resized size); the prompt encoder adds the half-pixel shift.
* Masks come back at the original resolution through ``SamImageProcessor.post_process_masks`` (bilinear to the pad
  size, crop the valid region, bilinear to ``H × W``; logit > 0 is the mask).
* The IoU-token output of the mask decoder (not a ``SamModel`` output) is read with a forward pre-hook on
  ``mask_decoder.iou_prediction_head``; SAOM's class head consumes it (``mariiak2021/SAOMv1-SAOMv2-and-PanoSAM:
  per_segment_anything/samwrapperpano.py``, where the modified decoder returns ``iou_token_out``).

Sources (:func:`create_sam`): ``"tiny"`` (random tiny config for tests and demos), a hub id / local transformers
directory (``from_pretrained``; ``HF_HUB_OFFLINE=1`` → ``local_files_only``), a self-describing ``.safetensors``
written by :func:`save_sam` (header key ``oodseg.sam`` = :meth:`SamSegmenter.export_cfg` as JSON), or a
segment-anything-format ``.pth`` / ``.pt`` (``sam_vit_{b,l,h}_*.pth``, SAOM's fine-tuned checkpoints), converted by
:mod:`oodseg.models.sam_convert` (key mapping and size inference are documented there).

Such a ``.pth`` SAM preprocesses as ``segment_anything.SamPredictor.set_image`` does, so its masks equal the
reference's (``tests/test_sam_convert.py``): PIL bilinear resize of the uint8 image to longest side ``image_size``
(``ResizeLongestSide.apply_image``, through ``SamImageProcessorPil``), ImageNet mean/std (SAM's ``pixel_mean`` /
``pixel_std`` / 255), zero padding after normalisation. The default ``SamImageProcessor`` resizes with torchvision's
antialiased bilinear instead, which differs by a grey level here and there; ``export_cfg()["resize"]`` records which
(``"pil"`` / ``"torchvision"``) so a fine-tuned export keeps its preprocessing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oodseg.models.checkpoint import CheckpointError, load_checkpoint, read_safetensors_metadata
from oodseg.models.sam_convert import check_converted, convert_state_dict, read_segment_anything, sam_config

META_SAM = "oodseg.sam"


@dataclass(frozen=True, eq=False)
class SamImage:
    """One encoded image: ``embeddings`` ``[1, C, h, w]``, ``original_size`` ``(H, W)``, ``input_size`` ``(h', w')``
    = the resized size inside the padded square input."""

    embeddings: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def tiny_sam_config(image_size: int = 128, hidden: int = 32, layers: int = 2, heads: int = 2) -> Any:
    """A small random ``SamConfig`` (patch 16, windowed + one global attention layer; research note §D rules:
    equal hidden sizes in encoder neck, prompt encoder and decoder, ``num_pos_feats = hidden / 2``)."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    if image_size % 16 or image_size <= 0:
        raise ValueError(f"tiny SAM: image_size must be a positive multiple of the patch size 16, got {image_size}")
    if hidden % 8 or hidden % heads:
        raise ValueError(f"tiny SAM: hidden={hidden} must be divisible by 8 and by heads={heads}")
    window = min(4, image_size // 16)
    return SamConfig(
        vision_config=SamVisionConfig(hidden_size=hidden, output_channels=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, image_size=image_size, patch_size=16,
                                      window_size=window, global_attn_indexes=(layers - 1,),
                                      num_pos_feats=hidden // 2, mlp_dim=2 * hidden),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=hidden, image_size=image_size, patch_size=16,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=hidden, mlp_dim=2 * hidden, num_hidden_layers=2,
                                                 num_attention_heads=heads, iou_head_hidden_dim=hidden),
    )


RESIZE_BACKENDS = ("torchvision", "pil")


def _image_processor(image_size: int, pad_size: tuple[int, int] | list[int], image_mean: Any = None,
                     image_std: Any = None, resize: str = "torchvision") -> Any:
    """The processor that resizes to longest side ``image_size``, normalises and pads to ``pad_size``: torchvision's
    antialiased resize, or ``resize="pil"`` segment-anything's PIL bilinear one (equal masks for ``.pth`` SAMs)."""
    from transformers import SamImageProcessor, SamImageProcessorPil

    if resize not in RESIZE_BACKENDS:
        raise ValueError(f"SAM resize must be one of {RESIZE_BACKENDS}, got {resize!r}")
    kw: dict[str, Any] = {}
    if image_mean is not None:
        kw["image_mean"] = [float(v) for v in image_mean]
    if image_std is not None:
        kw["image_std"] = [float(v) for v in image_std]
    cls = SamImageProcessorPil if resize == "pil" else SamImageProcessor
    return cls(size={"longest_edge": int(image_size)}, pad_size={"height": int(pad_size[0]), "width": int(pad_size[1])},
               **kw)


def to_input_frame(coords: torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int]) -> torch.Tensor:
    """Original-pixel ``(..., 2)`` xy (boxes: ``(..., 4)`` xyxy) → resized-frame pixels, as
    ``SamProcessor._normalize_coordinates``: ``x · w'/W``, ``y · h'/H``."""
    (oh, ow), (ih, iw) = original_size, input_size
    scale = torch.tensor([iw / ow, ih / oh], dtype=coords.dtype, device=coords.device)
    if coords.shape[-1] == 4:
        scale = scale.repeat(2)
    return coords * scale


class SamSegmenter(nn.Module):
    """``SamModel`` + its image processor, with embedding reuse and chunked prompt batches."""

    def __init__(self, model: Any, processor: Any, prompt_batch: int = 64) -> None:
        super().__init__()
        if int(prompt_batch) < 1:
            raise ValueError(f"prompt_batch must be ≥ 1, got {prompt_batch}")
        self.model = model
        self.processor = processor  # SamProcessor (its .image_processor does the pixel work)
        self.prompt_batch = int(prompt_batch)

    # -- construction / export -------------------------------------------------------------------------------------
    @classmethod
    def from_export(cls, cfg: Mapping[str, Any]) -> SamSegmenter:
        """A randomly initialised segmenter with the architecture and preprocessing of ``export_cfg()``."""
        from transformers import SamConfig, SamModel, SamProcessor

        known = {"config", "image_size", "pad_size", "image_mean", "image_std", "resize", "prompt_batch"}
        if "config" not in cfg or set(cfg) - known:
            raise ValueError(f"SAM export cfg needs 'config' and only keys {sorted(known)}; got {sorted(cfg)}")
        config = SamConfig.from_dict(dict(cfg["config"]))
        size = int(cfg.get("image_size", config.vision_config.image_size))
        pad = cfg.get("pad_size", (size, size))
        proc = _image_processor(size, pad, cfg.get("image_mean"), cfg.get("image_std"),
                                cfg.get("resize", "torchvision"))
        return cls(SamModel(config).eval(), SamProcessor(image_processor=proc), cfg.get("prompt_batch", 64))

    def export_cfg(self) -> dict[str, Any]:
        """JSON-able dict that :meth:`from_export` turns back into the same architecture (no download)."""
        from transformers import SamImageProcessorPil

        ip = self.image_processor
        return {
            "config": self.model.config.to_dict(),
            "image_size": int(ip.size["longest_edge"]),
            "pad_size": [int(ip.pad_size["height"]), int(ip.pad_size["width"])],
            "image_mean": [float(v) for v in ip.image_mean],
            "image_std": [float(v) for v in ip.image_std],
            "resize": "pil" if isinstance(ip, SamImageProcessorPil) else "torchvision",
            "prompt_batch": self.prompt_batch,
        }

    @property
    def image_processor(self) -> Any:
        return self.processor.image_processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_size(self) -> tuple[int, int]:
        return int(self.image_processor.pad_size["height"]), int(self.image_processor.pad_size["width"])

    @property
    def hidden_size(self) -> int:
        """Width of the decoder tokens (the IoU token a SAOM class head reads)."""
        return int(self.model.config.mask_decoder_config.hidden_size)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Partition of the parameters: ``encoder`` (vision encoder + neck), ``prompt_points`` (label embeddings of
        points/box corners and the padding-point embedding), ``prompt_other`` (no-mask and mask-input embeddings),
        ``positional`` (the random Fourier matrix shared by image and prompt positional encodings; a fixed buffer in
        the original SAM), ``decoder`` (mask decoder without its IoU head), ``iou_head``."""
        m = self.model
        pe = m.prompt_encoder
        iou = list(m.mask_decoder.iou_prediction_head.parameters())
        iou_ids = {id(p) for p in iou}
        return {
            "encoder": list(m.vision_encoder.parameters()),
            "prompt_points": [*pe.point_embed.parameters(), *pe.not_a_point_embed.parameters()],
            "prompt_other": [*pe.no_mask_embed.parameters(), *pe.mask_embed.parameters()],
            "positional": [m.shared_image_embedding.positional_embedding],
            "decoder": [p for p in m.mask_decoder.parameters() if id(p) not in iou_ids],
            "iou_head": iou,
        }

    # -- image --------------------------------------------------------------------------------------------------------
    def embed(self, image: np.ndarray, grad: bool = False) -> SamImage:
        """Preprocess (the image processor, on CPU) and encode one uint8 ``[H, W, 3]`` RGB image.

        ``grad=False`` (default) encodes under ``no_grad`` (SAM and SAOM keep the encoder frozen); ``grad=True`` keeps
        the graph so an encoder can be trained (from-scratch demos)."""
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"SAM embed: image must be uint8 [H, W, 3] RGB, got {arr.dtype} {tuple(arr.shape)}")
        enc = self.image_processor(images=arr, input_data_format="channels_last", return_tensors="pt")
        pixels = enc["pixel_values"].to(self.device, dtype=next(self.model.parameters()).dtype)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            emb = self.model.vision_encoder(pixels).last_hidden_state
        orig = tuple(int(v) for v in enc["original_sizes"][0])
        inp = tuple(int(v) for v in enc["reshaped_input_sizes"][0])
        return SamImage(emb, (orig[0], orig[1]), (inp[0], inp[1]))

    def upsample(self, img: SamImage, low_res: torch.Tensor) -> torch.Tensor:
        """Low-resolution mask logits ``[K, M, h, w]`` → ``[K, M, H, W]`` at the original size (differentiable)."""
        return self.image_processor.post_process_masks([low_res], [img.original_size], [img.input_size],
                                                       binarize=False)[0]

    # -- prompts ------------------------------------------------------------------------------------------------------
    def _as_tensor(self, x: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(self.device, dtype)

    @torch.no_grad()
    def masks_from_boxes(self, img: SamImage, boxes: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per xyxy box (original pixels), ``multimask_output=False`` (S2M's call): bool ``[K, H, W]`` and
        predicted IoU ``[K]``, on the model's device; prompts run in chunks of ``prompt_batch``."""
        logits, ious = self.mask_logits_from_boxes(img, boxes)
        return logits[:, 0] > 0, ious[:, 0]

    def mask_logits_from_boxes(self, img: SamImage, boxes: np.ndarray | torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        """Box prompts ``[K, 4]`` xyxy (original pixels) → mask logits ``[K, 1, H, W]`` at the original size
        (differentiable) and predicted IoU ``[K, 1]``."""
        b = self._as_tensor(boxes, torch.float32)
        if b.ndim != 2 or b.shape[-1] != 4:
            raise ValueError(f"boxes must be [K, 4] xyxy, got {tuple(b.shape)}")
        h, w = img.original_size
        if b.shape[0] == 0:
            z = img.embeddings.new_zeros
            return z(0, 1, h, w), z(0, 1)
        b = to_input_frame(b, img.original_size, img.input_size)
        logits, ious = [], []
        for chunk in b.split(self.prompt_batch):
            out = self.model(image_embeddings=img.embeddings, input_boxes=chunk[None], multimask_output=False)
            logits.append(self.upsample(img, out.pred_masks[0]))
            ious.append(out.iou_scores[0])
        return torch.cat(logits), torch.cat(ious)

    @contextmanager
    def _capture_iou_token(self) -> Iterator[list[torch.Tensor]]:
        """Collect the mask decoder's IoU-token output ``[B, k, D]`` (input of ``iou_prediction_head``) per call."""
        seen: list[torch.Tensor] = []
        hook = self.model.mask_decoder.iou_prediction_head.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0]))
        try:
            yield seen
        finally:
            hook.remove()

    def mask_logits_from_points(
        self, img: SamImage, points: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
        multimask: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Point prompts ``[K, P, 2]`` xy (original pixels) with labels ``[K, P]`` (1 fg, 0 bg, -1 pad) →
        mask logits ``[K, M, H, W]`` at the original size (M = 3 with ``multimask`` else 1; differentiable),
        predicted IoU ``[K, M]`` and IoU-token output ``[K, D]``."""
        pts = self._as_tensor(points, torch.float32)
        lab = self._as_tensor(labels, torch.long)
        if pts.ndim != 3 or pts.shape[-1] != 2 or tuple(lab.shape) != tuple(pts.shape[:2]):
            raise ValueError(f"points must be [K, P, 2] with labels [K, P]; got {tuple(pts.shape)} and "
                             f"{tuple(lab.shape)}")
        h, w = img.original_size
        m = 3 if multimask else 1
        if pts.shape[0] == 0:
            z = img.embeddings.new_zeros
            return z(0, m, h, w), z(0, m), z(0, self.hidden_size)
        pts = to_input_frame(pts, img.original_size, img.input_size)
        logits, ious = [], []
        with self._capture_iou_token() as tokens:
            for p, lb in zip(pts.split(self.prompt_batch), lab.split(self.prompt_batch), strict=True):
                out = self.model(image_embeddings=img.embeddings, input_points=p[None], input_labels=lb[None],
                                 multimask_output=multimask)
                logits.append(self.upsample(img, out.pred_masks[0]))
                ious.append(out.iou_scores[0])
        return torch.cat(logits), torch.cat(ious), torch.cat([t[0] for t in tokens])


# -- factory / IO ---------------------------------------------------------------------------------------------------
def _create_tiny(cfg: dict[str, Any]) -> SamSegmenter:
    from transformers import SamModel, SamProcessor

    known = {"image_size", "hidden", "layers", "heads", "seed", "prompt_batch"}
    if set(cfg) - known:
        raise TypeError(f"create_sam('tiny'): unknown option(s) {sorted(set(cfg) - known)}; known: {sorted(known)}")
    size = int(cfg.get("image_size", 128))
    config = tiny_sam_config(size, int(cfg.get("hidden", 32)), int(cfg.get("layers", 2)), int(cfg.get("heads", 2)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = SamModel(config).eval()
        # SAM's random Fourier position features have std 1 (segment-anything PositionEmbeddingRandom, scale=1.0);
        # transformers initialises them with std hidden/2 (16 here), a high-frequency code a from-scratch model
        # barely learns to localise box prompts with (pretrained weights overwrite it, so it matters only here)
        torch.nn.init.normal_(model.shared_image_embedding.positional_embedding, std=1.0)
    proc = SamProcessor(image_processor=_image_processor(size, (size, size)))
    return SamSegmenter(model, proc, int(cfg.get("prompt_batch", 64)))


def _create_from_file(path: Path, cfg: dict[str, Any]) -> SamSegmenter:
    meta = read_safetensors_metadata(path)
    if META_SAM not in meta:
        raise CheckpointError(path, f"no '{META_SAM}' header entry: not a SAM file written by save_sam")
    try:
        stored = json.loads(meta[META_SAM])
        sam = SamSegmenter.from_export({**stored, **cfg})
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(path, f"invalid '{META_SAM}' header entry ({e})") from None
    load_checkpoint(sam.model, path, strict=True)
    return sam


SEGMENT_ANYTHING_SUFFIXES = (".pth", ".pt")


def _create_from_segment_anything(path: Path, cfg: dict[str, Any]) -> SamSegmenter:
    """A segment-anything-format checkpoint, converted; preprocessing as ``SamPredictor``."""
    from transformers import SamModel, SamProcessor

    if set(cfg) - {"prompt_batch"}:
        raise TypeError(f"create_sam({str(path)!r}): unknown option(s) {sorted(set(cfg) - {'prompt_batch'})}")
    state = read_segment_anything(path)
    config = sam_config(state, path)
    model = SamModel(config).eval()
    converted = convert_state_dict(state, path)
    check_converted(model.state_dict(), converted, path)
    model.load_state_dict(converted, strict=True)
    size = int(config.vision_config.image_size)
    proc = SamProcessor(image_processor=_image_processor(size, (size, size), resize="pil"))
    return SamSegmenter(model, proc, int(cfg.get("prompt_batch", 64)))


def check_sam(source: str) -> None:
    """Reject a SAM file that :func:`create_sam` could not load, cheaply and before any work starts (one-line
    :class:`CheckpointError` naming the file): a segment-anything ``.pth`` is checked on names and shapes only (read
    onto the meta device, converted, matched against a meta-device ``SamModel``); a ``.safetensors`` is built
    (small: its header says what). ``"tiny"``, hub ids and directories are checked when they load."""
    from transformers import SamModel

    path = Path(str(source)).expanduser()
    if str(source).endswith(".safetensors"):
        create_sam(str(source))
    elif path.suffix in SEGMENT_ANYTHING_SUFFIXES:
        state = read_segment_anything(path, meta=True)
        config = sam_config(state, path)
        with torch.device("meta"):
            own = SamModel(config).state_dict()
        check_converted(own, convert_state_dict(state, path), path)


def _create_pretrained(source: str, cfg: dict[str, Any]) -> SamSegmenter:
    from transformers import SamModel, SamProcessor

    if set(cfg) - {"prompt_batch"}:
        raise TypeError(f"create_sam({source!r}): unknown option(s) {sorted(set(cfg) - {'prompt_batch'})}")
    try:
        model = SamModel.from_pretrained(source, local_files_only=_offline()).eval()
        proc = SamProcessor.from_pretrained(source, local_files_only=_offline())
    except (OSError, ValueError) as e:
        raise ValueError(f"create_sam: {source!r} is not 'tiny', a .safetensors file written by save_sam, a local "
                         f"transformers SAM directory or a reachable hub id ({type(e).__name__}: {e})") from None
    return SamSegmenter(model, proc, int(cfg.get("prompt_batch", 64)))


def create_sam(source: str = "tiny", **cfg: Any) -> SamSegmenter:
    """Build a :class:`SamSegmenter` from ``source``.

    ``"tiny"``: ``image_size`` (128), ``hidden`` (32), ``layers`` (2), ``heads`` (2), ``seed`` (0), ``prompt_batch``
    (64). A ``.safetensors`` file: its stored cfg, ``cfg`` overriding (e.g. ``prompt_batch``). A segment-anything
    ``.pth`` / ``.pt``, a hub id or a directory: ``prompt_batch`` only."""
    source = str(source)
    if source == "tiny":
        return _create_tiny(cfg)
    path = Path(source).expanduser()
    if source.endswith(".safetensors"):
        if not path.is_file():
            raise CheckpointError(path, "SAM checkpoint file not found")
        return _create_from_file(path, cfg)
    if path.suffix in SEGMENT_ANYTHING_SUFFIXES:
        if not path.is_file():
            raise CheckpointError(path, "SAM checkpoint file not found")
        return _create_from_segment_anything(path, cfg)
    if path.is_file():
        raise CheckpointError(path, "not a SAM source: expected 'tiny', a .safetensors file, a segment-anything "
                                    ".pth, a transformers directory or a hub id")
    return _create_pretrained(source, cfg)


def save_sam(model: SamSegmenter, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights to a ``.safetensors`` whose header holds :meth:`SamSegmenter.export_cfg` (key
    ``oodseg.sam``) plus ``meta`` (non-string values as JSON), so ``create_sam(path)`` rebuilds it alone."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_sam: {path} must end in .safetensors")
    header = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (meta or {}).items()}
    header[META_SAM] = json.dumps(model.export_cfg())
    # clone: the tied positional embedding appears under two keys sharing storage, which safetensors refuses
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path
