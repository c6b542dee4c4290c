"""SOD step weights (README: The algorithm steps 1-2): per-step divergence and the clipped telescoped weight.

For each row, a step k is the k-th maximal run of ``response_mask = 1``;
``d_k = mean_{t in k} |s_t - tau_t|``; ``w_1 = 1`` and ``w_k = min((d_1 + eps) / (d_k + eps), 1 + delta)``.
Drop-in replacement for the public reference's per-token Python loop (``sodkern.reference``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sodkern._backend import Backend, select_strategy, triton_interpret, triton_usable
from sodkern._validate import check_finite_where, check_float, check_same_shape, renamed_argument


@dataclass
class StepWeights:
    """Result of :func:`stepwise_weights`.

    Attributes:
        token_weights: ``[B, T]`` float32, the weight of each token's step; 0 where the mask is 0.
        step_divergence: ``[B, K]`` float32, ``d_k``; NaN where a row has fewer than K steps.
        step_weights: ``[B, K]`` float32, ``w_k``; NaN-padded likewise.
        num_steps: ``[B]`` int64, steps per row (K = its max, 0 for an empty batch).
    """

    token_weights: torch.Tensor
    step_divergence: torch.Tensor
    step_weights: torch.Tensor
    num_steps: torch.Tensor


def _runs(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, first token and end (exclusive) of every step of a contiguous ``[B, T]`` bool mask, row-major order.

    One ``diff`` over the mask padded with a 0 column on each side marks every run boundary; boundaries alternate
    start, end within a row, so one ``nonzero`` finds all of them.
    """
    B = m.shape[0]
    zero = torch.zeros(B, 1, dtype=torch.uint8, device=m.device)
    edges = torch.diff(m.view(torch.uint8), dim=1, prepend=zero, append=zero)  # [B, T + 1], 255 at ends
    pos = edges.nonzero()
    return pos[0::2, 0], pos[0::2, 1], pos[1::2, 1]


