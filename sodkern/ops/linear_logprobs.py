"""Fused linear log-probs: ``log_softmax(hidden @ weight.T / T)[target]`` per token, never holding ``[N, V]``.

Three strategies with the same semantics (``backend=``, see :mod:`sodkern._backend`):

- ``chunked``: cuBLAS/torch GEMMs on tiles folded by Triton (or torch) kernels (:mod:`sodkern.ops._chunked`);
- ``tiled``: the kernels of :mod:`sodkern.kernels.linear_logprobs` (CUDA, or the CPU interpreter);
- ``torch``: the chunked loop below (helpers in :mod:`sodkern.ops._torch`). Tokens are processed
  ``token_chunk_size(V)`` at a time, so one ``[chunk, V]`` block (about ``2**25`` elements) exists at once;
  the backward pass recomputes the logits.

The kernels (and Triton) are imported only when the Triton backend runs.

Float64 inputs never take the tile kernels (they accumulate in fp32); fp64 is there for ``gradcheck``.
"""

from __future__ import annotations

import torch

from sodkern._backend import Backend, Strategy, select_strategy
from sodkern._validate import check_lm_head, check_targets, check_temperature
from sodkern.ops import _chunked
from sodkern.ops._torch import acc_dtype, chunk_logits, chunked_head_grads, log_softmax_, token_chunks


