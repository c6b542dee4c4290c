"""``SODTrainer``: SOD (README: The algorithm) on TRL's own GRPO rollouts, multi-turn tool calls included.

After TRL generates and scores a batch (``GRPOTrainer._generate_and_score_completions``), the trainer adds the
rollout log-probs ``old_per_token_logps`` (``s``) when TRL skipped them and the teacher's log-probs
``teacher_logps`` (``tau``, from the teacher's hidden states through :func:`sodkern.linear_logprobs`). The loss is
:func:`sodkern.sod_loss` on the student's hidden states: steps are the maximal runs of
``completion_mask * tool_mask``, the advantage is ``A_grpo + opd_coef * w_k * (tau - s)`` and ONE dual-clip
surrogate uses GRPO's ``epsilon`` / ``epsilon_high`` / ``delta``. No ``[B, T, V]`` logits exist in the step.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.models.utils import _ForwardRedirection

from sodkern import linear_logprobs, sod_loss, stepwise_weights
from sodkern.integrations.trl.config import SODConfig
from sodkern.ops.sod_loss import SODLossOutput

logger = logging.getLogger("sodkern.integrations.trl")

PATTERNS = ("stable", "erroneous", "recovery")


def _backbone(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack of a causal LM (PEFT unwrapped): what produces the last hidden states."""
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model.base_model


def _lm_head_weight(model: PreTrainedModel, role: str) -> torch.Tensor:
    """``[V, H]`` lm-head weight; refuses heads sodkern cannot fuse (bias, logit soft-capping or scaling)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"SODTrainer: the {role}'s lm_head has a bias, which sodkern's fused head does not support")
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(config, name, None) not in (None, 1.0):
            raise ValueError(f"SODTrainer: the {role}'s config sets {name}, which sodkern's fused head does not apply")
    weight = head.weight
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor
        weight = weight.full_tensor()
    return weight


def last_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n, H]`` last hidden states at the positions predicting the last ``n`` tokens of ``input_ids``."""
    out = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state[:, :-1][:, -n:]


