"""Reading detectron2 weight files (``model_final.pth`` of a training run, model-zoo ``.pkl``) without trusting them.

``.pth`` with ``torch.load(weights_only=True)`` only (detectron2 saves ``{"model": state_dict, …}``; numpy
arrays in it are rebuilt through numpy's own array-reconstruction globals, allowlisted by name; any other global is an
inert stand-in, :func:`oodseg.models.eomt_convert.load_untrusted`). ``.pkl`` model-zoo files (plain pickles of numpy
arrays) through a restricted unpickler that resolves only numpy's array-reconstruction globals, ``OrderedDict`` (read
as a dict) and ``_codecs.encode`` (array bytes in protocol-2 pickles, as torch's weights-only unpickler allows it),
and refuses every other global by name; object arrays are refused.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodseg.models.checkpoint import CheckpointError
from oodseg.models.eomt_convert import load_untrusted

_NUMPY_GLOBALS = {
    f"{mod}.{name}": obj
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name, obj in (("_reconstruct", np._core.multiarray._reconstruct), ("scalar", np._core.multiarray.scalar))
} | {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}


def _numpy_global(name: str) -> Any | None:
    """The numpy object a pickle may name to rebuild an array (``numpy.dtypes.*DType`` included), else None."""
    if name in _NUMPY_GLOBALS:
        return _NUMPY_GLOBALS[name]
    mod, _, attr = name.rpartition(".")
    if mod == "numpy.dtypes" and attr.endswith("DType"):
        return getattr(np.dtypes, attr, None)
    return None


class _NumpyOnly(pickle.Unpickler):
    """Unpickler for detectron2 model-zoo ``.pkl`` files: numpy array reconstruction and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if (module, name) == ("_codecs", "encode"):  # array bytes in protocol-2 pickles (as torch's weights_only)
            return codecs.encode
        obj = _numpy_global(f"{module}.{name}")
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only numpy arrays are read)")
        return obj


def _to_tensor(path: Path, key: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(value))
    raise CheckpointError(path, f"state dict entry {key} is a {type(value).__name__}, not a tensor or numeric array")


def read_detectron2_weights(path: str | Path, require: str, what: str) -> dict[str, torch.Tensor]:
    """detectron2 ``model_final.pth`` (``{"model": state_dict, …}`` or a bare state dict) or model-zoo ``.pkl``
    → ``{key: tensor}``, read without trusting the file (weights-only ``torch.load``; a numpy-only unpickler for
    ``.pkl``); CheckpointError naming the file when it is unreadable, holds a non-numeric entry, or has no key
    starting with ``require`` (the network ``what`` is, e.g. ``"Mask2Former"``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    if path.suffix == ".pkl":
        try:
            with path.open("rb") as f:
                raw = _NumpyOnly(f, encoding="latin1").load()
        except Exception as e:  # noqa: BLE001 - garbage, truncated or refused pickle: one line naming the file
            raise CheckpointError(path, f"cannot be read as a detectron2 .pkl ({type(e).__name__}: {e})") from None
    else:
        dtypes = [t for n in dir(np.dtypes) if n.endswith("DType") and isinstance(t := getattr(np.dtypes, n), type)]
        with torch.serialization.safe_globals(dtypes):  # numpy dtype instances are BUILT from their classes
            raw = load_untrusted(path, allow=_numpy_global)
    if isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping):
        raw = raw["model"]
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(path, f"expected a detectron2 checkpoint ({{'model': state_dict}}), "
                                    f"got {type(raw).__name__}")
    state = {str(k): _to_tensor(path, str(k), v) for k, v in raw.items()}
    if not any(k.startswith(require) for k in state):
        shown = ", ".join(list(state)[:4])
        raise CheckpointError(path, f"not a detectron2 {what} checkpoint: no '{require}*' keys (found {shown}, ...)")
    return state
