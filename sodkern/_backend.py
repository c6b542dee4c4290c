"""Backend selection: Triton kernels for CUDA tensors, chunked torch otherwise.

``SODKERN_BACKEND=torch|triton`` forces one backend. Forcing ``triton`` on CPU
tensors requires ``TRITON_INTERPRET=1`` (set before Triton is imported), which
runs the kernels in Triton's interpreter: that is how CI tests every kernel.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

from sodkern.kernels._interpret import interpreting as triton_interpret

Backend = Literal["torch", "triton"]


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(*tensors: torch.Tensor | None) -> Backend:
    """Pick the backend for an op whose inputs are ``tensors`` (``None`` entries are ignored)."""
    forced = os.environ.get("SODKERN_BACKEND", "auto").strip().lower()
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise ImportError("SODKERN_BACKEND=triton but Triton is not installed: pip install 'triton>=3.6'")
        if not on_cuda and not triton_interpret():
            raise ValueError(
                "SODKERN_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 "
                "(set in the environment before Triton is imported)"
            )
        return "triton"
    if forced not in ("", "auto"):
        raise ValueError(f"SODKERN_BACKEND must be 'torch', 'triton' or 'auto', got {forced!r}")
    return "triton" if on_cuda and triton_available() else "torch"
