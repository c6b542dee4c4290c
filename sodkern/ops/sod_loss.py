"""The SOD loss (README: The algorithm) in one call: fused log-probs, step weights, advantages, PPO dual clip.

Only tokens with ``response_mask = 1`` go through the lm head; logits are never materialised (the log-probs
come from :func:`sodkern.linear_logprobs`, chunked over tokens and vocabulary), and the backward pass flows
through the same fused op.

With the ``chunked`` strategy and ``divergence="logprob"`` the gradient is computed in the forward
(:func:`sodkern.ops._chunked.fused_logprob_loss`): the step weights and advantages do not depend on the
current policy, so each token's upstream gradient is known as soon as its log-prob is, and the lm head costs
3 GEMM passes (logits, grad hidden, grad weight) instead of 4 (the backward would recompute the logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from sodkern._backend import Backend
from sodkern._validate import check_float, check_lm_head, check_same_shape, check_targets, check_temperature
from sodkern.ops import _chunked
from sodkern.ops.linear_kl import linear_reverse_kl
from sodkern.ops.linear_logprobs import linear_logprobs, strategy_for
from sodkern.ops.step_weights import StepWeights, stepwise_weights

Weighting = Literal["sod", "uniform", "none"]
Divergence = Literal["logprob", "full_kl"]


@dataclass
class SODLossOutput:
    """Result of :func:`sod_loss`. Every tensor except ``loss`` is detached.

    Attributes:
        loss: scalar, differentiable: token mean over mask = 1 tokens (or over ``num_tokens``).
        token_weights: ``[B, T]`` float32 step weight w of each token (1 on mask tokens for "uniform", 0 for "none").
        advantages: ``[B, T]`` float32 total advantage ``A_t`` (0 outside the mask).
        logp: ``[B, T]`` float32 current-policy log-probs ``l_t`` (0 outside the mask).
        steps: the :class:`StepWeights` of "sod" weighting, else None.
        metrics: 0-dim float32 tensors: ``pg_loss``, ``distill_loss`` (full_kl only), ``mean_token_weight``,
            ``mean_step_divergence``, ``pg_clipfrac``, ``pg_clipfrac_lower``, ``ppo_kl``, ``num_tokens``.
    """

    loss: torch.Tensor
    token_weights: torch.Tensor
    advantages: torch.Tensor
    logp: torch.Tensor
    steps: StepWeights | None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def metrics_dict(self) -> dict[str, float]:
        """The metrics as Python floats (one host sync)."""
        return {k: float(v) for k, v in self.metrics.items()}


def ppo_dual_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate with dual clip (README: The algorithm step 5).

    Args:
        logp: ``[N]`` float32 current log-probs ``l_t`` (differentiable).
        old_logp: ``[N]`` float32 rollout log-probs ``s_t``.
        advantages: ``[N]`` float32 ``A_t``.
    Returns:
        ``(loss [N], clipped [N] bool, dual_clipped [N] bool)``.
    """
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped_loss = torch.maximum(pg1, pg2)
    pg3 = -advantages * clip_c
    dual = (advantages < 0) & (clipped_loss > pg3)
    loss = torch.where(advantages < 0, torch.minimum(clipped_loss, pg3), clipped_loss)
    return loss, (pg2 > pg1).detach(), dual.detach()


