"""Triton fold kernels of the "chunked" strategy: one kernel per logits tile, the GEMMs stay in cuBLAS.

The chunked loop (:mod:`sodkern.ops._chunked`) computes an fp32 logits tile ``z = hidden[rows] @
weight[cols].T`` (``[n, n_cols]``, row stride ``stride_z``, unscaled) with torch, then:

- :func:`fold_lse` folds it into per-row running statistics (online logsumexp ``m``, ``s``; the target logit;
  the entropy accumulator ``t = sum exp(z - m) (z - m)``), one program per row;
- :func:`fold_kl` folds a student tile and a teacher tile into the running statistics of both softmaxes and
  of ``a = sum exp(z_s - m_s) ((z_s - m_s) - (z_t - m_t))`` (differences of shifted logits: a common offset
  of the teacher's logits cancels exactly), so ``KL = a / s_s - log s_s + log s_t``;
- :func:`logprob_grad` / :func:`kl_grad` turn a recomputed tile into ``dL/dz`` (the ``1 / T`` included),
  written to ``out`` (the input dtype, ready for the gradient GEMMs), one program per (row, column block).

All statistics are fp32 ``[n]`` tensors updated in place; logits are scaled by ``inv_t`` inside the kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._interpret import interpreting


def block_cols() -> int:
    """Columns per inner step: small under the interpreter (exercises ragged blocks in tests)."""
    return 64 if interpreting() else 1024


@triton.jit
def _fold_lse_kernel(
    z_ptr, stride_z, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr, vocab_start, n_cols, inv_t,
    ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    t = tl.load(t_ptr + row) if ENTROPY else 0.0
    local = tl.load(tgt_ptr + row).to(tl.int64) - vocab_start
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.where(mask, tl.exp(z - m_new), 0.0)
        if ENTROPY:  # rebase t from m to m_new: alpha * (t + (m - m_new) * s)
            shift = tl.where(s > 0, m - m_new, 0.0) * s
            t = alpha * (t + shift) + tl.sum(e * tl.where(mask, z - m_new, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    if ENTROPY:
        tl.store(t_ptr + row, t)
    if (local >= 0) & (local < n_cols):
        tl.store(zt_ptr + row, tl.load(z_row + local).to(tl.float32) * inv_t)


@triton.jit
def _fold_kl_kernel(
    zs_ptr, zt_ptr, stride_s, stride_t, ms_ptr, ss_ptr, mt_ptr, st_ptr, a_ptr, n_cols, inv_t, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    ms = tl.load(ms_ptr + row)
    ss = tl.load(ss_ptr + row)
    mt = tl.load(mt_ptr + row)
    st = tl.load(st_ptr + row)
    a = tl.load(a_ptr + row)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        zs = tl.load(zs_ptr + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        zt = tl.load(zt_ptr + row * stride_t + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        ms_new = tl.maximum(ms, tl.max(tl.where(mask, zs, float("-inf")), axis=0))
        mt_new = tl.maximum(mt, tl.max(tl.where(mask, zt, float("-inf")), axis=0))
        alpha_s = tl.exp(ms - ms_new)
        es = tl.where(mask, tl.exp(zs - ms_new), 0.0)
        et = tl.where(mask, tl.exp(zt - mt_new), 0.0)
        # a = sum exp(z_s - m_s) ((z_s - m_s) - (z_t - m_t)): rebase both maxes, then add the tile
        started = ss > 0  # before the first tile both maxes are -inf (and a = ss = 0)
        shift = ((tl.where(started, ms, ms_new) - ms_new) + (mt_new - tl.where(started, mt, mt_new))) * ss
        a = alpha_s * (a + shift) + tl.sum(es * tl.where(mask, (zs - ms_new) - (zt - mt_new), 0.0), axis=0)
        ss = ss * alpha_s + tl.sum(es, axis=0)
        st = st * tl.exp(mt - mt_new) + tl.sum(et, axis=0)
        ms = ms_new
        mt = mt_new
    tl.store(ms_ptr + row, ms)
    tl.store(ss_ptr + row, ss)
    tl.store(mt_ptr + row, mt)
    tl.store(st_ptr + row, st)
    tl.store(a_ptr + row, a)


@triton.jit
def _logprob_grad_kernel(
    z_ptr, stride_z, out_ptr, stride_o, tgt_ptr, lse_ptr, g_ptr, ent_ptr, ge_ptr, vocab_start, n_cols, inv_t,
    HAS_G: tl.constexpr, HAS_GE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
    log_p = z - tl.load(lse_ptr + row)
    p = tl.exp(log_p)
    dz = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_G:  # d log p_target / dz_j = 1[j = target] - p_j
        g = tl.load(g_ptr + row)
        onehot = tl.where(cols + vocab_start == tl.load(tgt_ptr + row).to(tl.int64), 1.0, 0.0)
        dz += g * (onehot - p)
    if HAS_GE:  # d entropy / dz_j = -p_j (log p_j + entropy)
        dz -= tl.load(ge_ptr + row) * p * (log_p + tl.load(ent_ptr + row))
    tl.store(out_ptr + row * stride_o + cols, (dz * inv_t).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kl_grad_kernel(
    zs_ptr, zt_ptr, stride_s, stride_t, out_ptr, stride_o, lse_s_ptr, lse_t_ptr, kl_ptr, g_ptr, n_cols, inv_t,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    zs = tl.load(zs_ptr + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
    zt = tl.load(zt_ptr + row * stride_t + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
    log_ps = zs - tl.load(lse_s_ptr + row)
    log_pt = zt - tl.load(lse_t_ptr + row)
    # dKL/dz_s_j = p_s_j (log p_s_j - log p_t_j - KL)
    dz = tl.exp(log_ps) * (log_ps - log_pt - tl.load(kl_ptr + row)) * tl.load(g_ptr + row)
    tl.store(out_ptr + row * stride_o + cols, (dz * inv_t).to(out_ptr.dtype.element_ty), mask=mask)


def fold_lse(
    z: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    inv_t: float,
    m: torch.Tensor,
    s: torch.Tensor,
    zt: torch.Tensor,
    t: torch.Tensor | None,
) -> None:
    """Fold the logits tile ``z`` ``[n, n_cols]`` (fp32, unit column stride) of vocabulary columns
    ``vocab_start + [0, n_cols)`` into ``m``, ``s``, ``zt`` (target logit ``* inv_t``, written only by the tile
    holding the target) and ``t`` (entropy accumulator, or None); ``targets`` ``[n]`` int; stats ``[n]`` fp32."""
    n, n_cols = z.shape
    if n:
        _fold_lse_kernel[(n,)](
            z, z.stride(0), targets, m, s, s if t is None else t, zt, vocab_start, n_cols, inv_t,
            ENTROPY=t is not None, BLOCK=block_cols(),
        )  # fmt: skip


def fold_kl(
    zs: torch.Tensor,
    zt: torch.Tensor,
    inv_t: float,
    ms: torch.Tensor,
    ss: torch.Tensor,
    mt: torch.Tensor,
    st: torch.Tensor,
    a: torch.Tensor,
) -> None:
    """Fold a student tile ``zs`` and a teacher tile ``zt`` (``[n, n_cols]`` fp32, same columns) into the
    running statistics ``ms, ss`` (student), ``mt, st`` (teacher) and ``a``; all ``[n]`` fp32."""
    n, n_cols = zs.shape
    if n:
        _fold_kl_kernel[(n,)](
            zs, zt, zs.stride(0), zt.stride(0), ms, ss, mt, st, a, n_cols, inv_t, BLOCK=block_cols()
        )  # fmt: skip


def logprob_grad(
    z: torch.Tensor,
    out: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    lse: torch.Tensor,
    grad_logp: torch.Tensor | None,
    entropy: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    inv_t: float,
) -> None:
    """Write ``dL/dz`` of the tile ``z`` ``[n, n_cols]`` into ``out`` (same shape, any float dtype; may be
    ``z``): ``(g (onehot - p) - g_ent p (log p + entropy)) * inv_t``; ``lse``, ``grad_logp``, ``entropy``,
    ``grad_entropy`` ``[n]`` fp32 (a gradient may be None)."""
    n, n_cols = z.shape
    if n:
        blk = block_cols()
        _logprob_grad_kernel[(n, triton.cdiv(n_cols, blk))](
            z, z.stride(0), out, out.stride(0), targets, lse,
            lse if grad_logp is None else grad_logp,
            lse if entropy is None else entropy,
            lse if grad_entropy is None else grad_entropy,
            vocab_start, n_cols, inv_t, HAS_G=grad_logp is not None, HAS_GE=grad_entropy is not None, BLOCK=blk,
        )  # fmt: skip


def kl_grad(
    zs: torch.Tensor,
    zt: torch.Tensor,
    out: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    kl: torch.Tensor,
    grad_kl: torch.Tensor,
    inv_t: float,
) -> None:
    """Write ``dKL/dz_s * g`` of the tiles ``zs``, ``zt`` ``[n, n_cols]`` into ``out``: ``g p_s (log p_s -
    log p_t - KL) * inv_t``; ``lse_s``, ``lse_t``, ``kl``, ``grad_kl`` ``[n]`` fp32."""
    n, n_cols = zs.shape
    if n:
        blk = block_cols()
        _kl_grad_kernel[(n, triton.cdiv(n_cols, blk))](
            zs, zt, zs.stride(0), zt.stride(0), out, out.stride(0), lse_s, lse_t, kl, grad_kl, n_cols, inv_t,
            BLOCK=blk,
        )  # fmt: skip
