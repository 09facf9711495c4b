"""The one model contract every segmentation model implements (see ``docs/architecture.md``).

A ``SegModel`` is an ``nn.Module`` with

* ``output_kind``: ``"pixel"`` (returns :class:`~oodseg.outputs.PixelLogits`) or ``"mask"`` (returns
  :class:`~oodseg.outputs.MaskOutputs`);
* ``num_classes``: number of class channels ``C`` of its outputs; ``ood_channels``: those among them that stand for
  unknown objects (TDOS's ``ood`` class; empty for closed-set models), copied into every output;
* ``input_size``: ``(h, w)`` that ``predict`` resizes images to before the forward pass (None: keep their size);
* ``preprocess(images_uint8)``: uint8 ``[B,H,W,3]`` or ``[B,3,H,W]`` RGB → normalised float ``[B,3,H,W]`` on the
  model's device (each model applies the input convention it was trained with);
* ``forward(x, target=None)``: training path on preprocessed input. Returns the outputs; a model that trains with a
  loss of its own (EoMT's mask-classification loss) returns ``(outputs, own_loss)`` when given the semantic
  ``target`` ``[B,H,W]`` (see ``own_loss`` and ``oodseg.losses`` for how a registered loss combines with it); a
  model with ``wants_targets`` gets ``target`` and ``outlier_mask`` in training (TDOS's OOD feature augmentation);
* ``predict(images_uint8, features=False)``: inference (no grad, preprocessing, resizing / sliding windows) with
  ``size`` = input size; ``features=True`` (models with ``has_features``) also sets ``outputs.features``, the
  per-pixel features the post-hoc scorers read, taken from the same forward pass;
* ``classify(features, size)`` (models with ``has_features``): the logits the model's last layer(s) make of (possibly
  modified) ``features``, cropped / resized to the logits' ``size`` (ReAct re-runs only this part);
* ``param_groups()``: ``name → list[Parameter]`` with names among ``backbone``, ``decoder``, ``head``, ``queries``
  (these top-level groups partition the trainable parameters) and ``blocks.<i>`` (finer, possibly overlapping the
  top-level groups; ordered from input (``0``) to output, so the highest indices are the blocks next to the head);
* ``export_cfg()``: JSON-able keyword arguments that rebuild the same architecture through ``create_model(name, ...)``
  without downloading or reading any pretrained file (``save_safetensors`` stores it in the file's metadata).

A model with ``reads_sources`` (``output_kind="score"``: the ``precomputed`` model) reads one file of its own per
image instead of running a network: ``predict(images, sources=[ImageSource, ...])``; it raises :class:`SourceError`
naming the images whose file is missing or unusable, so the caller records those and predicts the rest again. It
holds no weights and no training path, and is cheap to build (the benchmark builds it before Ray to check its cfg).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any, ClassVar

import torch
from torch import nn

from oodseg.outputs import MaskOutputs, PixelLogits


def to_nchw_uint8(images: torch.Tensor) -> torch.Tensor:
    """Accept uint8 images ``[B,H,W,3]``, ``[B,3,H,W]`` (or one ``[H,W,3]`` / ``[3,H,W]``) and return ``[B,3,H,W]``.

    A tensor whose last and second dimensions are both 3 is ambiguous; it is read as channels-last (the data layer's
    ``HxWx3`` convention).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 RGB in [0, 255], got dtype {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B,H,W,3] or [B,3,H,W], got {tuple(images.shape)}")
    if images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)
    if images.shape[1] == 3:
        return images
    raise ValueError(f"images must have 3 channels ([B,H,W,3] or [B,3,H,W]), got {tuple(images.shape)}")


@dataclass(frozen=True)
class ImageSource:
    """Where one input image comes from: the dataset's results key, the sample id and the image file (what a
    ``reads_sources`` model matches its own per-image files by)."""

    dataset: str
    id: str
    path: str

    @property
    def stem(self) -> str:
        return PurePath(self.path).stem


class SourceError(Exception):
    """Some images of a batch have no usable per-image file: ``failed`` maps the batch index to ``(file, message)``
    (a one-line message naming the file and what is wrong)."""

    def __init__(self, failed: dict[int, tuple[str, str]]) -> None:
        self.failed = dict(failed)
        super().__init__("; ".join(msg for _, msg in self.failed.values()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.failed,))


