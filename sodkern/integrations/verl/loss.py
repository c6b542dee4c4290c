"""SOD as a verl 0.9.1 distillation loss mode: ONE dual-clip PPO surrogate on ``A_grpo + c * w_k * (tau - s_old)``.

verl's ``distillation_ppo_loss`` adds a separately clipped distillation surrogate to the task surrogate, and that
surrogate uses the current log-probs. SOD (README: The algorithm) has one surrogate whose advantage already carries the
teacher term, built from the rollout's log-probs. So for ``loss_mode=sod`` / ``sod_uniform`` the plugin runs
:func:`sod_ppo_loss`: it adds the teacher term to the micro-batch's advantages and hands the result to verl's own
``ppo_loss``, which applies the actor's policy loss (``policy_loss.loss_mode=vanilla``: dual clip with
``clip_ratio_low/high/c``), ``loss_agg_mode`` with the global token normaliser, the entropy bonus and the KL loss,
exactly as for any other verl run. Every other loss mode goes to verl's function unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict
from verl.trainer.distillation.losses import DistillationLossSettings, register_distillation_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from sodkern import stepwise_weights

logger = logging.getLogger("sodkern.integrations.verl")

SOD_LOSS_MODES = ("sod", "sod_uniform")
DEFAULT_EPS = 1e-6
DEFAULT_DELTA = 0.2


@dataclass
class SODDistillationLossConfig(DistillationLossConfig):
    """verl's ``DistillationLossConfig`` plus SOD's two step-weight keys.

    Select it with ``distillation.distillation_loss._target_=sodkern.integrations.verl.loss.SODDistillationLossConfig``
    to set ``+distillation.distillation_loss.sod_eps`` / ``sod_delta``; without it the defaults below apply.
    The teacher-term coefficient ``c`` is verl's ``distillation_loss_coef``.

    Attributes:
        sod_eps: added to every step divergence before the ratio (SOD default 1e-6).
        sod_delta: step weights are clipped to at most ``1 + sod_delta`` (the authors' script: 0.2).
    """

    sod_eps: float = DEFAULT_EPS
    sod_delta: float = DEFAULT_DELTA


def _padded(t: torch.Tensor) -> torch.Tensor:
    return t.to_padded_tensor(0.0) if t.is_nested else t


def _like(values: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """``values`` ``[B, T]`` padded, returned in ``template``'s layout (jagged rows of the template's lengths)."""
    if not template.is_nested:
        return values.to(template.dtype)
    offsets = template.offsets()
    lengths = offsets.diff()
    keep = torch.arange(values.shape[1], device=values.device) < lengths[:, None]
    return torch.nested.nested_tensor_from_jagged(values[keep].to(template.dtype), offsets=offsets)


def sod_token_advantages(
    data: TensorDict, loss_config: DistillationLossConfig
) -> tuple[torch.Tensor, dict[str, Metric]]:
    """The SOD total advantage of one verl micro-batch.

    Args:
        data: verl's micro-batch: ``response_mask`` ``[B, T]`` 0/1, ``old_log_probs`` ``[B, T]`` float32 (the
            rollout's s), ``advantages`` ``[B, T]`` float32 (A_grpo), each padded or jagged, and
            ``teacher_logprobs`` jagged ``[B, prompt+response, 1]`` float32 (tau, from verl's teacher pool).
        loss_config: ``distillation_loss``; ``loss_mode`` ``sod`` or ``sod_uniform``, ``distillation_loss_coef`` c.

    Returns:
        ``(advantages [B, T] float32 padded, metrics)``: ``A_grpo + c * w * (tau - s)`` on mask tokens, A_grpo
        elsewhere.
    """
    mask = _padded(data["response_mask"]).bool()
    old_log_probs = _padded(data["old_log_probs"]).float()
    advantages = _padded(data["advantages"]).float()
    teacher_logp = no_padding_2_padding(data["teacher_logprobs"], data).float()
    if teacher_logp.dim() == 3:
        if teacher_logp.shape[-1] != 1:
            raise ValueError(
                f"loss_mode={loss_config.loss_mode} needs the teacher's log-prob of the sampled token only, got "
                f"teacher_logprobs with {teacher_logp.shape[-1]} values per token"
            )
        teacher_logp = teacher_logp.squeeze(-1)
    width = mask.shape[1]
    if teacher_logp.shape[1] < width:
        teacher_logp = torch.nn.functional.pad(teacher_logp, (0, width - teacher_logp.shape[1]))
    teacher_logp = teacher_logp[:, :width]
    if loss_config.loss_mode == "sod":
        steps = stepwise_weights(
            old_log_probs,
            teacher_logp,
            mask,
            eps=float(loss_config.get("sod_eps", DEFAULT_EPS)),
            delta=float(loss_config.get("sod_delta", DEFAULT_DELTA)),
        )
        token_weights = steps.token_weights
    else:
        token_weights = mask.float()
    coef = float(loss_config.distillation_loss_coef)
    teacher_term = torch.where(mask, coef * token_weights * (teacher_logp - old_log_probs), 0.0)
    n = mask.sum().clamp_min(1)
    metrics = {
        "sod/token_weight_mean": Metric(AggregationType.MEAN, (token_weights * mask).sum() / n),
        "sod/teacher_advantage_mean": Metric(AggregationType.MEAN, teacher_term.sum() / n),
        "sod/reverse_kl_k1_mean": Metric(
            AggregationType.MEAN, torch.where(mask, old_log_probs - teacher_logp, 0).sum() / n
        ),
    }
    return advantages + teacher_term, metrics


def sod_ppo_loss(
    config: ActorConfig,
    distillation_config: DistillationConfig,
    model_output: dict,
    data: TensorDict,
    dp_group: Any = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``ppo_loss`` on the SOD total advantage; same arguments and return as ``distillation_ppo_loss``."""
    loss_config = distillation_config.distillation_loss
    if not loss_config.use_task_rewards:
        raise ValueError(
            f"distillation.distillation_loss.loss_mode={loss_config.loss_mode} adds the teacher term to the task "
            "advantage: set distillation.distillation_loss.use_task_rewards=true"
        )
    total, metrics = sod_token_advantages(data, loss_config)
    sod_data = data.clone(recurse=False)  # the engine's micro-batch is left as it was
    sod_data.set("advantages", _like(total, data["advantages"]))
    loss, ppo_metrics = ppo_loss(config, model_output, sod_data, dp_group)
    ppo_metrics.update(metrics)
    return loss, ppo_metrics


def wrap_distillation_ppo_loss(original: Callable) -> Callable:
    """verl's ``distillation_ppo_loss``, with ``sod`` / ``sod_uniform`` routed to :func:`sod_ppo_loss`."""

    @functools.wraps(original)
    def distillation_ppo_loss(
        config: ActorConfig,
        distillation_config: DistillationConfig | None,
        model_output: dict | None = None,
        data: TensorDict | None = None,
        dp_group: Any = None,
        student_logits: torch.Tensor | None = None,
        data_format: str = "thd",
    ):
        mode = distillation_config.distillation_loss.loss_mode if distillation_config is not None else None
        if mode in SOD_LOSS_MODES and student_logits is None:
            return sod_ppo_loss(config, distillation_config, model_output, data, dp_group)
        return original(
            config,
            distillation_config,
            model_output=model_output,
            data=data,
            dp_group=dp_group,
            student_logits=student_logits,
            data_format=data_format,
        )

    distillation_ppo_loss.sodkern_wrapped = True
    return distillation_ppo_loss


@register_distillation_loss(DistillationLossSettings(names=list(SOD_LOSS_MODES), use_estimator=True))  # type: ignore[arg-type]
def sod_distillation_loss(config, distillation_config, model_output, data):
    """Registered so that verl's config accepts the loss modes; the loss itself runs in :func:`sod_ppo_loss`.

    Reached only when verl's ``distillation_ppo_loss`` was bound before the plugin loaded (it would otherwise train
    two separately clipped surrogates, which is not SOD).
    """
    raise RuntimeError(
        "loss_mode=sod reached verl's own distillation_ppo_loss: the sodkern plugin loaded after "
        "verl.workers.engine_workers was imported. Leave VERL_USE_EXTERNAL_PLUGINS unset (or include 'sodkern') "
        "so that `import verl` loads it first"
    )