def masked_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``[B, T]`` float32 log-probs of ``targets`` where ``mask`` is 1 (0 elsewhere), never holding ``[*, V]``.

    Args:
        hidden: ``[B, T, H]`` hidden states; weight: ``[V, H]``; targets: ``[B, T]`` int64; mask: ``[B, T]`` 0/1.
    """
    flat = (mask.reshape(-1) != 0).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat).to(weight.dtype)
    logp = linear_logprobs(h, weight, targets.reshape(-1).index_select(0, flat), temperature=temperature)
    out = torch.zeros(targets.numel(), dtype=torch.float32, device=hidden.device)
    return out.index_put((flat,), logp.float()).view_as(targets)


def step_patterns(token_weights_steps: torch.Tensor, num_steps: torch.Tensor) -> dict[str, float]:
    """Fraction of trajectories in each pattern of ``sodkern plot`` (README: The algorithm), among those with 2+ steps.

    Args:
        token_weights_steps: ``[B, K]`` float32 step weights ``w_k`` (NaN-padded).
        num_steps: ``[B]`` int64 steps per trajectory.
    """
    from sodkern.trainer.plot import classify_pattern

    counts = dict.fromkeys(PATTERNS, 0)
    total = 0
    for row, k in zip(token_weights_steps.tolist(), num_steps.tolist()):
        if k >= 2:
            total += 1
            pattern, _ = classify_pattern(row[:k])
            if pattern:
                counts[pattern] += 1
    return {p: counts[p] / total if total else 0.0 for p in PATTERNS}


class SODTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` trained with the SOD objective.

    Args:
        model, reward_funcs, **kwargs: as for ``GRPOTrainer`` (``tools=``, ``train_dataset=``, ...).
        args: a :class:`SODConfig`.
        teacher_model: the teacher, a ``PreTrainedModel`` or a path / hub id for ``AutoModelForCausalLM``; it must
            share the student's tokenizer. Not needed for ``weighting="none"``.

    Attributes:
        last_loss_output: the :class:`sodkern.SODLossOutput` of the last micro-batch (advantages, token weights).
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        reward_funcs: Any = None,
        args: SODConfig | None = None,
        *,
        teacher_model: PreTrainedModel | str | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = SODConfig(output_dir="sod-trainer")
        if not isinstance(args, SODConfig):
            raise TypeError(f"SODTrainer: args must be a SODConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("SODTrainer: MoE router aux loss is not supported; set router_aux_loss_coef=0")
        self._forward_redirection = _ForwardRedirection()
        self.last_loss_output: SODLossOutput | None = None
        self.teacher_model = None
        if args.weighting != "none":
            if teacher_model is None:
                raise ValueError(f"SODTrainer: weighting={args.weighting!r} needs teacher_model= (a model or a path)")
            self.teacher_model = self._prepare_teacher(teacher_model)

    def _prepare_teacher(self, teacher: PreTrainedModel | str) -> torch.nn.Module:
        if isinstance(teacher, str):
            dtype = self.accelerator.unwrap_model(self.model).dtype
            teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype)
        student = self.accelerator.unwrap_model(self.model)
        v_student = _lm_head_weight(student, "student").shape[0]
        v_teacher = _lm_head_weight(teacher, "teacher").shape[0]
        if v_student != v_teacher:
            raise ValueError(
                f"SODTrainer: the teacher's vocabulary ({v_teacher} rows of lm_head, "
                f"{teacher.config.name_or_path or type(teacher).__name__}) differs from the student's ({v_student}, "
                f"{student.config.name_or_path or type(student).__name__}); SOD needs a teacher sharing the "
                "student's tokenizer"
            )
        teacher.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # ------------------------------------------------------------------------------------------ rollout side

    def _loss_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        mask = batch["completion_mask"]
        return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]

    @torch.no_grad()
    def _teacher_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: dict) -> torch.Tensor:
        """``[B, T]`` float32 teacher log-probs ``tau`` of the completion tokens (0 outside the loss mask)."""
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        weight = _lm_head_weight(teacher, "teacher")
        completion_ids, mask = batch["completion_ids"], self._loss_mask(batch)
        T = completion_ids.shape[1]
        rows = self.args.per_device_train_batch_size
        parts = []
        for i in range(0, input_ids.shape[0], rows):
            sl = slice(i, i + rows)
            hidden = self._forward_redirection(
                self.teacher_model, teacher, last_hidden, teacher, input_ids[sl], attention_mask[sl], T
            )
            parts.append(masked_logprobs(hidden, weight, completion_ids[sl], mask[sl], self.args.teacher_temperature))
        return torch.cat(parts)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super()._generate_and_score_completions(inputs)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        T = batch["completion_ids"].shape[1]
        if batch.get("old_per_token_logps") is None:
            # TRL skips s when on-policy (the loss then uses l.detach()); SOD needs it for tau - s.
            with torch.no_grad():
                batch["old_per_token_logps"], _, _ = self._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention_mask, T, batch_size=self.args.per_device_train_batch_size
                )
        if self.teacher_model is None:
            return batch
        batch["teacher_logps"] = self._teacher_logps(input_ids, attention_mask, batch)
        mode = "train" if self.model.training else "eval"
        if self.args.weighting == "sod":
            steps = stepwise_weights(
                batch["old_per_token_logps"].float(),
                batch["teacher_logps"],
                self._loss_mask(batch),
                eps=self.args.sod_eps,
                delta=self.args.sod_delta,
            )
            for pattern, fraction in step_patterns(steps.step_weights, steps.num_steps).items():
                self._metrics[mode][f"sod/frac_{pattern}"].append(fraction)
        return batch

    # ------------------------------------------------------------------------------------------ loss side

    def _loss_normalizer(self, inputs: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """The token count the loss is divided by, as TRL's ``loss_type`` does (gradient accumulation included)."""
        train = self.model.training
        if self.loss_type == "dapo":
            n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return n
        n = mask.sum().clamp(min=1.0).float()  # bnpo
        return n * self.current_gradient_accumulation_steps if train else n

    def _sod_loss(self, unwrapped: PreTrainedModel, inputs: dict[str, Any]) -> SODLossOutput:
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = self._loss_mask(inputs)
        hidden = last_hidden(unwrapped, input_ids, attention_mask, completion_ids.shape[1])
        weight = _lm_head_weight(unwrapped, "student")
        if self.args.cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), weight.float()
        return sod_loss(
            hidden.to(weight.dtype),
            weight,
            completion_ids,
            inputs["old_per_token_logps"].float(),
            inputs.get("teacher_logps"),
            inputs["advantages"].float(),
            mask,
            weighting=self.args.weighting,
            eps=self.args.sod_eps,
            delta=self.args.sod_delta,
            opd_coef=self.args.opd_coef,
            clip_low=self.epsilon_low,
            clip_high=self.epsilon_high,
            clip_c=math.inf if self.args.delta is None else self.args.delta,
            temperature=self.temperature,
            num_tokens=self._loss_normalizer(inputs, mask),
        )

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        unwrapped = self.accelerator.unwrap_model(model)
        out = self._forward_redirection(model, unwrapped, self._sod_loss, unwrapped, inputs)
        self.last_loss_output = out
        mode = "train" if self.model.training else "eval"
        metrics = out.metrics_dict()
        self._metrics[mode]["sod/mean_token_weight"].append(metrics["mean_token_weight"])
        if "mean_step_divergence" in metrics:
            self._metrics[mode]["sod/mean_step_divergence"].append(metrics["mean_step_divergence"])
        self._metrics[mode]["clip_ratio/region_mean"].append(metrics["pg_clipfrac"])
        self._metrics[mode]["clip_ratio/dual_mean"].append(metrics["pg_clipfrac_lower"])
        self._metrics[mode]["policy_loss"].append(metrics["pg_loss"])
        return out.loss
