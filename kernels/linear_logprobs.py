"""Triton kernels for the fused linear log-prob op: log softmax(hidden @ weight.T / T)[target] without logits.

Forward: grid (token blocks, vocabulary splits). Each program walks its share of the vocabulary in
``BLOCK_V`` tiles; each tile of logits is a ``tl.dot`` over an ``H`` loop (fp32 accumulation) and feeds an
online max / sum-exp (and, optionally, an online entropy accumulator) per row. The split that owns a row's
target column also returns that logit. The per-split partials, ``[splits, N]`` each, are merged in torch
(:func:`merge_lse_partials`), so no ``[N, V]`` tensor ever exists.

Backward: grid (token blocks, vocabulary blocks), Cut-Cross-Entropy style. Each program recomputes its logits
tile, forms ``dz = (g * (onehot - p) - g_ent * p * (log p + entropy)) / T`` (the entropy term only when the
entropy output has an upstream gradient) and, in a second loop over ``H``, adds ``dz @ weight`` into
``grad_hidden`` and ``dz.T @ hidden`` into ``grad_weight``. Both are fp32 buffers updated with fp32
atomics (one kernel instead of two recomputing passes; the price is a non-deterministic summation order),
cast to the input dtype by the caller. On GPU the ``dz`` operand of those two products is cast to the input
dtype (bf16/fp16 tensor cores, fp32 accumulation).

The tile helpers (int64 offsets, the ``UPCAST`` work-around for the interpreter) are in :mod:`._tiles`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import (
    accumulate_grads,
    dot_precision,
    grad_buffers,
    launch_config,
    logits_tile,
    online_lse,
    span,
    vocab_splits,
)


@triton.jit
def _logprobs_fwd_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    zt_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    inv_t,
    blocks_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    pid_s = tl.program_id(1).to(tl.int64)
    rows, row_mask = span(tl.program_id(0).to(tl.int64) * BLOCK_N, BLOCK_N, N)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_s * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols, col_mask = span(v0, BLOCK_V, v_end)
        z = logits_tile(
            h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_t,
            BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION,
        )  # fmt: skip
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new, alpha, e, s_new = online_lse(m, s, z)
        if ENTROPY:
            # t = sum exp(z - m) * (z - m); rebasing m -> m_new: alpha * (t + (m - m_new) * s)
            shift = tl.where(s > 0, m - m_new, 0.0) * s
            d = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            t = alpha * (t + shift) + tl.sum(e * d, axis=1)
        s = s_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(zt_ptr + out, zt, mask=row_mask)
    if ENTROPY:
        tl.store(t_ptr + out, t, mask=row_mask)


@triton.jit
def _logprobs_bwd_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    lse_ptr,
    g_ptr,
    ent_ptr,
    ge_ptr,
    gh_ptr,
    gw_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    inv_t,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr,
):
    rows, row_mask = span(tl.program_id(0).to(tl.int64) * BLOCK_N, BLOCK_N, N)
    cols, col_mask = span(tl.program_id(1).to(tl.int64) * BLOCK_V, BLOCK_V, V)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    z = logits_tile(
        h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_t,
        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION,
    )  # fmt: skip
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    dz = (onehot - p) * g[:, None]
    if ENTROPY_GRAD:  # dH/dz_j = -p_j (log p_j + H)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        ge = tl.load(ge_ptr + rows, mask=row_mask, other=0.0)
        dz -= p * (log_p + ent[:, None]) * ge[:, None]
    accumulate_grads(
        dz * inv_t, h_ptr, w_ptr, gh_ptr, gw_ptr, rows, cols, row_mask, col_mask, H,
        stride_h, stride_w, BLOCK_H, UPCAST, PRECISION, COMPUTE_DH, COMPUTE_DW,
    )  # fmt: skip


def merge_lse_partials(
    m: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge per-split online-softmax partials into ``lse = top + log_total`` (and the entropy).

    Args:
        m: ``[splits, N]`` float32, running max of each split.
        s: ``[splits, N]`` float32, ``sum exp(z - m)`` over the split.
        t: ``[splits, N]`` float32 or None, ``sum exp(z - m) * (z - m)`` over the split.

    Returns:
        ``(top, log_total, entropy)``, ``[N]`` float32 each (entropy None without ``t``). ``lse`` is kept in
        two parts so that ``z - lse`` can be formed as ``(z - top) - log_total``, exact for large logits.
    """
    top = m.amax(dim=0)
    scale = torch.exp(m - top)
    total = (scale * s).sum(dim=0)
    log_total = torch.log(total)
    entropy = None
    if t is not None:
        # entropy = lse - E[z] = log(total) - sum exp(z - top) * (z - top) / total
        entropy = log_total - (scale * (t + (m - top) * s)).sum(dim=0) / total
    return top, log_total, entropy