def _torch_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temperature: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Chunked torch forward; same contract as :func:`sodkern.kernels.linear_logprobs.linear_logprobs_fwd`
    (outputs in the accumulation dtype). A low-precision ``weight`` is upcast once (``[V, H]`` fp32)."""
    n = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    w = weight.to(acc)
    idx = targets.long()
    logp = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else None
    for rows in token_chunks(n, weight.shape[0]):
        z = chunk_logits(hidden[rows], w, inv_temperature)
        lse[rows] = log_softmax_(z)  # z now holds the chunk's log-probs
        logp[rows] = z.gather(1, idx[rows, None]).squeeze(1)
        if ent is not None:
            ent[rows] = -z.exp().mul_(z).sum(dim=-1)
    return logp, lse, ent


def _torch_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor | None,
    inv_temperature: float,
    need_hidden: bool,
    need_weight: bool,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Chunked torch backward: recompute each logits block, then
    ``dz = (g * (onehot - p) - g_ent * p * (log p + entropy)) / T`` and two matmuls.

    ``grad_logp`` / ``grad_entropy``: ``[N]`` upstream gradients, either may be None (no gradient);
    ``entropy`` ``[N]`` (the forward's) is needed with ``grad_entropy``.
    """
    idx = targets.long()
    acc = acc_dtype(hidden.dtype)
    g = grad_logp.to(acc) * inv_temperature if grad_logp is not None else None
    ge = grad_entropy.to(acc) * inv_temperature if grad_entropy is not None else None

    def chunk_dz(rows: slice, h_c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        log_p = chunk_logits(h_c, w, inv_temperature).sub_(lse[rows, None])
        p = log_p.exp()
        if ge is None:
            dz = p.mul_(-g[rows, None])
        else:  # dH/dz_j = -p_j (log p_j + H)
            dz = log_p.add_(entropy[rows, None]).mul_(p).mul_(-ge[rows, None])
            if g is not None:
                dz.addcmul_(p, g[rows, None], value=-1.0)
        if g is not None:
            dz.scatter_add_(1, idx[rows, None], g[rows, None])
        return dz

    return chunked_head_grads(hidden, weight, need_hidden, need_weight, chunk_dz)


def strategy_for(backend: str | None, *tensors: torch.Tensor) -> Strategy:
    """The strategy for these inputs (:func:`sodkern._backend.select_strategy`); float64 never runs the tile
    kernels (they accumulate in fp32): ``tiled`` falls back to ``torch`` for it."""
    strategy = select_strategy(*tensors, backend=backend)
    if strategy == "tiled" and any(t.dtype == torch.float64 for t in tensors):
        return "torch"
    return strategy


def _forward(
    strategy: Strategy,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    inv_temperature: float,
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if strategy == "tiled":
        from sodkern.kernels.linear_logprobs import linear_logprobs_fwd  # lazy: Triton only when used

        return linear_logprobs_fwd(hidden, weight, targets, inv_temperature, entropy)
    if strategy == "chunked":
        return _chunked.logprobs_fwd(hidden, weight, targets, inv_temperature, entropy)
    return _torch_fwd(hidden, weight, targets, inv_temperature, entropy)


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper on flattened inputs: ``hidden [N, H]``, ``weight [V, H]``, ``targets [N]``.

    Saves ``hidden``, ``weight``, ``targets``, the per-token ``lse [N]`` and, with the entropy, the entropy
    ``[N]`` (not the logits); the backward pass recomputes the logits block by block. Both outputs are
    differentiable; an output that receives no gradient costs nothing in the backward.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        inv_temperature: float,
        entropy: bool,
        strategy: Strategy,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logp, lse, ent = _forward(strategy, hidden, weight, targets, inv_temperature, entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_temperature = inv_temperature
        ctx.strategy = strategy
        ctx.set_materialize_grads(False)
        return logp if ent is None else (logp, ent)

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None = None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        if ctx.strategy == "chunked":
            bwd = _chunked.logprobs_bwd
        elif ctx.strategy == "tiled":
            from sodkern.kernels.linear_logprobs import linear_logprobs_bwd as bwd

            grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
            if grad_entropy is not None:
                grad_entropy = grad_entropy.float().contiguous()
        else:
            bwd = _torch_bwd
        gh, gw = bwd(
            hidden, weight, targets, lse, grad_logp, ctx.inv_temperature, need_hidden, need_weight,
            ent, grad_entropy,
        )  # fmt: skip
        return gh, gw, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: Backend | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token under ``softmax(hidden @ weight.T / temperature)``.

    The ``[N, V]`` logits are never materialised: the Triton kernels work on ``[block, block]`` tiles and
    the torch path on ``[token_chunk_size(V), V]`` blocks; the extra memory beyond the inputs, the outputs
    and the gradients is O(N) per-token values plus one block. Logits are accumulated in fp32 (fp64 for
    fp64 inputs).

    Args:
        hidden: ``[..., H]`` bf16, fp16, fp32 or fp64 final hidden states.
        weight: ``[V, H]`` lm-head weight, same dtype and device as ``hidden``.
        targets: ``[...]`` (``hidden.shape[:-1]``) int64 or int32 token ids in ``[0, V)``.
        temperature: positive; logits are divided by it.
        return_entropy: also return the full-vocabulary entropy of ``softmax(logits / temperature)``,
            differentiable too (``dH/dz_j = -p_j (log p_j + H)``, e.g. for an entropy bonus).
        backend: "auto", "chunked", "tiled" or "torch" (see :mod:`sodkern._backend`); default
            ``SODKERN_BACKEND``, else "auto" (chunked on CUDA, torch on CPU).

    Returns:
        ``logp`` ``[...]`` float32 (float64 for fp64 inputs), differentiable w.r.t. ``hidden`` and
        ``weight``; with ``return_entropy=True`` the tuple ``(logp, entropy)``, where ``entropy`` ``[...]``
        (same dtype) is differentiable w.r.t. ``hidden`` and ``weight`` as well.

    Raises:
        ValueError: naming the argument, for a non-float ``hidden``/``weight``, mismatched shapes, dtypes or
            devices, ``targets`` of the wrong shape or dtype or outside ``[0, V)``, or a bad ``temperature``.
    """
    check_lm_head(hidden, weight, "hidden", "weight")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but hidden has shape {tuple(hidden.shape)}: "
            f"targets must have shape {tuple(hidden.shape[:-1])}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    check_targets(targets, weight.shape[0])
    inv_temperature = check_temperature(temperature)

    lead = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    targets1d = targets.reshape(-1)
    strategy = strategy_for(backend, hidden2d, weight)
    if strategy != "torch":
        hidden2d, weight, targets1d = hidden2d.contiguous(), weight.contiguous(), targets1d.contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        out = LinearLogprobsFunction.apply(hidden2d, weight, targets1d, inv_temperature, return_entropy, strategy)
        logp, ent = out if return_entropy else (out, None)
    else:  # nothing to differentiate: skip autograd so nothing is saved
        logp, _, ent = _forward(strategy, hidden2d, weight, targets1d, inv_temperature, return_entropy)
    if ent is None:
        return logp.reshape(lead)
    return logp.reshape(lead), ent.reshape(lead)