def _torch_path(
    s: torch.Tensor, tau: torch.Tensor, m: torch.Tensor, eps: float, delta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step weights from run boundaries: about seven passes over the ``[B, T]`` inputs.

    Returns ``(token_weights [B, T] f32, d [B, K] f64, w [B, K] f64, num_steps [B] int64)``.
    """
    B, T = m.shape
    rows, starts, ends = _runs(m)
    num_steps = torch.bincount(rows, minlength=B)
    K = int(num_steps.max()) if B else 0
    # The flat [B*T] array is a sequence of segments gap_0, step_1, gap_1, ..., step_S, gap_S.
    breaks = torch.stack([rows * T + starts, rows * T + ends], dim=1).flatten()
    bounds = torch.cat([breaks.new_zeros(1), breaks, breaks.new_full((1,), B * T)])
    lengths = bounds.diff()
    x = (s - tau).abs_().reshape(-1)
    sums = torch.segment_reduce(x, "sum", lengths=lengths)[1::2].double() if rows.numel() else x.new_zeros(0).double()
    if not bool(torch.isfinite(sums).all()):
        check_finite_where(s, m, "old_logp")
        check_finite_where(tau, m, "teacher_logp")
    d_flat = sums / (ends - starts).double()
    first = torch.cumsum(num_steps, 0) - num_steps  # index of each row's first step
    k = torch.arange(rows.numel(), device=m.device) - first[rows]
    d1 = d_flat[first[rows]]
    w_flat = torch.where(k == 0, 1.0, torch.clamp_max((d1 + eps) / (d_flat + eps), 1.0 + delta))
    d = torch.full((B, K), torch.nan, dtype=torch.float64, device=m.device)
    w = torch.full((B, K), torch.nan, dtype=torch.float64, device=m.device)
    d[rows, k] = d_flat
    w[rows, k] = w_flat
    vals = torch.zeros(lengths.numel(), dtype=torch.float32, device=m.device)
    vals[1::2] = w_flat.float()
    token_weights = torch.repeat_interleave(vals, lengths, output_size=B * T).view(B, T)
    return token_weights, d, w, num_steps


def stepwise_weights(
    old_logp: torch.Tensor | None = None,
    teacher_logp: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    delta: float = 0.2,
    backend: Backend | None = None,
    student_logp: torch.Tensor | None = None,
) -> StepWeights:
    """SOD step divergences and weights for a padded batch.

    Args:
        old_logp: ``[B, T]`` float, rollout (old-policy) log-prob ``s`` of each sampled token.
        teacher_logp: ``[B, T]`` float, teacher log-prob of the same tokens; must be finite where the mask is 1.
        response_mask: ``[B, T]`` bool/int/float with values 0/1; 1 on tokens the student generated.
        eps: added to every divergence before the ratio (SOD default 1e-6).
        delta: weights are clipped to at most ``1 + delta`` (SOD training script: 0.2).
        backend: "torch", "tiled" (the step kernels of :mod:`sodkern.kernels.step_weights`) or "chunked" (the
            same kernels where Triton can run, else torch); default ``SODKERN_BACKEND``, else "auto" (Triton
            on CUDA).

        student_logp: deprecated name of ``old_logp``.

    Returns:
        :class:`StepWeights`. No gradient flows through any of its tensors.
    """
    old_logp = renamed_argument(old_logp, student_logp, "old_logp", "student_logp", "stepwise_weights")
    teacher_logp = renamed_argument(teacher_logp, None, "teacher_logp", "", "stepwise_weights")
    response_mask = renamed_argument(response_mask, None, "response_mask", "", "stepwise_weights")
    if old_logp.dim() != 2:
        raise ValueError(f"old_logp must be [B, T], got shape {tuple(old_logp.shape)}")
    check_float(old_logp, "old_logp")
    check_float(teacher_logp, "teacher_logp")
    check_same_shape(old_logp, teacher_logp, "old_logp", "teacher_logp")
    check_same_shape(old_logp, response_mask, "old_logp", "response_mask")
    if response_mask.dtype == torch.bool:
        m = response_mask.contiguous()
    else:
        m = (response_mask != 0).contiguous()
        if not torch.equal(response_mask, m.to(response_mask.dtype)):
            raise ValueError("response_mask must contain only 0 and 1")

    with torch.no_grad():
        s, tau = old_logp.detach(), teacher_logp.detach()
        strategy = select_strategy(s, tau, response_mask, backend=backend)
        # "chunked" means Triton where it can run (as for the lm-head ops), torch elsewhere
        if strategy == "torch" or (strategy == "chunked" and not triton_usable(s, tau, response_mask)):
            token_weights, d, w, num_steps = _torch_path(s.float(), tau.float(), m, eps, delta)
            return StepWeights(
                token_weights=token_weights, step_divergence=d.float(), step_weights=w.float(), num_steps=num_steps
            )

        from sodkern.kernels import step_weights as kern

        interpret = triton_interpret()
        mask = m.view(torch.uint8)
        num_steps = kern.count_steps(mask, interpret=interpret)
        K = int(num_steps.max()) if num_steps.numel() else 0
        sums, counts = kern.step_sums(s.contiguous(), tau.contiguous(), mask, K, interpret=interpret)
        if not bool(torch.isfinite(sums).all()):  # a non-finite value inside a step: name the argument
            check_finite_where(s, m, "old_logp")
            check_finite_where(tau, m, "teacher_logp")
        valid = torch.arange(K, device=s.device) < num_steps[:, None]
        d = torch.where(valid, sums.double() / counts.double().clamp_min(1), torch.nan)
        w = torch.clamp_max((d[:, :1] + eps) / (d + eps), 1.0 + delta)
        w = torch.where(valid, w, torch.nan)
        if K:
            w[:, 0] = torch.where(valid[:, 0], 1.0, torch.nan)
        w32 = w.float()
        token_weights = kern.token_weights(mask, torch.nan_to_num(w32, nan=0.0).contiguous(), interpret=interpret)
    return StepWeights(token_weights=token_weights, step_divergence=d.float(), step_weights=w32, num_steps=num_steps)
