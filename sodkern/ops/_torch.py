"""Torch-path helpers shared by the fused lm-head ops (the twin of ``kernels/_tiles.py``).

Tokens are processed ``token_chunk_size(V)`` at a time, so one ``[chunk, V]`` logits block (about ``2**25``
elements) exists at once; :func:`chunked_head_grads` runs the backward one such block at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

_CHUNK_ELEMENTS = 1 << 25  # elements of one [chunk, V] logits block on the torch path


def token_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk on the torch path, so a ``[chunk, vocab_size]`` block holds about ``2**25`` values."""
    return max(1, _CHUNK_ELEMENTS // vocab_size)


def token_chunks(n: int, vocab_size: int) -> Iterator[slice]:
    """Row slices of ``token_chunk_size(vocab_size)`` tokens covering ``range(n)``."""
    step = token_chunk_size(vocab_size)
    return (slice(i, i + step) for i in range(0, n, step))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_logits(hidden: torch.Tensor, weight_acc: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """``hidden [C, H] @ weight_acc.T / T`` as a ``[C, V]`` block in ``weight_acc``'s (accumulation) dtype."""
    z = hidden.to(weight_acc.dtype) @ weight_acc.T
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z


def log_softmax_(z: torch.Tensor) -> torch.Tensor:
    """Turn the ``[C, V]`` logits block ``z`` into log-probs in place; return its ``[C]`` logsumexp.

    Shifting by the row max first keeps ``z - lse`` exact for large logits (no rounding of a big ``lse``).
    """
    top = z.amax(dim=-1, keepdim=True)
    z.sub_(top)
    log_total = torch.logsumexp(z, dim=-1, keepdim=True)
    z.sub_(log_total)
    return (top + log_total).squeeze(-1)


def chunked_head_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    need_hidden: bool,
    need_weight: bool,
    chunk_dz: Callable[[slice, torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward through ``z = hidden @ weight.T``, one ``[chunk, V]`` block of ``dz`` at a time.

    Args:
        hidden: ``[N, H]`` float; weight: ``[V, H]`` same dtype (upcast once to the accumulation dtype).
        need_hidden / need_weight: which gradients to compute.
        chunk_dz: ``chunk_dz(rows, hidden_acc, weight_acc)`` returns ``dL/dz`` ``[C, V]`` (the ``1 / T`` factor
            included) for the token slice ``rows``, given ``hidden[rows]`` ``[C, H]`` and ``weight`` ``[V, H]``
            in the accumulation dtype.

    Returns:
        ``(grad_hidden [N, H], grad_weight [V, H])`` in the input dtype, None where not needed.
    """
    n, h = hidden.shape
    acc = acc_dtype(hidden.dtype)
    w = weight.to(acc)
    gh = torch.empty((n, h), dtype=acc, device=hidden.device) if need_hidden else None
    gw = torch.zeros((weight.shape[0], h), dtype=acc, device=hidden.device) if need_weight else None
    for rows in token_chunks(n, weight.shape[0]):
        h_c = hidden[rows].to(acc)
        dz = chunk_dz(rows, h_c, w)
        if gh is not None:
            gh[rows] = dz @ w
        if gw is not None:
            gw.addmm_(dz.T, h_c)
    return (
        gh.to(hidden.dtype) if gh is not None else None,
        gw.to(weight.dtype) if gw is not None else None,
    )
