"""``SODConfig``: TRL's ``GRPOConfig`` with the SOD settings (README, The algorithm) and the recipe's clip defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

WEIGHTINGS = ("sod", "uniform", "none")
LOSS_TYPES = ("dapo", "bnpo")  # token means, as the algorithm's step 5 (README)


@dataclass
class SODConfig(GRPOConfig):
    """``GRPOConfig`` plus SOD's step weighting. GRPO's own clip settings are the clip settings of the one
    dual-clip surrogate: ``epsilon`` (low), ``epsilon_high`` (default 0.28 here) and ``delta`` (verl's
    ``clip_ratio_c``, default 3.0 here; ``None`` turns the dual clip off).

    Args:
        weighting: ``"sod"`` (step weights w_k), ``"uniform"`` (w = 1: OPD with the GRPO term) or ``"none"``
            (GRPO alone; no teacher is needed).
        sod_eps: added to every step divergence before the ratio.
        sod_delta: step weights are clipped to at most ``1 + sod_delta``.
        opd_coef: ``c``, the scale of the distillation term ``c * w_k * (tau - s_old)`` in the advantage.
        teacher_temperature: temperature of the teacher's log-probs ``tau`` (1.0, as the recipe's teacher server).
    """

    weighting: str = field(default="sod", metadata={"help": "Step weighting: 'sod', 'uniform' (OPD) or 'none'."})
    sod_eps: float = field(default=1e-6, metadata={"help": "eps added to step divergences."})
    sod_delta: float = field(default=0.2, metadata={"help": "Step weights are clipped to 1 + sod_delta."})
    opd_coef: float = field(default=1.0, metadata={"help": "Scale c of the distillation advantage."})
    teacher_temperature: float = field(default=1.0, metadata={"help": "Temperature of the teacher log-probs."})
    epsilon_high: float | None = field(default=0.28, metadata={"help": "Upper clip of the ratio (1 + epsilon_high)."})
    delta: float | None = field(default=3.0, metadata={"help": "Dual-clip constant (verl's clip_ratio_c)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"SODConfig.weighting: expected one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"SODConfig.loss_type: SOD aggregates a token mean, use one of {LOSS_TYPES}, got {self.loss_type!r}"
            )
        if not self.sod_eps > 0:
            raise ValueError(f"SODConfig.sod_eps must be > 0, got {self.sod_eps}")
        if not self.sod_delta >= 0:
            raise ValueError(f"SODConfig.sod_delta must be >= 0, got {self.sod_delta}")
        if not self.teacher_temperature > 0:
            raise ValueError(f"SODConfig.teacher_temperature must be > 0, got {self.teacher_temperature}")
        unsupported = {
            "importance_sampling_level": (self.importance_sampling_level, "token"),
            "beta": (self.beta, 0.0),
            "top_entropy_quantile": (self.top_entropy_quantile, 1.0),
            "entropy_coef": (self.entropy_coef, 0.0),
            "use_adaptive_entropy": (self.use_adaptive_entropy, False),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold, None),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"SODConfig.{name}={value!r} is not supported by SODTrainer; set it to {supported!r}")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            raise ValueError(
                "SODConfig: vllm_importance_sampling_correction is not supported by SODTrainer; "
                "set vllm_importance_sampling_correction=False"
            )
