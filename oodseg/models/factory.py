"""The model registry and the one factory that builds a model *and* loads its weights (timm's ``create_model``).

* ``@register_model("name")`` on a :class:`~oodseg.models.base.SegModel` subclass, in the model's own file; the
  class attribute ``output_kind`` is the registered fact (``model_output_kind(name)`` reads it without building).
* ``create_model(name, checkpoint=None, fresh=(), seed=None, **cfg)``: build ``name`` with ``cfg`` and load
  ``checkpoint`` (``.pth``/``.pt`` via ``torch.load(weights_only=True)``, or ``.safetensors``). A ``.safetensors`` file
  written by ``save_safetensors`` is self-describing: its header names the model and holds its cfg, which becomes the
  base that ``cfg`` overrides, so ``create_model(checkpoint=path)`` rebuilds a fine-tuned model with no other file.
  Loading is strict except under the ``fresh`` parameter prefixes (a newly added head, e.g. ``("head.",)`` when a loss
  swaps in an IsoMax+ head). Model-specific hub sources that define the architecture itself (EoMT's ``pretrained``
  hub id, a timm backbone's ``pretrained``) stay model cfg, as in transformers and timm.
* ``check_model_fits(name, checkpoint=…, fresh=…, **cfg)``: the same build on the meta device, compared with the
  checkpoint's tensor names and shapes only, so a job rejects a checkpoint that does not fit before any work starts;
  ``check_checkpoint_model``: the header's model and the keywords, the rule every job checks first.
* Named checkpoint sources: ``resolve_checkpoint("demo", **context)`` → a file path. ``"scratch"`` (random init) is
  built in; other layers register theirs (``oodseg.training.demo`` registers ``"demo"``, the demo ERFNet trained on
  the synthetic suite) with ``@register_checkpoint_source(name)``; a source receives the run context
  (``cache_dir``, ``data_root``, ``seed``).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from oodseg.models.base import SegModel
from oodseg.models.checkpoint import (
    META_CFG,
    META_MODEL,
    CheckpointError,
    check_fit,
    load_checkpoint,
    read_safetensors_metadata,
)
from oodseg.registry import Registry

S = TypeVar("S", bound=type)

MODELS: Registry[SegModel] = Registry("model")
CHECKPOINT_SOURCES: Registry[str | None] = Registry("checkpoint source")
OUTPUT_KINDS = ("pixel", "mask", "score")


def register_model(name: str) -> Callable[[S], S]:
    """Class decorator registering a ``SegModel`` subclass; its ``output_kind`` must be one of :data:`OUTPUT_KINDS`."""

    def deco(cls: S) -> S:
        kind = getattr(cls, "output_kind", None)
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"model {name!r}: output_kind must be one of {OUTPUT_KINDS}, got {kind!r}")
        cls.model_name = name  # type: ignore[attr-defined]
        return MODELS.register(name)(cls)

    return deco


def list_models() -> list[str]:
    return MODELS.list()


def model_output_kind(name: str) -> str:
    """``"pixel"``, ``"mask"`` or ``"score"``: what model ``name`` returns (a class fact, so nothing is built)."""
    return str(MODELS.get(name).output_kind)  # type: ignore[attr-defined]


def register_checkpoint_source(name: str) -> Callable[[Callable[..., str | None]], Callable[..., str | None]]:
    """Register ``fn(cache_dir, data_root, seed) -> path | None`` as the named checkpoint ``name``; the function
    receives the run context as keywords (take ``**_`` for the rest) and returns a file, building it if need be,
    or None for a random initialisation."""
    return CHECKPOINT_SOURCES.register(name)


@register_checkpoint_source("scratch")
def _scratch(**context: Any) -> None:
    """Random initialisation: no checkpoint."""
    return


def resolve_checkpoint(checkpoint: str | os.PathLike[str] | None, **context: Any) -> str | None:
    """A named source (``demo``, ``scratch``, …) → its file (or None); a path is returned as it is."""
    if checkpoint is None or str(checkpoint) == "":
        return None
    if str(checkpoint) in CHECKPOINT_SOURCES:
        return CHECKPOINT_SOURCES.get(str(checkpoint))(**context)
    return str(checkpoint)


def checkpoint_model_cfg(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]] | None:
    """``(model name, cfg)`` from a self-describing ``.safetensors`` header; None for any other file."""
    if not str(path).endswith(".safetensors"):
        return None
    meta = read_safetensors_metadata(path)
    if META_MODEL not in meta or META_CFG not in meta:
        return None
    return meta[META_MODEL], json.loads(meta[META_CFG])


def unknown_model_args(name: str, cfg: Mapping[str, Any], stored: tuple[str, dict[str, Any]] | None = None
                       ) -> tuple[list[str], list[str]]:
    """``(unknown, accepted)``: the keywords ``create_model`` would build model ``name`` with (``stored``, a
    self-describing header from :func:`checkpoint_model_cfg`: its cfg, then ``cfg``) that the constructor does not
    take, and those it takes; checked from the signature, without building the model (nothing is unknown to one
    taking ``**kwargs``)."""
    params = inspect.signature(MODELS.get(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return [], list(params)
    keys = set(cfg) | (set(stored[1]) if stored else set())
    return sorted(keys - set(params)), list(params)


def check_checkpoint_model(checkpoint: str | os.PathLike[str] | None, name: str | None, cfg: Mapping[str, Any], *,
                           owner: str, arch_option: str, cfg_option: str, hint: str = "") -> str:
    """Whether ``checkpoint`` holds model ``name`` built with ``cfg`` — the one rule every job applies before any work:
    a self-describing header (:func:`checkpoint_model_cfg`) must name ``name`` (or, with no ``name``, a registered
    model), and the constructor must take the keywords (header cfg, then ``cfg``). Returns the registered model name;
    otherwise a one-line ``CheckpointError`` naming the file, or a ``ConfigError`` naming ``cfg_option``.

    ``owner`` names the model in messages (``"model 'x'"``), ``arch_option`` the option that chose ``name``
    (``"model 'x''s arch"``, ``"--model"``); ``hint`` is appended to the mismatch message.

    Args:
        checkpoint: weights file, or None (then ``name`` is required); a file without our header is taken as ``name``.
        name: the registered model asked for; None: the one the header names.
        cfg: the extra constructor keywords the job would pass, named in errors as ``cfg_option``.
    """
    from oodseg.config import ConfigError

    stored = checkpoint_model_cfg(checkpoint) if checkpoint else None
    if name and stored is not None and stored[0] != name:
        raise CheckpointError(checkpoint, f"holds a {stored[0]!r} model, not {arch_option} {name!r}{hint}")
    if not name and stored is None:
        what = "no checkpoint" if not checkpoint else "not a self-describing .safetensors"
        raise CheckpointError(checkpoint or "<none>", f"{owner}: {what}; give its arch: one of {MODELS.list()}")
    if not name and stored[0] not in MODELS:
        raise CheckpointError(checkpoint, f"holds an unregistered model {stored[0]!r} (plugins missing?)")
    name = name or stored[0]
    unknown, accepted = unknown_model_args(name, cfg, stored)
    if unknown:
        raise ConfigError(f"{cfg_option} ({name}) takes no {', '.join(map(repr, unknown))}; it takes "
                          f"{', '.join(accepted)}")
    return name


def create_model(
    name: str | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    fresh: Sequence[str] = (),
    seed: int | None = None,
    **cfg: Any,
) -> SegModel:
    """Build registered model ``name`` with ``cfg`` and load ``checkpoint`` strictly (timm's ``create_model``).

    Args:
        name: registered model; may be None when ``checkpoint`` is a self-describing ``.safetensors`` (its header
            names the model and holds the cfg that ``cfg`` then overrides).
        checkpoint: ``.pth`` / ``.pt`` (read with ``weights_only=True``) or ``.safetensors``; None keeps the random
            init. A named source (``"demo"``) must go through :func:`resolve_checkpoint` first.
        fresh: parameter-name prefixes the checkpoint may lack (a new head: ``("head.",)``); they keep their init.
        seed: seeds the random initialisation (of everything, or of the ``fresh`` parts).

    Returns:
        The model on the default device (the CPU), in ``nn.Module``'s default training mode.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = _build(name, checkpoint, cfg)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=True, fresh=tuple(fresh))
    return model


def check_model_fits(name: str | None = None, *, checkpoint: str | os.PathLike[str], fresh: Sequence[str] = (),
                     **cfg: Any) -> None:
    """Raise the CheckpointError that ``create_model(name, checkpoint=…, fresh=…, **cfg)`` would for tensors that do
    not fit, without reading the weights: the model is built on the meta device (no memory, no initialisation) and
    compared with the checkpoint's names and shapes (:func:`~oodseg.models.checkpoint.check_fit`)."""
    with torch.device("meta"):
        model = _build(name, checkpoint, cfg)
    check_fit(model, checkpoint, tuple(fresh))


def _build(name: str | None, checkpoint: str | os.PathLike[str] | None, cfg: dict[str, Any]) -> SegModel:
    """``name`` (or the checkpoint header's model) built from the header's cfg, then ``cfg``; weights not loaded."""
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CheckpointError(checkpoint, "checkpoint file not found")
    stored = checkpoint_model_cfg(checkpoint) if checkpoint is not None else None
    if stored is not None:
        if name and name != stored[0]:
            raise CheckpointError(checkpoint, f"holds a {stored[0]!r} model, not {name!r}")
        name, cfg = stored[0], {**stored[1], **cfg}
    if not name:
        raise ValueError(f"{checkpoint or 'no checkpoint'}: give a model name (registered: {', '.join(list_models())}) "
                         "or a self-describing .safetensors checkpoint")
    try:
        model = MODELS.get(name)(**cfg)
    except TypeError as e:
        raise TypeError(f"model {name!r}: {e}") from None
    model.model_name = name
    return model
