"""sodkern: fused kernels for SOD, step-wise on-policy distillation of small tool-using language models.

Public API (all inputs padded ``[B, T]`` as in verl's batches; log-probs float32):

- :func:`stepwise_weights` — SOD step divergences and clipped weights (drop-in for the reference's Python loop).
- :func:`linear_logprobs` — log p(target) from hidden states and the lm-head weight, never materialising logits.
- :func:`linear_reverse_kl` — per-token full-vocabulary KL(student || teacher), same memory bound.
- :func:`sod_loss` — the whole SOD objective (weights, advantages, PPO dual clip) in one differentiable op.

Each op takes ``backend="auto" | "chunked" | "tiled" | "torch"`` (default ``SODKERN_BACKEND``, else ``auto``:
``chunked`` on CUDA, i.e. cuBLAS GEMMs on tiles folded by Triton kernels; ``torch`` on CPU). ``tiled`` is the
all-Triton tile kernels. Triton is imported only when a Triton path runs: ``import sodkern`` works without it.
Along the data path the names are ``old_logp`` (rollout log-probs, s), ``teacher_logp`` (tau) and
``token_weights`` (w).
"""

from sodkern.ops.linear_kl import linear_reverse_kl
from sodkern.ops.linear_logprobs import linear_logprobs
from sodkern.ops.sod_loss import SODLossOutput, ppo_dual_clip_loss, sod_loss
from sodkern.ops.step_weights import StepWeights, stepwise_weights

__version__ = "0.1.0"

__all__ = [
    "SODLossOutput",
    "StepWeights",
    "linear_logprobs",
    "linear_reverse_kl",
    "ppo_dual_clip_loss",
    "sod_loss",
    "stepwise_weights",
]
