"""Argument checks shared by the public ops. Each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import torch


def check_float(t: torch.Tensor, name: str) -> None:
    if not torch.is_floating_point(t):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} has shape {tuple(b.shape)} but {name_a} has shape {tuple(a.shape)}")


def check_targets(targets: torch.Tensor, vocab_size: int, name: str = "targets") -> None:
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 or int32 token ids, got dtype {targets.dtype}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        lo, hi = int(targets.min()), int(targets.max())
        raise ValueError(f"{name} must lie in [0, {vocab_size}) (the weight's vocabulary), got range [{lo}, {hi}]")


def check_mask(mask: torch.Tensor, name: str = "response_mask") -> None:
    """The mask must hold only 0 and 1 (bool, integer or float dtype)."""
    if mask.dtype == torch.bool:
        return
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1")


def check_finite_where(x: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    """Non-finite values of ``x`` are allowed only where ``mask`` is 0."""
    bad = ~torch.isfinite(x) & (mask != 0)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has a non-finite value at {idx} where response_mask is 1")