class FusedPolicyLossFunction(torch.autograd.Function):
    """``(loss, logp)`` of :func:`sodkern.ops._chunked.fused_logprob_loss`; the gradients are computed in
    the forward and scaled by the loss's upstream gradient in the backward. ``logp`` is not differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature, token_loss):
        loss, logp, gh, gw = _chunked.fused_logprob_loss(
            hidden, weight, targets, inv_temperature, token_loss, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(gh, gw)
        ctx.mark_non_differentiable(logp)
        return loss, logp

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_logp: torch.Tensor):
        gh, gw = ctx.saved_tensors
        gh = gh * grad_loss.to(gh.dtype) if gh is not None else None
        gw = gw * grad_loss.to(gw.dtype) if gw is not None else None
        return gh, gw, None, None, None


def sod_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    teacher_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    weighting: Weighting = "sod",
    eps: float = 1e-6,
    delta: float = 0.2,
    opd_coef: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float = 3.0,
    temperature: float = 1.0,
    divergence: Divergence = "logprob",
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
    backend: Backend | None = None,
) -> SODLossOutput:
    """SOD loss of a padded batch.

    Args:
        hidden: ``[B, T, H]`` bf16/fp16/fp32 final hidden states of the student; position t predicts ``targets[:, t]``.
        weight: ``[V, H]`` lm-head weight, same dtype as ``hidden``.
        targets: ``[B, T]`` int64 sampled token ids.
        old_logp: ``[B, T]`` float32 rollout log-probs ``s_t`` of the targets.
        teacher_logp: ``[B, T]`` float32 teacher log-probs ``tau_t``; may be None when ``weighting="none"`` or
            ``divergence="full_kl"``.
        advantages: ``[B]`` or ``[B, T]`` float32 GRPO advantage ``A_grpo`` (broadcast over tokens if ``[B]``).
        response_mask: ``[B, T]`` 0/1, 1 on tokens the student generated.
        weighting: "sod" (step weights), "uniform" (w = 1: OPD) or "none" (pure GRPO, no teacher term).
        eps, delta: step-weight constants (README: The algorithm).
        opd_coef: ``c``, the scale of the distillation term.
        clip_low, clip_high, clip_c: PPO ratio clip range and dual-clip constant.
        temperature: logits are divided by it before the softmax.
        divergence: "logprob" (SOD: d_k from |s - tau|, distillation through the advantage ``c·w·(tau - s)``) or
            "full_kl" (dense: d_k from the per-token full-vocabulary reverse KL, and ``c·w·KL`` added to the loss).
        teacher_hidden: ``[B, T, Ht]`` teacher hidden states, for ``divergence="full_kl"``.
        teacher_weight: ``[V, Ht]`` teacher lm-head weight, for ``divergence="full_kl"``.
        num_tokens: normaliser of the token mean (default: mask tokens of this batch); pass the mini-batch's token
            count when accumulating gradients over micro-batches.
        backend: "auto", "chunked", "tiled" or "torch" for the fused lm-head ops (see :mod:`sodkern._backend`);
            default ``SODKERN_BACKEND``, else "auto". "chunked" with ``divergence="logprob"`` computes the
            gradient in the forward (3 GEMM passes).

    Returns:
        :class:`SODLossOutput`.
    """
    if weighting not in ("sod", "uniform", "none"):
        raise ValueError(f"weighting must be 'sod', 'uniform' or 'none', got {weighting!r}")
    if divergence not in ("logprob", "full_kl"):
        raise ValueError(f"divergence must be 'logprob' or 'full_kl', got {divergence!r}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    B, T, H = hidden.shape
    if targets.shape != (B, T):
        raise ValueError(f"targets has shape {tuple(targets.shape)} but hidden is [B, T, H] = {(B, T, H)}")
    for name, x in (("old_logp", old_logp), ("response_mask", response_mask)):
        check_same_shape(targets, x, "targets", name)
    check_float(old_logp, "old_logp")
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"advantages must be [B] or [B, T] with B={B}, T={T}, got {tuple(advantages.shape)}")
    needs_tau = weighting != "none" and divergence == "logprob"
    if needs_tau and teacher_logp is None:
        raise ValueError(f"teacher_logp is required for weighting={weighting!r}")
    if teacher_logp is not None:
        check_same_shape(targets, teacher_logp, "targets", "teacher_logp")
    full_kl = divergence == "full_kl" and weighting != "none"
    if full_kl and (teacher_hidden is None or teacher_weight is None):
        raise ValueError("divergence='full_kl' needs teacher_hidden and teacher_weight")

    m = response_mask != 0
    old = old_logp.detach().float()
    adv = advantages.detach().float()
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    zeros = torch.zeros(B, T, dtype=torch.float32, device=hidden.device)

    flat = m.reshape(-1).nonzero().squeeze(1)
    h_sel = hidden.reshape(B * T, H).index_select(0, flat)
    t_sel = targets.reshape(-1).index_select(0, flat)
    n_tok = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=hidden.device)
    denom = n_tok.clamp_min(1).float()
    fused = (
        not full_kl
        and torch.is_grad_enabled()
        and (hidden.requires_grad or weight.requires_grad)
        and strategy_for(backend, hidden, weight) == "chunked"
    )

    steps = None
    kl_sel = None
    logp_sel = None
    if full_kl:
        logp_sel = linear_logprobs(h_sel, weight, t_sel, temperature=temperature, backend=backend)
        th = teacher_hidden.reshape(B * T, teacher_hidden.shape[-1]).index_select(0, flat)
        kl_sel = linear_reverse_kl(h_sel, weight, th, teacher_weight, temperature=temperature, backend=backend)
        signal = zeros.reshape(-1).index_put((flat,), kl_sel.detach().float()).reshape(B, T)
        step_signal, step_baseline = signal, zeros  # d_k = step mean of |KL - 0|
    elif needs_tau:
        tau = teacher_logp.detach().float()
        step_signal, step_baseline = old, tau
    if weighting == "sod":
        steps = stepwise_weights(step_signal, step_baseline, response_mask, eps=eps, delta=delta, backend=backend)
        w = steps.token_weights
    elif weighting == "uniform":
        w = m.float()
    else:
        w = zeros

    total_adv = adv
    if needs_tau:
        opd = torch.where(m, tau - old, 0.0)
        total_adv = adv + opd_coef * w * opd
    total_adv = torch.where(m, total_adv, 0.0)

    old_sel, adv_sel = old.reshape(-1)[flat], total_adv.reshape(-1)[flat]
    clip = {"clip_low": clip_low, "clip_high": clip_high, "clip_c": clip_c}
    if fused:  # gradient in the forward: weights and advantages are known before the current log-probs
        check_lm_head(hidden, weight, "hidden", "weight")
        check_targets(t_sel, weight.shape[0])

        def token_loss(lp: torch.Tensor, rows: slice) -> torch.Tensor:
            return ppo_dual_clip_loss(lp.float(), old_sel[rows], adv_sel[rows], **clip)[0].sum() / denom

        pg_loss, logp_sel = FusedPolicyLossFunction.apply(
            h_sel.contiguous(), weight.contiguous(), t_sel, check_temperature(temperature), token_loss
        )
        pg_loss = pg_loss.float()
        with torch.no_grad():
            _, clipped, dual = ppo_dual_clip_loss(logp_sel.float(), old_sel, adv_sel, **clip)
    else:
        if logp_sel is None:
            logp_sel = linear_logprobs(h_sel, weight, t_sel, temperature=temperature, backend=backend)
        pg, clipped, dual = ppo_dual_clip_loss(logp_sel.float(), old_sel, adv_sel, **clip)
        pg_loss = pg.sum() / denom
    loss = pg_loss
    metrics: dict[str, torch.Tensor] = {}
    if kl_sel is not None:
        distill = (w.reshape(-1)[flat] * kl_sel.float()).sum() / denom
        loss = loss + opd_coef * distill
        metrics["distill_loss"] = distill.detach()

    with torch.no_grad():
        n_sel = max(flat.numel(), 1)
        logp_full = zeros.reshape(-1).index_put((flat,), logp_sel.detach().float()).reshape(B, T)
        metrics.update(
            pg_loss=pg_loss.detach(),
            mean_token_weight=w.reshape(-1)[flat].sum() / n_sel,
            pg_clipfrac=clipped.float().sum() / n_sel,
            pg_clipfrac_lower=dual.float().sum() / n_sel,
            ppo_kl=(old.reshape(-1)[flat] - logp_sel.detach().float()).sum() / n_sel,
            num_tokens=torch.tensor(float(flat.numel()), device=hidden.device),
        )
        if steps is not None:
            d = steps.step_divergence
            metrics["mean_step_divergence"] = torch.nan_to_num(d, nan=0.0).sum() / (~torch.isnan(d)).sum().clamp_min(1)
    return SODLossOutput(loss=loss, token_weights=w, advantages=total_adv, logp=logp_full, steps=steps, metrics=metrics)
