"""GRPO advantages: each trajectory's outcome reward normalised within the group of responses to its prompt.

``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` with the unbiased std; a group of one gets mean 0 and
std 1 (the README's "The algorithm", step 4; as in verl's ``compute_grpo_outcome_advantage``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def grpo_advantages(rewards: torch.Tensor, groups: Sequence, *, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages.

    Args:
        rewards: ``[N]`` float outcome reward of each trajectory.
        groups: ``N`` hashable group keys (the prompt's uid): trajectories with equal keys form a group.
        eps: added to the std.

    Returns:
        ``[N]`` float32 advantages.
    """
    if rewards.dim() != 1 or rewards.shape[0] != len(groups):
        raise ValueError(f"rewards must be [N] with N = len(groups) = {len(groups)}, got {tuple(rewards.shape)}")
    r = rewards.detach().float()
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = torch.empty_like(r)
    for idx in members.values():
        idx_t = torch.tensor(idx, dtype=torch.long, device=r.device)
        x = r[idx_t]
        if len(idx) == 1:
            mean, std = torch.zeros((), device=r.device), torch.ones((), device=r.device)
        else:
            mean, std = x.mean(), x.std(unbiased=True)
        out[idx_t] = (x - mean) / (std + eps)
    return out
