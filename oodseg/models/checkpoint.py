"""Checkpoint I/O: ``.pth``/``.pt`` through ``torch.load(weights_only=True)`` and ``.safetensors``.

* ``load_checkpoint(model, path, strict=True, fresh=())`` unwraps nested ``{"state_dict": ...}`` / ``{"model": ...}`` dicts and
  strips the ``module.`` prefix that ``nn.DataParallel`` / DDP add (and the ``_orig_mod.`` prefix of
  ``torch.compile``). BatchNorm ``num_batches_tracked`` counters may be absent (checkpoints saved by PyTorch < 0.4,
  such as the public ``erfnet_pretrained.pth``, have none; the counter only matters for momentum=None BN).
  Any missing / unexpected key or shape mismatch outside the ``fresh`` prefixes raises :class:`CheckpointError` naming
  the file and the keys.
* ``save_safetensors(model, path, metadata)`` stores the weights plus ``oodseg.model`` (registry name) and
  ``oodseg.cfg`` (``model.export_cfg()`` as JSON) in the safetensors header, so ``create_model(checkpoint=path)``
  (:mod:`oodseg.models.factory`) rebuilds the model without any other file (fine-tuning exports this, the benchmark
  loads it).
* ``check_fit(model, path, fresh)`` applies ``load_checkpoint``'s rule to names and shapes only
  (``read_state_dict(path, meta=True)``: the safetensors header, or ``torch.load`` onto the meta device), for a model
  built on the meta device: a job checks that a checkpoint fits before any work starts.
* ``check_checkpoint(path)`` reads only a file's header (safetensors) or its pickled names and shapes (``.pth``,
  ``torch.load(weights_only=True)`` onto the meta device) so jobs can reject a bad or unsafe file before any work
  starts; :func:`torch_load_reason` keeps torch's reason and drops its boilerplate (which suggests unpickling).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_PREFIXES = ("module.", "_orig_mod.")
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
META_MODEL = "oodseg.model"
META_CFG = "oodseg.cfg"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = _one_line(problem)
        super().__init__(f"{path}: {self.problem}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, so the message survives Ray workers
        return (type(self), (self.path, self.problem))


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, cut to ``limit`` characters (library errors such as torch.load's span paragraphs)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def torch_load_reason(err: BaseException) -> str:
    """The informative part of a ``torch.load`` error on one line: torch wraps a weights-only refusal in paragraphs
    that recommend ``weights_only=False``, which must never be suggested for an untrusted file."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split("Check the documentation")[0]
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif text.startswith("Weights only load failed"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    detail = " ".join(text.split())
    return f"{type(err).__name__}: {detail}" if detail else type(err).__name__


@dataclass(frozen=True)
class LoadReport:
    """What ``load_checkpoint`` did not load (empty lists when everything matched)."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]


def read_state_dict(path: str | Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """Read a flat ``name → tensor`` dict from ``path`` (unwrapped, prefixes stripped); CheckpointError on bad input.

    ``meta=True``: names and shapes only, as tensors on the meta device: the safetensors header, or ``torch.load``
    onto the meta device (memory-mapped where the file's format allows it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            if meta:
                with safe_open(str(path), "pt") as f:
                    raw: Any = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            else:
                raw = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
            raise CheckpointError(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from e
    else:
        try:
            raw = _torch_load(path, meta)
        except Exception as e:  # truncated zip / pickle, or a pickle that is not weights-only
            reason = torch_load_reason(e)
            raise CheckpointError(path, f"cannot be read with torch.load(weights_only=True) ({reason})") from e
    return _flatten(path, raw)


def _torch_load(path: Path, meta: bool) -> Any:
    if not meta:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    try:
        return torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
    except RuntimeError as e:  # files in the legacy (pre-zip) format cannot be memory-mapped
        if "mmap" not in str(e):
            raise
        return torch.load(str(path), map_location="meta", weights_only=True)


def _flatten(path: Path, raw: Any) -> dict[str, torch.Tensor]:
    while isinstance(raw, Mapping):
        nested = [k for k in ("state_dict", "model") if isinstance(raw.get(k), Mapping)]
        if not nested:
            break
        raw = raw[nested[0]]
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(path, f"expected a (possibly nested) state dict, got {type(raw).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"entry {key!r} is a {type(value).__name__}, not a tensor")
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix) :], True
        out[name] = value
    return out


def _fmt(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True, fresh: Sequence[str] = ()) -> LoadReport:
    """Load ``path`` into ``model`` in place.

    ``strict=True``: every model key must be present with the same shape and the file may hold no other key, except
    keys under one of the ``fresh`` prefixes (a newly initialised part, e.g. a new head: its keys may be missing from,
    extra in, or shaped differently in the file) and BatchNorm ``num_batches_tracked`` counters. ``strict=False``:
    load the keys whose names and shapes match, report the rest.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    report = _fit(model, own, state, path, strict, fresh)
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    return report


def check_fit(model: nn.Module, path: str | Path, fresh: Sequence[str] = ()) -> None:
    """Raise what ``load_checkpoint(model, path, strict=True, fresh=fresh)`` would, reading only names and shapes
    (``read_state_dict(path, meta=True)``); ``model`` may live on the meta device."""
    _fit(model, model.state_dict(), read_state_dict(path, meta=True), path, True, fresh)


def _fit(model: nn.Module, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: str | Path,
         strict: bool, fresh: Sequence[str]) -> LoadReport:
    """``load_checkpoint``'s matching rule (its docstring); CheckpointError when ``strict`` and anything is off."""

    def tolerated(key: str) -> bool:
        return any(key.startswith(p) for p in fresh)

    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL_SUFFIXES) and not tolerated(k)]
    unexpected = [k for k in state if k not in own and not tolerated(k)]
    mismatched = [
        f"{k} (file {list(state[k].shape)} vs model {list(own[k].shape)})"
        for k in state
        if k in own and state[k].shape != own[k].shape and not tolerated(k)
    ]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_fmt(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_fmt(mismatched)}")
        raise CheckpointError(path, f"does not fit {type(model).__name__}: " + "; ".join(parts))
    return LoadReport(missing=missing, unexpected=unexpected, mismatched=mismatched)


def save_safetensors(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict to ``path``; the header holds the registry name, ``export_cfg()`` and ``metadata``.

    Non-string metadata values are stored as JSON. Returns the path.
    """
    from safetensors.torch import save_file

    name = getattr(model, "model_name", "")
    export = getattr(model, "export_cfg", None)
    if not name or export is None:
        raise TypeError(f"{type(model).__name__} was not built by create_model (no model_name / export_cfg)")
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta[META_MODEL] = name
    meta[META_CFG] = json.dumps(export())
    # clone: safetensors refuses tensors that share storage (views), and wants contiguous CPU data
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` if it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from e


def check_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a readable checkpoint (cheap: header / archive index only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    if path.suffix == ".safetensors":
        read_safetensors_metadata(path)
        return
    read_state_dict(path, meta=True)
