"""Helpers shared by the fused lm-head op tests (test_linear_logprobs.py, test_linear_kl.py)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """``actual`` (any dtype) against the fp64 ``expected``; tolerances relative to the largest entry, because
    low-precision gradients are rounded to the input dtype."""
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(actual.double(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