class SegModel(nn.Module):
    """Base class of every oodseg segmentation model: an ``nn.Module`` that turns uint8 RGB images into
    :class:`PixelLogits` or :class:`MaskOutputs` (``output_kind``; saved ``ScoreMaps`` for ``precomputed``) with
    ``num_classes`` class channels, names its parameter groups for fine-tuning and the config that rebuilds it
    (each method: module docstring)."""

    output_kind: ClassVar[str] = "pixel"
    #: whether ``forward(x, target)`` also returns a loss of the model's own (mask-classification models)
    own_loss: ClassVar[bool] = False
    #: whether training passes ``target`` and ``outlier_mask`` to ``forward`` (feature-level augmentations, TDOS)
    wants_targets: ClassVar[bool] = False
    #: registry name, set by ``register_model`` / ``create_model`` (used by ``save_safetensors``)
    model_name: str = ""
    input_size: tuple[int, int] | None = None
    ood_channels: tuple[int, ...] = ()
    #: whether ``predict(..., features=True)`` and ``classify`` exist (what the post-hoc scorers and ReAct read)
    has_features: ClassVar[bool] = False
    #: whether ``predict`` needs ``sources=``: it reads a file of its own per image instead of running a network
    reads_sources: ClassVar[bool] = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Any:
        """Training path on ``preprocess``-ed ``[B, 3, H, W]``: the outputs, or ``(outputs, own_loss)`` for an
        ``own_loss`` model given trainIds ``target [B, H, W]`` (255 = void, 254 = pasted outlier)."""
        raise NotImplementedError

    def model_input(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """What ``predict`` feeds the network (per-pixel models): preprocessed images resized to ``input_size`` when
        set (bilinear, antialiased), and the input size ``(H, W)``. ODIN differentiates through it."""
        x = self.preprocess(images_uint8)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if self.input_size is not None and tuple(self.input_size) != size:
            x = nn.functional.interpolate(x, size=tuple(self.input_size), mode="bilinear", align_corners=False,
                                          antialias=True)
        return x, size

    def input_std(self) -> torch.Tensor:
        """Per-channel std ``[3]`` dividing ``[0, 1]`` RGB in ``preprocess`` (1 without normalisation): an input
        step of ε in pixel units is ε / std in the network's input space."""
        std = getattr(self, "pixel_std", None)
        return std.flatten() / 255.0 if isinstance(std, torch.Tensor) else torch.ones(3, device=self.device)

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor, features: bool = False) -> PixelLogits | MaskOutputs:
        """Per-pixel inference (mask models override it): :meth:`model_input`, logits at that size; ``size`` = the
        input size, so scorers upsample back to the label; ``features=True``: also the features (one pass).

        Args:
            images_uint8: RGB uint8 ``[B,H,W,3]`` or ``[B,3,H,W]`` (values 0..255, not normalised).

        Returns:
            :class:`PixelLogits` with raw logits ``[B,C,h,w]`` (not probabilities) at the network's resolution,
            ``size=(H, W)`` and ``ood_channels``; ``features`` ``[B,D,h',w']`` when asked.
        """
        x, size = self.model_input(images_uint8)
        if features and not self.has_features:
            raise NotImplementedError(f"{type(self).__name__} does not expose features (has_features=False)")
        out = self(x, features=True) if features else self(x)
        return replace(out, size=size, ood_channels=self.ood_channels)

    def classify(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits ``[B, C, h, w]`` the last layer(s) make of ``features`` (as ``predict(..., features=True)`` gave
        them, possibly modified, e.g. ReAct's clipping), cropped / resized to the logits' ``size``."""
        raise NotImplementedError(f"{type(self).__name__} has no classify (has_features=False)")

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        raise NotImplementedError

    def export_cfg(self) -> dict[str, Any]:
        raise NotImplementedError


def check_partition(model: nn.Module, groups: dict[str, list[nn.Parameter]]) -> None:
    """``ValueError`` unless the top-level groups (all but ``blocks.<i>``) partition ``model``'s trainable
    parameters: fine-tuning's ``full`` spec trains exactly these groups (:mod:`oodseg.training.params`)."""
    seen: dict[int, str] = {}
    where = f"{type(model).__name__}.param_groups()"
    for name, params in groups.items():
        if name.startswith("blocks."):
            continue
        for p in params:
            if id(p) in seen:
                raise ValueError(f"{where}: a parameter is in both {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"{where}: trainable parameters in no group: {missing[:5]}")


class MeanStdInput:
    """Mixin for ``SegModel``s fed ``(x − 255·mean) / (255·std)`` (EoMT, Mask2Former): the buffers, the normalisation
    and ``preprocess``, in one place."""

    def _set_mean_std(self, mean: list[float], std: list[float]) -> None:
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def _normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return (x_uint8.float() - self.pixel_mean) / self.pixel_std

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 RGB → ``(x − 255·mean) / (255·std)`` float ``[B,3,H,W]`` on the model's device (no resizing)."""
        return self._normalise(to_nchw_uint8(images_uint8).to(self.device, non_blocking=True))
