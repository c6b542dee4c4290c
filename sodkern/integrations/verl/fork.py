"""Drop-in for the SOD authors' fork: ``compute_stepwise_opd_weights`` with the fork's exact contract.

The fork walks every token in Python with ``.item()`` calls; this computes the same steps, divergences and weights
with a few tensor passes on the inputs' device and copies the per-step results to the host once.
"""

from __future__ import annotations

from typing import Any

import torch


def _runs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row, start, end)`` of every maximal run of ``mask`` (``[B, T]`` bool), in row-major order, end exclusive."""
    pad = torch.zeros(mask.shape[0], 1, dtype=torch.uint8, device=mask.device)
    edges = torch.diff(mask.view(torch.uint8), dim=1, prepend=pad, append=pad)  # [B, T + 1]: nonzero at run edges
    pos = edges.nonzero()  # starts and ends alternate within a row
    return pos[0::2, 0], pos[0::2, 1], pos[1::2, 1]


def compute_stepwise_opd_weights(
    old_log_probs: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    epsilon: float = 1e-6,
    delta: float = 0.5,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Per-token step-wise OPD weights, as the SOD fork's ``compute_stepwise_opd_weights``.

    A step is a maximal run of ``response_mask == 1`` in a row (an assistant turn);
    ``d_k = mean_{t in k} |old_log_probs_t - ref_log_prob_t|``; ``w_1 = 1`` and
    ``w_k = min(prod_{u<k} (d_u + epsilon) / (d_{u+1} + epsilon), 1 + delta)``.

    Args:
        old_log_probs: ``[B, T]`` float, the student's rollout log-probs of the sampled tokens.
        ref_log_prob: ``[B, T]`` float, the teacher's log-probs of the same tokens (the fork's ``ref`` is the teacher).
        response_mask: ``[B, T]`` 0/1 (bool, int or float): 1 on assistant tokens, 0 on tool output and padding.
        epsilon: added to every divergence before the ratio.
        delta: weights are clipped to at most ``1 + delta`` (the fork's default 0.5; its SOD script uses 0.2).

    Returns:
        ``(weight_mask, log_info)``: ``weight_mask`` ``[B, T]`` float32 on the inputs' device, ``w_k`` on each token
        of step k and 0 elsewhere; ``log_info`` one dict per row with ``n_steps`` (int), ``d_values`` and ``w_values``
        (lists of float), ``n_tokens_per_step`` (list of int) and ``boundaries`` (list of ``(start, end)``).
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got shape {tuple(response_mask.shape)}")
    for name, t in (("old_log_probs", old_log_probs), ("ref_log_prob", ref_log_prob)):
        if t.shape != response_mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, response_mask {tuple(response_mask.shape)}")
    B, T = response_mask.shape
    device = response_mask.device
    with torch.no_grad():
        mask = (response_mask == 1).contiguous()
        rows, starts, ends = _runs(mask)
        S = rows.numel()
        num_steps = torch.bincount(rows, minlength=B)
        # The flat [B*T] tokens are the segments gap_0, step_1, gap_1, ..., step_S, gap_S.
        breaks = torch.stack([rows * T + starts, rows * T + ends], dim=1).flatten()
        bounds = torch.cat([breaks.new_zeros(1), breaks, breaks.new_full((1,), B * T)])
        lengths = bounds.diff()
        gap = (old_log_probs.detach() - ref_log_prob.detach()).abs_().reshape(-1)  # the fork's |s - tau|
        if S:
            d = torch.segment_reduce(gap, "sum", lengths=lengths)[1::2].double() / (ends - starts)
        else:
            d = torch.zeros(0, dtype=torch.float64, device=device)
        # The fork multiplies adjacent ratios left to right within a row: so does cumprod over a [B, K] grid.
        first = torch.cumsum(num_steps, 0) - num_steps
        index = torch.arange(S, device=device)
        k = index - first[rows]
        ratio = torch.where(k > 0, (d[(index - 1).clamp_min(0)] + epsilon) / (d + epsilon), 1.0)
        K = int(num_steps.max()) if B else 0
        grid = torch.ones(B, max(K, 1), dtype=torch.float64, device=device)
        grid[rows, k] = ratio
        w = torch.where(k > 0, torch.clamp_max(grid.cumprod(1)[rows, k], 1.0 + delta), 1.0)
        values = torch.zeros(2 * S + 1, dtype=torch.float32, device=device)
        values[1::2] = w.float()
        weight_mask = torch.repeat_interleave(values, lengths, output_size=B * T).view(B, T)
        host = torch.stack([rows.double(), starts.double(), ends.double(), d, w]).cpu()  # the one host copy
    r_, s_, e_, d_, w_ = host.tolist()
    log_info: list[dict[str, Any]] = [
        {"n_steps": 0, "d_values": [], "w_values": [], "n_tokens_per_step": [], "boundaries": []} for _ in range(B)
    ]
    for row, start, end, d_k, w_k in zip(r_, s_, e_, d_, w_):
        info = log_info[int(row)]
        info["n_steps"] += 1
        info["d_values"].append(d_k)
        info["w_values"].append(w_k)
        info["n_tokens_per_step"].append(int(end - start))
        info["boundaries"].append((int(start), int(end)))
    return weight_mask, log_info
