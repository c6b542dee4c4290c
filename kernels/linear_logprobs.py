"""Triton kernels for the fused linear log-prob op: log softmax(hidden @ weight.T / T)[target] without logits.

Forward: grid (token blocks, vocabulary splits). Each program walks its share of the vocabulary in
``BLOCK_V`` tiles; each tile of logits is a ``tl.dot`` over an ``H`` loop (fp32 accumulation) and feeds an
online max / sum-exp (and, optionally, an online entropy accumulator) per row. The split that owns a row's
target column also returns that logit. The per-split partials, ``[splits, N]`` each, are merged in torch
(:func:`merge_lse_partials`), so no ``[N, V]`` tensor ever exists.

Backward: grid (token blocks, vocabulary blocks), Cut-Cross-Entropy style. Each program recomputes its logits
tile, forms ``dz = g * (onehot - p) / T`` and, in a second loop over ``H``, adds ``dz @ weight`` into
``grad_hidden`` and ``dz.T @ hidden`` into ``grad_weight``. Both are fp32 buffers updated with fp32
atomics (one kernel instead of two recomputing passes; the price is a non-deterministic summation order),
cast to the input dtype by the caller. On GPU the ``dz`` operand of those two products is cast to the input
dtype (bf16/fp16 tensor cores, fp32 accumulation).

All offsets are int64 (``program_id(..).to(tl.int64)``) so ``N * V`` or ``V * H`` beyond 2**31 is safe.
Under ``TRITON_INTERPRET=1`` the operands are upcast to fp32 before ``tl.dot`` (``UPCAST``): the interpreter
returns garbage for ``tl.dot`` on bf16 operands.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_config(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """Fixed ``(BLOCK_N, BLOCK_V, BLOCK_H, num_warps)`` for operands of ``dtype`` (no autotuning yet)."""
    if interpreting():
        return 16, 32, 32, 1
    if dtype == torch.float32:
        return 32, 64, 32, 4
    return 64, 128, 64, 8


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact fp32 products ("ieee"), not TF32; low-precision operands use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def vocab_splits(n_blocks: int, v_blocks: int, device: torch.device) -> tuple[int, int]:
    """Split the vocabulary so the forward grid has enough programs: returns (blocks_per_split, splits)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    target = 2 * sms
    splits = min(v_blocks, max(1, triton.cdiv(target, n_blocks)))
    per_split = triton.cdiv(v_blocks, splits)
    return per_split, triton.cdiv(v_blocks, per_split)


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
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``hidden[rows] @ weight[cols].T`` as a ``[BLOCK_N, BLOCK_V]`` fp32 tile (masked entries are 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < H
        a = tl.load(
            h_ptr + rows[:, None] * stride_h + hs[None, :],
            mask=row_mask[:, None] & h_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + cols[None, :] * stride_w + hs[:, None],
            mask=col_mask[None, :] & h_mask[:, None],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


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

    ``dz`` is ``[BLOCK_N, BLOCK_V]`` fp32 and must be 0 outside ``row_mask x col_mask``; ``gh`` and ``gw`` are
    contiguous fp32 buffers of row length ``H``.
    """
    dz_op = dz if UPCAST else dz.to(h_ptr.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < H
        if COMPUTE_DH:
            w = tl.load(
                w_ptr + cols[:, None] * stride_w + hs[None, :],
                mask=col_mask[:, None] & h_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(dz_op, w, input_precision=PRECISION)
            tl.atomic_add(
                gh_ptr + rows[:, None] * H + hs[None, :],
                dh,
                mask=row_mask[:, None] & h_mask[None, :],
                sem="relaxed",
            )
        if COMPUTE_DW:
            h = tl.load(
                h_ptr + rows[:, None] * stride_h + hs[None, :],
                mask=row_mask[:, None] & h_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dz_op), h, input_precision=PRECISION)
            tl.atomic_add(
                gw_ptr + cols[:, None] * H + hs[None, :],
                dw,
                mask=col_mask[:, None] & h_mask[None, :],
                sem="relaxed",
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
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_s * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        acc = logits_tile(
            h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
            BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION,
        )  # fmt: skip
        z = tl.where(col_mask[None, :], acc * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        if ENTROPY:
            # t = sum exp(z - m) * (z - m); rebasing m -> m_new: alpha * (t + (m - m_new) * s)
            shift = tl.where(s > 0, m - m_new, 0.0) * s
            d = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            t = alpha * (t + shift) + tl.sum(e * d, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
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
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    acc = logits_tile(
        h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION,
    )  # fmt: skip
    p = tl.exp(acc * inv_t - lse[:, None])
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    dz = (onehot - p) * (g * inv_t)[:, None]
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    accumulate_grads(
        dz, h_ptr, w_ptr, gh_ptr, gw_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
        BLOCK_H, UPCAST, PRECISION, COMPUTE_DH, COMPUTE_DW,
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
    block_n, block_v, block_h, num_warps = block_config(hidden.dtype)
    n_blocks = triton.cdiv(n, block_n)
    per_split, splits = vocab_splits(n_blocks, triton.cdiv(v, block_v), hidden.device)
    m = torch.empty((splits, n), dtype=torch.float32, device=hidden.device)
    s = torch.empty_like(m)
    zt = torch.empty_like(m)
    t = torch.empty_like(m) if entropy else s  # s stands in as an unused pointer
    _logprobs_fwd_kernel[(n_blocks, splits)](
        hidden, weight, targets, m, s, t, zt, n, v, h, hidden.stride(0), weight.stride(0),
        inv_temperature, per_split,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, UPCAST=interpreting(),
        PRECISION=dot_precision(hidden.dtype), ENTROPY=entropy, num_warps=num_warps,
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

    Returns:
        ``(grad_hidden [N, H], grad_weight [V, H])`` in the input dtype, None where not needed.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    block_n, block_v, block_h, num_warps = block_config(hidden.dtype)
    gh = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_hidden else lse
    gw = torch.zeros((v, h), dtype=torch.float32, device=hidden.device) if need_weight else lse
    if n > 0:
        _logprobs_bwd_kernel[(triton.cdiv(n, block_n), triton.cdiv(v, block_v))](
            hidden, weight, targets, lse, grad_logp, gh, gw, n, v, h, hidden.stride(0), weight.stride(0),
            inv_temperature,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, UPCAST=interpreting(),
            PRECISION=dot_precision(hidden.dtype), COMPUTE_DH=need_hidden, COMPUTE_DW=need_weight,
            num_warps=num_warps,
        )  # fmt: skip
    return (
        gh.to(hidden.dtype) if need_hidden else None,
        gw.to(weight.dtype) if need_weight else None,
    )
