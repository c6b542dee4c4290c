"""verl's fused log-prob/entropy kernel served by :func:`sodkern.linear_logprobs`.

verl 0.9.1's FSDP model forward with ``actor_rollout_ref.model.use_fused_kernels=true`` and
``fused_kernel_options.impl_backend=triton`` (``verl.models.transformers.dense_common.forward_with_triton_backend``)
looks up ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` on every call; the plugin replaces that
attribute with :func:`linear_cross_entropy` when ``SODKERN_VERL_FUSED_KERNEL=1``. Unlike verl's kernel it runs on
CPU as well as CUDA and has no hidden-size constraint.
"""

from __future__ import annotations

import torch

from sodkern import linear_logprobs

ENV_VAR = "SODKERN_VERL_FUSED_KERNEL"


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: torch.distributed.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``linear_cross_entropy`` contract, computed by :func:`sodkern.linear_logprobs`.

    Args:
        hidden: ``[B, T, H]`` or ``[N, H]`` final hidden states (bf16, fp16 or fp32).
        weight: ``[V, H]`` lm-head weight, same dtype and device.
        labels: ``[B, T]`` or ``[N]`` int64 next-token ids.
        temperature: logits are divided by it.
        reduction: ``"none"`` (per-token log-probs), ``"sum"`` or ``"mean"`` (a scalar), as verl's kernel.
        dist_process_group: must be None or of size 1: a vocabulary-parallel lm head is not supported.

    Returns:
        ``(log_probs, entropy)``: ``[N]`` float32 ``+log p(label)`` (or its sum/mean) and ``[N]`` float32
        full-vocabulary entropy, both differentiable w.r.t. ``hidden`` and ``weight``.
    """
    if dist_process_group is not None and torch.distributed.get_world_size(dist_process_group) > 1:
        raise ValueError(
            f"{ENV_VAR}=1 serves a whole lm head only: got a vocabulary-parallel dist_process_group "
            f"(tensor parallel size {torch.distributed.get_world_size(dist_process_group)}); unset {ENV_VAR}"
        )
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    log_probs, entropy = linear_logprobs(
        hidden2d, weight, labels.reshape(-1), temperature=float(temperature), return_entropy=True
    )
    if reduction == "sum":
        log_probs = log_probs.sum()
    elif reduction == "mean":
        log_probs = log_probs.mean()
    return log_probs, entropy
