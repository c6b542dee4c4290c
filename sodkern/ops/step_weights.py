"""SOD step weights (SOD.md §2, steps 1-2): per-step divergence and the clipped telescoped weight.

For each row, a step k is the k-th maximal run of ``response_mask = 1``;
``d_k = mean_{t in k} |s_t - tau_t|``; ``w_1 = 1`` and ``w_k = min((d_1 + eps) / (d_k + eps), 1 + delta)``.
Drop-in replacement for the public reference's per-token Python loop (``sodkern.reference``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sodkern._backend import select_backend, triton_interpret
from sodkern._validate import check_finite_where, check_float, check_mask, check_same_shape


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


def _step_ids(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step index of each token (-1 outside steps) and step count per row, for a ``[B, T]`` bool mask."""
    prev = torch.nn.functional.pad(m[:, :-1], (1, 0), value=False)
    start = m & ~prev
    ids = torch.cumsum(start, dim=1) - 1
    return torch.where(m, ids, -1), start.sum(dim=1)


def _sums_torch(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, m: torch.Tensor, K: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step sums of |s - tau| (accumulated in float64) and token counts, ``[B, K]`` each."""
    ids, _ = _step_ids(m)
    slot = torch.where(m, ids, K)  # tokens outside steps go to a discarded slot K
    diff = torch.where(m, (student_logp.double() - teacher_logp.double()).abs(), 0.0)
    B = m.shape[0]
    sums = torch.zeros(B, K + 1, dtype=torch.float64, device=m.device).scatter_add_(1, slot, diff)
    counts = torch.zeros(B, K + 1, dtype=torch.float64, device=m.device).scatter_add_(1, slot, m.double())
    return sums[:, :K], counts[:, :K]


def stepwise_weights(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps: float = 1e-6,
    delta: float = 0.2,
) -> StepWeights:
    """SOD step divergences and weights for a padded batch.

    Args:
        student_logp: ``[B, T]`` float, rollout (old-policy) log-prob of each sampled token.
        teacher_logp: ``[B, T]`` float, teacher log-prob of the same tokens; must be finite where the mask is 1.
        response_mask: ``[B, T]`` bool/int/float with values 0/1; 1 on tokens the student generated.
        eps: added to every divergence before the ratio (SOD default 1e-6).
        delta: weights are clipped to at most ``1 + delta`` (SOD training script: 0.2).

    Returns:
        :class:`StepWeights`. No gradient flows through any of its tensors.
    """
    if student_logp.dim() != 2:
        raise ValueError(f"student_logp must be [B, T], got shape {tuple(student_logp.shape)}")
    check_float(student_logp, "student_logp")
    check_float(teacher_logp, "teacher_logp")
    check_same_shape(student_logp, teacher_logp, "student_logp", "teacher_logp")
    check_same_shape(student_logp, response_mask, "student_logp", "response_mask")
    check_mask(response_mask)
    check_finite_where(student_logp, response_mask, "student_logp")
    check_finite_where(teacher_logp, response_mask, "teacher_logp")

    with torch.no_grad():
        s, tau = student_logp.detach(), teacher_logp.detach()
        backend = select_backend(s, tau, response_mask)
        if backend == "triton":
            from sodkern.kernels import step_weights as kern

            interpret = triton_interpret()
            mask = response_mask.contiguous()
            if mask.dtype == torch.bool:
                mask = mask.view(torch.uint8)
            num_steps = kern.count_steps(mask, interpret=interpret)
            K = int(num_steps.max()) if num_steps.numel() else 0
            sums, counts = kern.step_sums(s.contiguous(), tau.contiguous(), mask, K, interpret=interpret)
        else:
            m = response_mask != 0
            _, num_steps = _step_ids(m)
            K = int(num_steps.max()) if num_steps.numel() else 0
            sums, counts = _sums_torch(s, tau, m, K)

        valid = torch.arange(K, device=s.device) < num_steps[:, None]
        d = torch.where(valid, sums.double() / counts.double().clamp_min(1), torch.nan)
        w = torch.clamp_max((d[:, :1] + eps) / (d + eps), 1.0 + delta)
        w = torch.where(valid, w, torch.nan)
        if K:
            w[:, 0] = torch.where(valid[:, 0], 1.0, torch.nan)
        w32 = w.float()
        if backend == "triton":
            tw = kern.token_weights(mask, torch.nan_to_num(w32, nan=0.0).contiguous(), interpret=interpret)
        else:
            ids, _ = _step_ids(m)
            padded = torch.cat([torch.nan_to_num(w32, nan=0.0), w32.new_zeros(w32.shape[0], 1)], dim=1)
            tw = torch.gather(padded, 1, torch.where(m, ids, K))
    return StepWeights(token_weights=tw, step_divergence=d.float(), step_weights=w32, num_steps=num_steps)
