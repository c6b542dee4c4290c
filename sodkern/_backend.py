"""Strategy selection for the fused ops: ``backend="auto" | "chunked" | "tiled" | "torch"``.

- ``chunked``: GEMMs in the input dtype with fp32 accumulation (cuBLAS on CUDA) on ``[token tile x vocab
  tile]`` tiles, each tile folded by one Triton kernel (forward statistics, then ``dz`` in the backward). Where
  Triton cannot run (CPU without ``TRITON_INTERPRET=1``, Triton not installed, float64) the same loop folds
  with torch.
- ``tiled``: the all-in-Triton tile kernels of :mod:`sodkern.kernels` (CUDA, or the CPU interpreter).
- ``torch``: the chunked torch loop over ``[token chunk, V]`` blocks (:mod:`sodkern.ops._torch`).
- ``auto``: ``chunked`` on CUDA, ``torch`` otherwise (until a committed GPU measurement says otherwise).

The ``backend=`` argument of an op wins; without it ``SODKERN_BACKEND`` is the default (``triton`` is accepted
as an old name of ``tiled``). Forcing ``tiled`` on CPU tensors requires ``TRITON_INTERPRET=1`` (set before
Triton is imported): that is how CI tests every kernel. Triton is imported only when a Triton path runs.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

from sodkern.kernels._interpret import interpreting as triton_interpret

Backend = Literal["auto", "chunked", "tiled", "torch"]
Strategy = Literal["chunked", "tiled", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "chunked", "tiled", "torch")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the ``backend`` argument, else ``SODKERN_BACKEND``, else ``auto``.

    Raises:
        ValueError: for a name other than auto / chunked / tiled / torch (or the alias triton).
    """
    source = "backend" if backend is not None else "SODKERN_BACKEND"
    name = backend if backend is not None else os.environ.get("SODKERN_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    if name == "triton":  # the name of the tile kernels before the chunked strategy existed
        name = "tiled"
    if name not in BACKENDS:
        raise ValueError(f"{source} must be 'auto', 'chunked', 'tiled' or 'torch', got {name!r}")
    return name


def triton_usable(*tensors: torch.Tensor | None) -> bool:
    """Can a Triton kernel run on these tensors: Triton installed, and CUDA tensors or the interpreter."""
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    return (on_cuda or triton_interpret()) and triton_available()


def select_strategy(*tensors: torch.Tensor | None, backend: str | None = None) -> Strategy:
    """The strategy for an op whose inputs are ``tensors`` (``None`` entries are ignored).

    Raises:
        ImportError: ``tiled`` asked for without Triton installed (names the package to install).
        ValueError: a bad backend name, or ``tiled`` on CPU tensors without ``TRITON_INTERPRET=1``.
    """
    name = requested_backend(backend)
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if name == "auto":
        return "chunked" if on_cuda else "torch"
    if name == "tiled":
        if not triton_available():
            raise ImportError("backend 'tiled' needs Triton, which is not installed: pip install 'triton>=3.6'")
        if not on_cuda and not triton_interpret():
            raise ValueError(
                "backend 'tiled' with CPU tensors needs TRITON_INTERPRET=1 (set in the environment before "
                "Triton is imported), or use backend='chunked' or 'torch'"
            )
    return name
