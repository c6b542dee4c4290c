"""Tile helpers shared by the fused lm-head kernels (:mod:`.linear_logprobs`, :mod:`.linear_kl`).

Device side (``@triton.jit``): index spans with their masks, the fp32 logits tile ``hidden[rows] @
weight[cols].T / T`` with its ``H`` loop, one step of the online logsumexp, and the backward's atomic
accumulation of ``dz @ weight`` / ``dz.T @ hidden``. Host side: block sizes, the vocabulary split of the
forward grid and the fp32 gradient buffers of the backward.

All offsets are int64 so ``N * V`` or ``V * H`` beyond 2**31 is safe. Under ``TRITON_INTERPRET=1`` the
operands are upcast to fp32 before ``tl.dot`` (``UPCAST``): the interpreter returns garbage for ``tl.dot`` on
bf16 operands.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._interpret import interpreting


def launch_config(*dtypes: torch.dtype) -> dict[str, Any]:
    """Fixed meta-parameters (no autotuning yet) for operands of ``dtypes``: ``BLOCK_N``, ``BLOCK_V``,
    ``BLOCK_H``, ``num_warps`` for the widest dtype (fp32 tiles take twice the shared memory) and ``UPCAST``."""
    if interpreting():
        block_n, block_v, block_h, num_warps = 16, 32, 32, 1
    elif torch.float32 in dtypes:
        block_n, block_v, block_h, num_warps = 32, 64, 32, 4
    else:
        block_n, block_v, block_h, num_warps = 64, 128, 64, 8
    return {
        "BLOCK_N": block_n,
        "BLOCK_V": block_v,
        "BLOCK_H": block_h,
        "num_warps": num_warps,
        "UPCAST": interpreting(),
    }


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact fp32 products ("ieee"), not TF32; low-precision operands use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def vocab_splits(n: int, v: int, config: dict[str, Any], device: torch.device) -> tuple[int, int, int]:
    """Forward grid over ``n`` tokens and a vocabulary of ``v``, split so there are enough programs.

    Returns ``(token_blocks, blocks_per_split, splits)``; the grid is ``(token_blocks, splits)``.
    """
    n_blocks = triton.cdiv(n, config["BLOCK_N"])
    v_blocks = triton.cdiv(v, config["BLOCK_V"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = min(v_blocks, max(1, triton.cdiv(2 * sms, n_blocks)))
    per_split = triton.cdiv(v_blocks, splits)
    return n_blocks, per_split, triton.cdiv(v_blocks, per_split)


def grad_buffers(
    hidden: torch.Tensor, weight: torch.Tensor, need_hidden: bool, need_weight: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 accumulators for the backward kernels' atomics.

    Args:
        hidden: ``[N, H]``, weight: ``[V, H]`` (any float dtype; only shapes and device are used).
        need_hidden / need_weight: which gradients the kernel computes.

    Returns:
        ``(grad_hidden [N, H], grad_weight [V, H])`` float32; a one-element stand-in where a gradient is not
        needed (a valid pointer that ``COMPUTE_DH`` / ``COMPUTE_DW`` = False never touches).
    """
    (n, h), v = hidden.shape, weight.shape[0]
    gh = torch.zeros((n, h) if need_hidden else 1, dtype=torch.float32, device=hidden.device)
    gw = torch.zeros((v, h) if need_weight else 1, dtype=torch.float32, device=hidden.device)
    return gh, gw


@triton.jit
def span(start, BLOCK: tl.constexpr, end):
    """``start + arange(BLOCK)`` and its mask ``< end``."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < end


@triton.jit
def load_rows(ptr, idx, idx_mask, stride, hs, h_mask, UPCAST: tl.constexpr):
    """``x[idx][:, hs]`` of a row-major ``x`` with row stride ``stride``, 0 outside the masks."""
    x = tl.load(ptr + idx[:, None] * stride + hs[None, :], mask=idx_mask[:, None] & h_mask[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def add_rows(ptr, idx, idx_mask, H, hs, h_mask, x):
    """Atomically add ``x`` to ``buf[idx][:, hs]`` of a contiguous ``[*, H]`` buffer."""
    tl.atomic_add(ptr + idx[:, None] * H + hs[None, :], x, mask=idx_mask[:, None] & h_mask[None, :], sem="relaxed")


@triton.jit
def logits_tile(
    h_ptr,
    w_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    H,
    stride_h,
    stride_w,
    inv_t,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``hidden[rows] @ weight[cols].T * inv_t`` as a ``[BLOCK_N, BLOCK_V]`` fp32 tile (masked entries are 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs, h_mask = span(h0, BLOCK_H, H)
        a = load_rows(h_ptr, rows, row_mask, stride_h, hs, h_mask, UPCAST)
        b = tl.load(
            w_ptr + cols[None, :] * stride_w + hs[:, None],
            mask=col_mask[None, :] & h_mask[:, None],
            other=0.0,
        )
        if UPCAST:
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc * inv_t


@triton.jit
def online_lse(m, s, z):
    """One tile ``z [BLOCK_N, BLOCK_V]`` of an online logsumexp with running max ``m`` and ``s = sum exp(z - m)``.

    Returns ``(m_new, alpha, e, s_new)``: the new max, ``exp(m - m_new)``, ``exp(z - m_new)`` and
    ``s * alpha + sum(e)``.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    return m_new, alpha, e, s * alpha + tl.sum(e, axis=1)


@triton.jit
def accumulate_grads(
    dz,
    h_ptr,
    w_ptr,
    gh_ptr,
    gw_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    H,
    stride_h,
    stride_w,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    """Atomically add ``dz @ weight[cols]`` to ``gh[rows]`` and ``dz.T @ hidden[rows]`` to ``gw[cols]``.

    ``dz`` is ``[BLOCK_N, BLOCK_V]`` fp32 (zeroed here outside ``row_mask x col_mask``); ``gh`` and ``gw`` are
    contiguous fp32 buffers of row length ``H``. On GPU ``dz`` is cast to the input dtype for the products.
    """
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    dz_op = dz if UPCAST else dz.to(h_ptr.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        hs, h_mask = span(h0, BLOCK_H, H)
        if COMPUTE_DH:
            w = load_rows(w_ptr, cols, col_mask, stride_w, hs, h_mask, UPCAST)
            add_rows(gh_ptr, rows, row_mask, H, hs, h_mask, tl.dot(dz_op, w, input_precision=PRECISION))
        if COMPUTE_DW:
            h = load_rows(h_ptr, rows, row_mask, stride_h, hs, h_mask, UPCAST)
            add_rows(gw_ptr, cols, col_mask, H, hs, h_mask, tl.dot(tl.trans(dz_op), h, input_precision=PRECISION))
