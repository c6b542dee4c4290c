"""Fused full-vocabulary reverse KL(p_student || p_teacher) per token, straight from the two lm heads.

``z_s = student_hidden @ student_weight.T / T``, ``z_t = teacher_hidden @ teacher_weight.T / T`` and
``KL = sum_j p_s_j (log p_s_j - log p_t_j)``; neither ``[N, V]`` logits tensor is materialised. Strategies
as in :mod:`sodkern.ops.linear_logprobs`: ``chunked`` (:mod:`sodkern.ops._chunked`), ``tiled`` (the Triton
kernels of :mod:`sodkern.kernels.linear_kl`) or ``torch`` (a loop over ``token_chunk_size(V)`` tokens).
Gradients flow to the student inputs only: ``dKL/dz_s_j = p_s_j * (log p_s_j - log p_t_j - KL)``.
"""

from __future__ import annotations

import torch

from sodkern._backend import Backend, Strategy
from sodkern._validate import check_lm_head, check_temperature
from sodkern.ops import _chunked
from sodkern.ops._torch import acc_dtype, chunk_logits, chunked_head_grads, log_softmax_, token_chunks
from sodkern.ops.linear_logprobs import strategy_for


def _torch_fwd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    inv_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked torch forward; same contract as :func:`sodkern.kernels.linear_kl.linear_reverse_kl_fwd`
    (outputs in the student's accumulation dtype). Low-precision weights are upcast once."""
    n = student_hidden.shape[0]
    acc = acc_dtype(student_hidden.dtype)
    sw, tw = student_weight.to(acc), teacher_weight.to(acc)
    kl = torch.empty(n, dtype=acc, device=student_hidden.device)
    lse_s, lse_t = torch.empty_like(kl), torch.empty_like(kl)
    for rows in token_chunks(n, sw.shape[0]):
        log_ps = chunk_logits(student_hidden[rows], sw, inv_temperature)
        lse_s[rows] = log_softmax_(log_ps)
        log_pt = chunk_logits(teacher_hidden[rows], tw, inv_temperature)
        lse_t[rows] = log_softmax_(log_pt)
        kl[rows] = log_pt.neg_().add_(log_ps).mul_(log_ps.exp()).sum(dim=-1)
    return kl, lse_s, lse_t


def _torch_bwd(
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
    """Chunked torch backward: recompute both logits blocks, then
    ``dz = g * p_s * (log p_s - log p_t - KL) / T`` and two matmuls."""
    acc = acc_dtype(student_hidden.dtype)
    tw = teacher_weight.to(acc)
    g = grad_kl.to(acc) * inv_temperature

    def chunk_dz(rows: slice, h_c: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
        log_ps = chunk_logits(h_c, sw, inv_temperature).sub_(lse_s[rows, None])
        dz = chunk_logits(teacher_hidden[rows], tw, inv_temperature).sub_(lse_t[rows, None])
        return dz.neg_().add_(log_ps).sub_(kl[rows, None]).mul_(log_ps.exp_()).mul_(g[rows, None])

    return chunked_head_grads(student_hidden, student_weight, need_hidden, need_weight, chunk_dz)


def _forward(
    strategy: Strategy, sh: torch.Tensor, sw: torch.Tensor, th: torch.Tensor, tw: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if strategy == "chunked":
        return _chunked.reverse_kl_fwd(sh, sw, th, tw, inv_temperature)
    if strategy == "tiled":
        from sodkern.kernels.linear_kl import linear_reverse_kl_fwd  # lazy: Triton only when used

        return linear_reverse_kl_fwd(sh, sw, th, tw, inv_temperature)
    return _torch_fwd(sh, sw, th, tw, inv_temperature)


class LinearReverseKLFunction(torch.autograd.Function):
    """Autograd wrapper on flattened inputs ``[N, Hs]``, ``[V, Hs]``, ``[N, Ht]``, ``[V, Ht]``.

    Saves the four inputs and the per-token ``lse_s``, ``lse_t``, ``kl`` (``[N]`` each), never logits. The
    teacher inputs get no gradient.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        inv_temperature: float,
        strategy: Strategy,
    ) -> torch.Tensor:
        kl, lse_s, lse_t = _forward(
            strategy, student_hidden, student_weight, teacher_hidden, teacher_weight, inv_temperature
        )
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight, lse_s, lse_t, kl)
        ctx.inv_temperature = inv_temperature
        ctx.strategy = strategy
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        sh, sw, th, tw, lse_s, lse_t, kl = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.strategy == "chunked":
            bwd = _chunked.reverse_kl_bwd
        elif ctx.strategy == "tiled":
            from sodkern.kernels.linear_kl import linear_reverse_kl_bwd as bwd

            grad_kl = grad_kl.float().contiguous()
        else:
            bwd = _torch_bwd
        gh, gw = bwd(sh, sw, th, tw, lse_s, lse_t, kl, grad_kl, ctx.inv_temperature, need_hidden, need_weight)
        return gh, gw, None, None, None, None


def linear_reverse_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Per-token full-vocabulary reverse KL(p_student || p_teacher) from the final hidden states and lm heads.

    ``p_student = softmax(student_hidden @ student_weight.T / temperature)`` and likewise for the teacher.
    The ``[N, V]`` logits are never materialised (extra memory: O(N) per-token values plus one block per
    model, see :func:`sodkern.ops.linear_logprobs.linear_logprobs`); logits are accumulated in fp32 (fp64
    for fp64 inputs). The result is not clamped at 0: rounding can leave tiny negative values.

    Args:
        student_hidden: ``[..., Hs]`` bf16, fp16, fp32 or fp64.
        student_weight: ``[V, Hs]``, same dtype and device as ``student_hidden``.
        teacher_hidden: ``[..., Ht]`` bf16, fp16, fp32 or fp64, same leading dims as ``student_hidden``
            (``Ht`` may differ from ``Hs``). Treated as a constant (detached).
        teacher_weight: ``[V, Ht]``, same dtype as ``teacher_hidden``, same vocabulary size ``V``. Constant.
        temperature: positive; both models' logits are divided by it.
        backend: "auto", "chunked", "tiled" or "torch" (see :mod:`sodkern._backend`); default
            ``SODKERN_BACKEND``, else "auto" (chunked on CUDA, torch on CPU).

    Returns:
        ``kl`` ``[...]`` float32 (float64 for fp64 student inputs), differentiable w.r.t. ``student_hidden``
        and ``student_weight`` only.

    Raises:
        ValueError: naming the argument, for non-float inputs, mismatched shapes, dtypes, devices or
            vocabulary sizes, or a bad ``temperature``.
    """
    check_lm_head(student_hidden, student_weight, "student_hidden", "student_weight")
    check_lm_head(teacher_hidden, teacher_weight, "teacher_hidden", "teacher_weight")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden has shape {tuple(teacher_hidden.shape)} but student_hidden has shape "
            f"{tuple(student_hidden.shape)}: the leading (token) dims must match"
        )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight has vocabulary size {teacher_weight.shape[0]} but student_weight has "
            f"{student_weight.shape[0]}: the vocabularies must match"
        )
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(
            f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on {student_hidden.device}"
        )
    inv_temperature = check_temperature(temperature)

    lead = student_hidden.shape[:-1]
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    sw, tw = student_weight, teacher_weight.detach()
    strategy = strategy_for(backend, sh, sw, th, tw)
    if strategy != "torch":
        sh, sw, th, tw = sh.contiguous(), sw.contiguous(), th.contiguous(), tw.contiguous()
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad):
        kl = LinearReverseKLFunction.apply(sh, sw, th, tw, inv_temperature, strategy)
    else:  # nothing to differentiate: skip autograd so nothing is saved
        kl = _forward(strategy, sh, sw, th, tw, inv_temperature)[0]
    return kl.reshape(lead)
