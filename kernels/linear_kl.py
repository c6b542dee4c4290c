"""Triton kernels for the fused full-vocabulary reverse KL between a student and a teacher lm head.

Per token, with ``z_s = student_hidden @ student_weight.T / T`` and
``z_t = teacher_hidden @ teacher_weight.T / T`` (the two hidden sizes may differ, the vocabulary is shared):

    KL(p_s || p_t) = E_{p_s}[z_s - z_t] - lse_s + lse_t
    dKL/dz_s_j = p_s_j * (z_s_j - z_t_j - lse_s + lse_t - KL)

Forward: grid (token blocks, vocabulary splits), as in :mod:`sodkern.kernels.linear_logprobs`. Each program
computes a student and a teacher logits tile per vocabulary block and keeps, per row, online maxima ``m_s``,
``m_t``, sums ``s_s = sum exp(z_s - m_s)``, ``s_t = sum exp(z_t - m_t)`` and
``a = sum exp(z_s - m_s) * ((z_s - m_s) - (z_t - m_t))``; all terms are relative to the running maxima, so a
large common offset between student and teacher logits does not cancel catastrophically. Then
``KL = a / s_s - log s_s + log s_t``. Partials per split are merged in torch (:func:`merge_kl_partials`).

Backward: grid (token blocks, vocabulary blocks); each program recomputes both tiles, forms
``dz = g * p_s * (log p_s - log p_t - KL) / T`` and accumulates the student gradients with fp32 atomics
(:func:`sodkern.kernels._tiles.accumulate_grads`). The teacher gets no gradient.
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
def _kl_fwd_kernel(
    sh_ptr,
    sw_ptr,
    th_ptr,
    tw_ptr,
    ms_ptr,
    ss_ptr,
    mt_ptr,
    st_ptr,
    a_ptr,
    N,
    V,
    HS,
    HT,
    stride_sh,
    stride_sw,
    stride_th,
    stride_tw,
    inv_t,
    blocks_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION_S: tl.constexpr,
    PRECISION_T: tl.constexpr,
):
    pid_s = tl.program_id(1).to(tl.int64)
    rows, row_mask = span(tl.program_id(0).to(tl.int64) * BLOCK_N, BLOCK_N, N)
    ms = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    mt = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
    st = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_s * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols, col_mask = span(v0, BLOCK_V, v_end)
        zs_raw = logits_tile(
            sh_ptr, sw_ptr, rows, cols, row_mask, col_mask, HS, stride_sh, stride_sw, inv_t,
            BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION_S,
        )  # fmt: skip
        zt_raw = logits_tile(
            th_ptr, tw_ptr, rows, cols, row_mask, col_mask, HT, stride_th, stride_tw, inv_t,
            BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION_T,
        )  # fmt: skip
        ms_new, alpha_s, es, ss_new = online_lse(ms, ss, tl.where(col_mask[None, :], zs_raw, float("-inf")))
        mt_new, _, _, st = online_lse(mt, st, tl.where(col_mask[None, :], zt_raw, float("-inf")))
        # rebase a to the new maxima: each old term gains (ms - ms_new) - (mt - mt_new)
        delta = tl.where(ss > 0, ms - ms_new, 0.0) - tl.where(ss > 0, mt - mt_new, 0.0)
        a = alpha_s * (a + ss * delta)
        # from the unmasked tiles: masked columns would give (-inf) - (-inf)
        d = tl.where(col_mask[None, :], (zs_raw - ms_new[:, None]) - (zt_raw - mt_new[:, None]), 0.0)
        a += tl.sum(es * d, axis=1)
        ss = ss_new
        ms = ms_new
        mt = mt_new
    out = pid_s * N + rows
    tl.store(ms_ptr + out, ms, mask=row_mask)
    tl.store(ss_ptr + out, ss, mask=row_mask)
    tl.store(mt_ptr + out, mt, mask=row_mask)
    tl.store(st_ptr + out, st, mask=row_mask)
    tl.store(a_ptr + out, a, mask=row_mask)


@triton.jit
def _kl_bwd_kernel(
    sh_ptr,
    sw_ptr,
    th_ptr,
    tw_ptr,
    lse_s_ptr,
    lse_t_ptr,
    kl_ptr,
    g_ptr,
    gh_ptr,
    gw_ptr,
    N,
    V,
    HS,
    HT,
    stride_sh,
    stride_sw,
    stride_th,
    stride_tw,
    inv_t,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION_S: tl.constexpr,
    PRECISION_T: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    rows, row_mask = span(tl.program_id(0).to(tl.int64) * BLOCK_N, BLOCK_N, N)
    cols, col_mask = span(tl.program_id(1).to(tl.int64) * BLOCK_V, BLOCK_V, V)
    lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
    kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    log_ps = logits_tile(
        sh_ptr, sw_ptr, rows, cols, row_mask, col_mask, HS, stride_sh, stride_sw, inv_t,
        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION_S,
    ) - lse_s[:, None]  # fmt: skip
    log_pt = logits_tile(
        th_ptr, tw_ptr, rows, cols, row_mask, col_mask, HT, stride_th, stride_tw, inv_t,
        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION_T,
    ) - lse_t[:, None]  # fmt: skip
    dz = tl.exp(log_ps) * (log_ps - log_pt - kl[:, None]) * (g * inv_t)[:, None]
    accumulate_grads(
        dz, sh_ptr, sw_ptr, gh_ptr, gw_ptr, rows, cols, row_mask, col_mask, HS, stride_sh, stride_sw,
        BLOCK_H, UPCAST, PRECISION_S, COMPUTE_DH, COMPUTE_DW,
    )  # fmt: skip


def merge_kl_partials(
    ms: torch.Tensor, ss: torch.Tensor, mt: torch.Tensor, st: torch.Tensor, a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-split partials (each ``[splits, N]`` float32, see the module doc) into
    ``(kl, lse_s, lse_t)``, each ``[N]`` float32."""
    top_s = ms.amax(dim=0)
    top_t = mt.amax(dim=0)
    scale_s = torch.exp(ms - top_s)
    total_s = (scale_s * ss).sum(dim=0)
    total_t = (torch.exp(mt - top_t) * st).sum(dim=0)
    a_total = (scale_s * (a + ss * ((ms - top_s) - (mt - top_t)))).sum(dim=0)
    log_s, log_t = torch.log(total_s), torch.log(total_t)
    return a_total / total_s - log_s + log_t, top_s + log_s, top_t + log_t


