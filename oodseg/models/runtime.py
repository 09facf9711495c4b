"""Device and precision in one place.

``Runtime(device="auto", precision="auto", compile=False)``:

* ``device="auto"`` → ``cuda`` when available, else ``cpu``;
* ``precision="auto"`` → fp32 on CPU, bf16 autocast on CUDA (fp16 autocast on GPUs without bf16 support);
  explicit ``"fp32" | "bf16" | "fp16"`` are honoured (weights stay fp32; autocast casts the matmuls/convs);
* ``compile=True`` wraps the model's ``forward`` with ``torch.compile`` in ``prepare`` (the module, its state dict
  keys and its other methods stay as they are).

Usage::

    rt = Runtime()
    model = rt.prepare(model)          # moved to rt.device
    with rt.autocast():
        out = model.predict(images)
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_allocator(threshold: int = 1 << 30) -> bool:
    """CPU processes: make glibc malloc serve large blocks from the heap and keep freed memory, instead of a fresh
    ``mmap`` (zeroed pages, a page fault per 4 KiB) for every activation tensor of every step, which cuts the system
    time of small CPU training steps (``benchmarks/README.md``). Returns False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def setup_worker(threads: int, device: torch.device | str = "cpu") -> None:
    """A Ray worker's torch settings, applied where its work starts (score, fit and refine actors, training workers,
    Tune trials): ``threads`` intra-op threads (its CPU share) and, on the CPU, :func:`tune_allocator`, so every
    worker kind runs its tensors under the same settings as the in-process benchmarks it is compared with.

    Call it in the thread that runs the work: OpenMP's thread count is per thread, and a Ray Data actor runs its
    calls on a pool thread, not the one that ran its constructor; such a thread runs with ``OMP_NUM_THREADS`` (what
    Ray set for the worker), whatever the constructor set."""
    torch.set_num_threads(max(1, int(threads)))
    if torch.device(device).type == "cpu":
        tune_allocator()


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *_DTYPES)


@dataclass(frozen=True)
class Runtime:
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def dtype(self) -> torch.dtype:
        """The autocast compute dtype (``float32`` means no autocast)."""
        if self.precision != "auto":
            return _DTYPES[self.precision]
        dev = self.torch_device
        if dev.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def prepare(self, model: M) -> M:
        """Move ``model`` to the device (fp32 weights) and optionally compile its forward; returns the model."""
        model = model.to(self.torch_device)
        if self.compile:
            model.forward = torch.compile(model.forward)  # type: ignore[method-assign]
        return model

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """On CUDA: run the block on a stream of its own (from torch's pool; ``torch.cuda.current_stream()`` inside),
        so threads that each use one (concurrent actor calls) wait at a host sync for their own kernels only;
        elsewhere a no-op."""
        if self.torch_device.type != "cuda":
            yield
            return
        with torch.cuda.stream(torch.cuda.Stream(self.torch_device)):
            yield

    def synchronize(self) -> None:
        """Wait for the current stream's kernels on CUDA (a no-op elsewhere)."""
        if self.torch_device.type == "cuda":
            torch.cuda.current_stream(self.torch_device).synchronize()

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast to ``self.dtype`` on ``self.device`` (a no-op for fp32)."""
        if self.dtype == torch.float32:
            yield
            return
        with torch.autocast(device_type=self.torch_device.type, dtype=self.dtype):
            yield