def linear_logprobs_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temperature: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel.

    Args:
        hidden: ``[N, H]`` bf16/fp16/fp32, last dim contiguous.
        weight: ``[V, H]`` same dtype, last dim contiguous.
        targets: ``[N]`` int64/int32 in ``[0, V)``.
        inv_temperature: ``1 / T``.
        entropy: also return the full-vocabulary entropy.

    Returns:
        ``(logp, lse, entropy)``: ``[N]`` float32 each (entropy None unless requested), with
        ``lse = logsumexp(hidden @ weight.T / T)`` per row.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        logp, lse, ent = (hidden.new_empty(0, dtype=torch.float32) for _ in range(3))  # distinct tensors
        return logp, lse, ent if entropy else None
    cfg = launch_config(hidden.dtype)
    n_blocks, per_split, splits = vocab_splits(n, v, cfg, hidden.device)
    m = torch.empty((splits, n), dtype=torch.float32, device=hidden.device)
    s = torch.empty_like(m)
    zt = torch.empty_like(m)
    t = torch.empty_like(m) if entropy else s  # s stands in as an unused pointer
    _logprobs_fwd_kernel[(n_blocks, splits)](
        hidden, weight, targets, m, s, t, zt, n, v, h, hidden.stride(0), weight.stride(0),
        inv_temperature, per_split, PRECISION=dot_precision(hidden.dtype), ENTROPY=entropy, **cfg,
    )  # fmt: skip
    top, log_total, ent = merge_lse_partials(m, s, t if entropy else None)
    return (zt.sum(dim=0) - top) - log_total, top + log_total, ent


def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    inv_temperature: float,
    need_hidden: bool,
    need_weight: bool,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel.

    Args:
        hidden: ``[N, H]`` bf16/fp16/fp32, last dim contiguous.
        weight: ``[V, H]`` same dtype, last dim contiguous.
        targets: ``[N]`` int64/int32.
        lse: ``[N]`` float32 from :func:`linear_logprobs_fwd`.
        grad_logp: ``[N]`` float32, upstream gradient of ``logp``.
        inv_temperature: ``1 / T``.
        need_hidden / need_weight: which gradients to compute.
        entropy: ``[N]`` float32 from :func:`linear_logprobs_fwd`, needed with ``grad_entropy``.
        grad_entropy: ``[N]`` float32 or None, upstream gradient of the entropy.

    Returns:
        ``(grad_hidden [N, H], grad_weight [V, H])`` in the input dtype, None where not needed.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = launch_config(hidden.dtype)
    gh, gw = grad_buffers(hidden, weight, need_hidden, need_weight)
    entropy_grad = grad_entropy is not None
    if entropy_grad and entropy is None:
        raise ValueError("linear_logprobs_bwd: grad_entropy needs the forward's entropy")
    if n > 0:
        ent, ge = (entropy, grad_entropy) if entropy_grad else (lse, lse)  # lse stands in as unused pointers
        _logprobs_bwd_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))](
            hidden, weight, targets, lse, grad_logp, ent, ge, gh, gw, n, v, h, hidden.stride(0),
            weight.stride(0), inv_temperature, PRECISION=dot_precision(hidden.dtype), COMPUTE_DH=need_hidden,
            COMPUTE_DW=need_weight, ENTROPY_GRAD=entropy_grad, **cfg,
        )  # fmt: skip
    return (
        gh.to(hidden.dtype) if need_hidden else None,
        gw.to(weight.dtype) if need_weight else None,
    )
