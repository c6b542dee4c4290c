"""Argument checks shared by the public ops. Each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math
import warnings
from typing import Any

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


def check_temperature(temperature: float) -> float:
    """Validate ``temperature`` and return ``1 / temperature``."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    return 1.0 / float(temperature)


def check_lm_head(hidden: torch.Tensor, weight: torch.Tensor, hidden_name: str, weight_name: str) -> None:
    """``hidden [..., H]`` and ``weight [V, H]``: floating point, same dtype and device, matching ``H``."""
    check_float(hidden, hidden_name)
    check_float(weight, weight_name)
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name} has shape {tuple(hidden.shape)} but {weight_name} is [V, H] = "
            f"{tuple(weight.shape)}: the last dim of {hidden_name} must be H = {weight.shape[1]}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{weight_name} has dtype {weight.dtype} but {hidden_name} has dtype {hidden.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"{weight_name} is on {weight.device} but {hidden_name} is on {hidden.device}")


def renamed_argument(value: Any, old_value: Any, name: str, old_name: str, function: str) -> Any:
    """Resolve an argument that may come under its deprecated keyword ``old_name`` (with a DeprecationWarning).

    Raises:
        TypeError: both names given, or neither (the argument is required).
    """
    if old_value is None:
        if value is None:
            raise TypeError(f"{function}() missing required argument: '{name}'")
        return value
    if value is not None:
        raise TypeError(f"{function}() got both '{name}' and its deprecated alias '{old_name}': pass only '{name}'")
    warnings.warn(f"{function}(): '{old_name}' is deprecated, pass '{name}'", DeprecationWarning, stacklevel=3)
    return old_value
