"""The public SOD reference's step-weight computation, as a per-token Python loop (README: Benchmarks).

Kept for two reasons: it is the baseline the benchmarks time, and it is the behaviour
:func:`sodkern.stepwise_weights` must reproduce (to float32 rounding) on any input. Do not use it for
training: at 32 x 8,192 tokens it takes about half a second per call.
"""

from __future__ import annotations

import torch

from sodkern._validate import renamed_argument


def reference_stepwise_weights(
    old_logp: torch.Tensor | None = None,
    teacher_logp: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    delta: float = 0.2,
    *,
    student_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token step weights computed the way the public reference does.

    For each sample: walk the tokens reading ``mask[t].item()`` to find the runs of 1; for each run sum
    ``|s - tau| * mask`` over the slice and the mask with ``.item()``; multiply the adjacent ratios
    ``(d_{k-1} + eps) / (d_k + eps)`` in a loop and write each step's weight, clipped on its own to
    ``1 + delta``, into its slice.

    Args:
        old_logp: ``[B, T]`` float32 rollout log-probs (``student_logp``: its deprecated name).
        teacher_logp: ``[B, T]`` float32 teacher log-probs.
        response_mask: ``[B, T]`` 0/1 mask.
    Returns:
        ``[B, T]`` float32 token weights (0 outside steps).
    """
    old_logp = renamed_argument(old_logp, student_logp, "old_logp", "student_logp", "reference_stepwise_weights")
    teacher_logp = renamed_argument(teacher_logp, None, "teacher_logp", "", "reference_stepwise_weights")
    response_mask = renamed_argument(response_mask, None, "response_mask", "", "reference_stepwise_weights")
    B, T = response_mask.shape
    mask = response_mask.float()
    weights = torch.zeros(B, T, dtype=torch.float32, device=old_logp.device)
    for i in range(B):
        spans = []
        t = 0
        while t < T:
            if mask[i, t].item() == 1:
                start = t
                while t < T and mask[i, t].item() == 1:
                    t += 1
                spans.append((start, t))
            else:
                t += 1
        divergences = []
        for a, b in spans:
            diff = (old_logp[i, a:b] - teacher_logp[i, a:b]).abs() * mask[i, a:b]
            divergences.append(diff.sum().item() / mask[i, a:b].sum().item())
        w = 1.0
        for k, (a, b) in enumerate(spans):
            if k > 0:
                w *= (divergences[k - 1] + eps) / (divergences[k] + eps)
            weights[i, a:b] = min(w, 1.0 + delta)
    return weights


def reference_compute_stepwise_opd_weights(
    old_log_probs: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    epsilon: float = 1e-6,
    delta: float = 0.5,
) -> tuple[torch.Tensor, list[dict]]:
    """The SOD authors' fork's ``compute_stepwise_opd_weights``, as its per-token Python loop.

    First a pass over every token of every row with ``.item()`` to find the runs of 1 (the steps), then per step
    ``d = (|s - tau| * mask).sum().item() / n``, then the running product of adjacent ratios, each clipped on its own
    to ``1 + delta`` and written into the step's slice. Returns ``(weight_mask [B, T] float32, log_info)`` with one
    dict per row: ``n_steps``, ``d_values``, ``w_values``, ``n_tokens_per_step``, ``boundaries``. It is the baseline
    :func:`sodkern.integrations.verl.compute_stepwise_opd_weights` is checked and timed against.
    """
    B, T = response_mask.shape
    runs_per_row = []
    for i in range(B):
        runs, start = [], None
        for t in range(T):
            on = response_mask[i, t].item() == 1
            if on and start is None:
                start = t
            elif not on and start is not None:
                runs.append((start, t))
                start = None
        if start is not None:
            runs.append((start, T))
        runs_per_row.append(runs)
    gap = (old_log_probs - ref_log_prob).abs()
    weight_mask = torch.zeros(B, T, dtype=torch.float32, device=response_mask.device)
    log_info = []
    for i, runs in enumerate(runs_per_row):
        d_values, counts = [], []
        for a, b in runs:
            n = response_mask[i, a:b].sum().item()
            d_values.append((gap[i, a:b] * response_mask[i, a:b]).sum().item() / n)
            counts.append(int(n))
        w_values = [1.0] if runs else []
        product = 1.0
        for k in range(1, len(runs)):
            product *= (d_values[k - 1] + epsilon) / (d_values[k] + epsilon)
            w_values.append(min(product, 1.0 + delta))
        for (a, b), w in zip(runs, w_values):
            weight_mask[i, a:b] = w
        log_info.append(
            {
                "n_steps": len(runs),
                "d_values": d_values,
                "w_values": w_values,
                "n_tokens_per_step": counts,
                "boundaries": list(runs),
            }
        )
    return weight_mask, log_info
