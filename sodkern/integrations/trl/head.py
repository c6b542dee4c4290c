"""``use_sodkern_head()``: TRL's fused LM head (``trl.trainer.utils._ChunkedLogProbFunction``) served by sodkern.

Every TRL trainer that scores tokens through ``add_fused_lm_head`` (GRPO, RLOO, ...) calls
``_ChunkedLogProbFunction.apply(hidden [N, H], weight [V, H], bias, targets [N], temperature, chunk_size,
final_logit_softcapping, logit_scale, outputs)`` and reads five outputs ``(log_probs, entropy, log_sum_sq_probs,
mean_logits, is_top1)``. :class:`SodkernLogProbFunction` answers the same call with
``sodkern.linear_logprobs(..., return_entropy=True)`` (both outputs differentiable); a call sodkern cannot serve
(an lm-head bias, logit soft-capping or scaling, or one of the three extra outputs requested) goes to TRL's own
kernel unchanged.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from sodkern import linear_logprobs

logger = logging.getLogger("sodkern.integrations.trl")

_ORIGINAL: list = []  # TRL's own function while sodkern's is installed


def _trl_utils():
    try:
        import trl.trainer.utils as utils
    except ImportError as e:  # pragma: no cover - the [trl] extra is missing
        raise ImportError('sodkern.integrations.trl needs TRL: pip install "sodkern[trl]"') from e
    return utils


class SodkernLogProbFunction:
    """Drop-in for ``trl.trainer.utils._ChunkedLogProbFunction`` (its ``.apply`` contract)."""

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"),
    ) -> tuple[torch.Tensor, torch.Tensor | None, None, None, None]:
        """``(log_probs [N] f32, entropy [N] f32 or None, None, None, None)`` for ``hidden [N, H]``,
        ``weight [V, H]``, ``targets [N]`` int64; ``chunk_size`` is ignored (sodkern picks its own blocks)."""
        extra = set(outputs) - {"entropy"}
        if bias is not None or final_logit_softcapping is not None or logit_scale != 1.0 or extra:
            fallback = _ORIGINAL[0] if _ORIGINAL else _trl_utils()._ChunkedLogProbFunction
            return fallback.apply(
                hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs
            )
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else weight.dtype
        ctx = torch.autocast(device, enabled=False) if autocast else nullcontext()
        with ctx:
            h, w = hidden.to(dtype), weight.to(dtype)
            if "entropy" in outputs:
                logp, entropy = linear_logprobs(h, w, targets, temperature=float(temperature), return_entropy=True)
                return logp.float(), entropy.float(), None, None, None
            return linear_logprobs(h, w, targets, temperature=float(temperature)).float(), None, None, None, None


def use_sodkern_head() -> None:
    """Serve TRL's fused LM head with sodkern, for every TRL trainer in this process. Calling it again is a no-op;
    :func:`use_trl_head` undoes it."""
    utils = _trl_utils()
    if utils._ChunkedLogProbFunction is SodkernLogProbFunction:
        return
    _ORIGINAL[:] = [utils._ChunkedLogProbFunction]
    utils._ChunkedLogProbFunction = SodkernLogProbFunction
    logger.info("TRL's fused LM head is now served by sodkern.linear_logprobs")


def use_trl_head() -> None:
    """Undo :func:`use_sodkern_head`: TRL's own ``_ChunkedLogProbFunction`` again. A no-op if it is in place."""
    utils = _trl_utils()
    if utils._ChunkedLogProbFunction is SodkernLogProbFunction and _ORIGINAL:
        utils._ChunkedLogProbFunction = _ORIGINAL.pop()


def sodkern_head_active() -> bool:
    """Whether TRL's fused LM head is served by sodkern."""
    return _trl_utils()._ChunkedLogProbFunction is SodkernLogProbFunction