def linear_reverse_kl_fwd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    inv_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        student_hidden: ``[N, Hs]`` bf16/fp16/fp32, last dim contiguous.
        student_weight: ``[V, Hs]`` same dtype as ``student_hidden``, last dim contiguous.
        teacher_hidden: ``[N, Ht]`` bf16/fp16/fp32, last dim contiguous.
        teacher_weight: ``[V, Ht]`` same dtype as ``teacher_hidden``, last dim contiguous.
        inv_temperature: ``1 / T``.

    Returns:
        ``(kl, lse_s, lse_t)``, each ``[N]`` float32.
    """
    n, hs = student_hidden.shape
    v, ht = teacher_weight.shape[0], teacher_hidden.shape[1]
    device = student_hidden.device
    if n == 0:
        kl, lse_s, lse_t = (student_hidden.new_empty(0, dtype=torch.float32) for _ in range(3))
        return kl, lse_s, lse_t
    cfg = launch_config(student_hidden.dtype, teacher_hidden.dtype)
    n_blocks, per_split, splits = vocab_splits(n, v, cfg, device)
    parts = torch.empty((5, splits, n), dtype=torch.float32, device=device)
    ms, ss, mt, st, a = parts.unbind(0)
    _kl_fwd_kernel[(n_blocks, splits)](
        student_hidden, student_weight, teacher_hidden, teacher_weight, ms, ss, mt, st, a,
        n, v, hs, ht, student_hidden.stride(0), student_weight.stride(0), teacher_hidden.stride(0),
        teacher_weight.stride(0), inv_temperature, per_split,
        PRECISION_S=dot_precision(student_hidden.dtype), PRECISION_T=dot_precision(teacher_hidden.dtype), **cfg,
    )  # fmt: skip
    return merge_kl_partials(ms, ss, mt, st, a)


def linear_reverse_kl_bwd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    kl: torch.Tensor,
    grad_kl: torch.Tensor,
    inv_temperature: float,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel.

    Args:
        student_hidden, student_weight, teacher_hidden, teacher_weight: as in :func:`linear_reverse_kl_fwd`.
        lse_s, lse_t, kl: ``[N]`` float32 from :func:`linear_reverse_kl_fwd`.
        grad_kl: ``[N]`` float32 upstream gradient.
        inv_temperature: ``1 / T``.
        need_hidden / need_weight: which student gradients to compute.

    Returns:
        ``(grad_student_hidden [N, Hs], grad_student_weight [V, Hs])`` in the student dtype, None where not
        needed.
    """
    n, hs = student_hidden.shape
    v, ht = student_weight.shape[0], teacher_hidden.shape[1]
    gh, gw = grad_buffers(student_hidden, student_weight, need_hidden, need_weight)
    if n > 0:
        cfg = launch_config(student_hidden.dtype, teacher_hidden.dtype)
        _kl_bwd_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))](
            student_hidden, student_weight, teacher_hidden, teacher_weight, lse_s, lse_t, kl, grad_kl, gh, gw,
            n, v, hs, ht, student_hidden.stride(0), student_weight.stride(0), teacher_hidden.stride(0),
            teacher_weight.stride(0), inv_temperature,
            PRECISION_S=dot_precision(student_hidden.dtype), PRECISION_T=dot_precision(teacher_hidden.dtype),
            COMPUTE_DH=need_hidden, COMPUTE_DW=need_weight, **cfg,
        )  # fmt: skip
    return (
        gh.to(student_hidden.dtype) if need_hidden else None,
        gw.to(student_weight.dtype) if need_weight else None,
    )
