"""Training logs of a run folder (written by rank 0), and the metrics of an RL step.

- ``metrics.jsonl``: one line per step, ``{"step": k, "reward/mean": ..., "loss": ..., "time/rollout": ...}``;
  the same scalars go to tensorboard (``RUN/tensorboard``) when it is installed and to wandb when
  ``log.wandb_project`` is set (offline unless ``WANDB_MODE`` says otherwise: a run never needs a network).
- ``steps.jsonl``: the step-wise log, one line per trajectory and training step:
  ``{"step", "uid", "sample", "reward", "correct", "num_tool_calls", "steps": [{"k", "d", "w", "tokens",
  "span": [start, end]}]}``, spans in response-token coordinates; read back by ``sodkern plot``.

The RL step's metrics are built here from what :meth:`sodkern.trainer.rl.RLWorker.step` measured:
:class:`UpdateTotals` (the update's sums, all-reduced once), :func:`trajectory_record` and
:func:`rollout_metrics` (one record per trajectory, gathered from every rank), :class:`LogprobGap` (the
engine-vs-trainer log-prob gap, also behind :func:`logprob_mismatch`) and :func:`trajectory_steps` (the
``(d_k, w_k)`` of each step for ``steps.jsonl``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sodkern import SODLossOutput, stepwise_weights

if TYPE_CHECKING:
    from sodkern.trainer.config import LossConfig
    from sodkern.trainer.rollout.loop import Trajectory

log = logging.getLogger("sodkern.train")

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"


def _clean(value: Any) -> Any:
    """JSON-safe scalar: non-finite floats become strings ("nan", "inf") rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Per-step scalars to JSONL, tensorboard and wandb; the step-wise log to JSONL.

    Args:
        run_dir: the run folder.
        enabled: False on every rank but 0 (calls are then no-ops).
        tensorboard: also write tensorboard events (when ``tensorboard`` is installed).
        wandb_project: wandb project name; empty for none.
        config: the run config, stored with the wandb run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str = "",
        config: dict | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / METRICS_FILE, "a")  # noqa: SIM115 (closed in close())
        self._steps = open(self.run_dir / STEPS_FILE, "a")  # noqa: SIM115
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb_project:
            if importlib.util.find_spec("wandb") is None:
                raise ImportError(f"log.wandb_project={wandb_project!r} needs wandb: pip install wandb")
            import wandb

            self._wandb = wandb.init(
                project=wandb_project,
                dir=str(self.run_dir),
                config=config,
                mode=os.environ.get("WANDB_MODE", "offline"),
                resume="allow",
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One step's scalars."""
        if not self.enabled:
            return
        self._metrics.write(json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}}) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_steps(self, records: list[dict]) -> None:
        """Step-wise records (see the module docstring), one JSON line each."""
        if not self.enabled or not records:
            return
        self._steps.writelines(json.dumps(r, default=_clean) + "\n" for r in records)
        self._steps.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        self._steps.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


# the scalars of the one-line progress report, in order, when the step has them
PROGRESS_KEYS = (("loss", "loss", "{:.4f}"), ("reward/mean", "reward", "{:.3f}"), ("accuracy", "accuracy", "{:.3f}"),
                 ("mean_w", "mean_w", "{:.3f}"), ("val/", "", ""), ("grad_norm", "grad_norm", "{:.3g}"),
                 ("skipped", "skipped", "{:.0f}"), ("time/step", "s/step", "{:.1f}"))  # fmt: skip


def progress_line(step: int, steps: int, metrics: dict[str, float], *, eta_s: float) -> str:
    """One line per training step for the log, e.g. ``step 3/200 loss 0.1234 reward -0.250 ... eta 12.5 min``;
    ``val/average@n`` and friends when the step evaluated."""
    parts = [f"step {step}/{steps}"]
    for key, label, fmt in PROGRESS_KEYS:
        if key == "val/":
            parts += [f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("val/") and k.count("/") == 1]
        elif isinstance(metrics.get(key), (int, float)):
            parts.append(f"{label} {fmt.format(metrics[key])}")
    parts.append(f"eta {eta_s / 60:.1f} min")
    return "  ".join(parts)


def truncate_after(path: str | Path, step: int) -> None:
    """Drop the lines of a JSONL log whose ``step`` is after ``step`` (on resume: those steps run again)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file (an unfinished last line, from a killed run, is ignored)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ------------------------------------------------------------------------------------------ engine vs trainer


@dataclass
class LogprobGap:
    """The gap between the rollout engine's log-probs and the trainer's recomputed ``old_logp``, as sums over
    generated tokens (add the gaps of trajectories and ranks with ``+``, then read :meth:`metrics`).

    With ``log r = old_logp - rollout_logp`` per token (``r`` the importance ratio pi_trainer / pi_engine of
    the sampled token, which the engine drew from pi_engine):

    Attributes:
        abs_sum: sum of ``|log r|``.
        abs_max: max of ``|log r|``.
        ratio_minus_1_sum: sum of ``r - 1`` (0 in expectation when the two policies agree).
        k3_sum: sum of ``r - 1 - log r``, the non-negative unbiased estimate of KL(pi_engine || pi_trainer).
        tokens: the number of tokens summed.
    """

    abs_sum: float = 0.0
    abs_max: float = 0.0
    ratio_minus_1_sum: float = 0.0
    k3_sum: float = 0.0
    tokens: int = 0

    @classmethod
    def of(cls, old_logp: torch.Tensor, rollout_logp: torch.Tensor) -> LogprobGap:
        """The gap over the tokens of ``old_logp`` / ``rollout_logp`` (``[n]`` float each, same shape)."""
        log_r = old_logp.detach().double().cpu() - rollout_logp.detach().double().cpu()
        if log_r.numel() == 0:
            return cls()
        clamped = log_r.clamp(-20, 20)  # as the PPO ratio is
        r = clamped.exp()
        return cls(
            abs_sum=float(log_r.abs().sum()),
            abs_max=float(log_r.abs().max()),
            ratio_minus_1_sum=float((r - 1).sum()),
            k3_sum=float((r - 1 - clamped).sum()),
            tokens=log_r.numel(),
        )

    def __add__(self, other: LogprobGap) -> LogprobGap:
        return LogprobGap(
            self.abs_sum + other.abs_sum,
            max(self.abs_max, other.abs_max),
            self.ratio_minus_1_sum + other.ratio_minus_1_sum,
            self.k3_sum + other.k3_sum,
            self.tokens + other.tokens,
        )

    def metrics(self) -> dict[str, float]:
        """``rollout/logprob_diff_abs_mean`` / ``_max``, ``rollout/ratio_minus_1_mean``, ``rollout/kl_k3``
        (means over the tokens; all 0.0 without tokens)."""
        n = max(self.tokens, 1)
        return {
            "rollout/logprob_diff_abs_mean": self.abs_sum / n,
            "rollout/logprob_diff_abs_max": self.abs_max,
            "rollout/ratio_minus_1_mean": self.ratio_minus_1_sum / n,
            "rollout/kl_k3": self.k3_sum / n,
        }


def logprob_mismatch(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """How far the engine's rollout log-probs are from the trainer's recomputed ones: :meth:`LogprobGap.metrics`
    over the generated tokens.

    Args:
        old_logprobs: ``[...]`` float, the trainer's log-probs of the sampled tokens (``old_logp``).
        rollout_logprobs: ``[...]`` float, the engine's (``Trajectory.logprobs``), same shape.
        mask: ``[...]`` bool / 0-1, 1 on generated tokens (``response_mask``); None: every position.

    Raises:
        ValueError: naming the argument, for a wrong dtype or shape, a mask not 0/1, or a non-finite value
            under the mask.
    """
    from sodkern._validate import check_float, check_mask, check_same_shape

    check_float(old_logprobs, "old_logprobs")
    check_float(rollout_logprobs, "rollout_logprobs")
    check_same_shape(old_logprobs, rollout_logprobs, "old_logprobs", "rollout_logprobs")
    if mask is not None:
        check_same_shape(old_logprobs, mask, "old_logprobs", "mask")
        check_mask(mask, "mask")
    sel = torch.ones_like(old_logprobs, dtype=torch.bool) if mask is None else mask.bool()
    old_sel, rollout_sel = old_logprobs[sel], rollout_logprobs.to(old_logprobs.device)[sel]
    if not bool(torch.isfinite(old_sel).all() and torch.isfinite(rollout_sel).all()):
        raise ValueError("old_logprobs / rollout_logprobs have a non-finite value where mask is 1")
    return LogprobGap.of(old_sel, rollout_sel).metrics()


# ------------------------------------------------------------------------------------------ the RL step


class UpdateTotals:
    """Named running sums of one rank's PPO update (0-d float32 tensors on ``device``), all-reduced in one
    collective by :meth:`all_reduce`. Every rank must create the same ``names``.

    Args:
        names: the sums kept.
        device: where they live (the trainer's device, for the collective).
    """

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.sums = {name: torch.zeros((), device=device) for name in names}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        self.sums[name] += value

    def all_reduce(self) -> dict[str, torch.Tensor]:
        """The sums over every rank (one ``all_reduce``), by name."""
        names = list(self.sums)
        stacked = torch.stack([self.sums[n] for n in names])
        dist.all_reduce(stacked)
        return dict(zip(names, stacked.unbind()))


# sod_loss metrics averaged over the trained tokens; the loss parts (already over a mini-batch's tokens) are
# averaged over the updates
TOKEN_MEAN_KEYS = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "mean_token_weight")
LOSS_PART_KEYS = ("pg_loss", "distill_loss")
UPDATE_SUMS = (*TOKEN_MEAN_KEYS, *LOSS_PART_KEYS, "tokens", "loss", "grad_norm")


def add_loss_output(totals: UpdateTotals, out: SODLossOutput) -> None:
    """Add one trajectory's :class:`~sodkern.SODLossOutput` metrics to the update's sums."""
    m, tokens = out.metrics, out.metrics["num_tokens"]
    for key in TOKEN_MEAN_KEYS:
        totals.add(key, m[key] * tokens)
    for key in LOSS_PART_KEYS:
        if key in m:
            totals.add(key, m[key])
    totals.add("tokens", tokens)


def update_metrics(
    sums: dict[str, torch.Tensor], *, world_size: int, num_updates: int, skipped: int, full_kl: bool
) -> dict[str, float]:
    """The update's logged metrics from the all-reduced sums of :class:`UpdateTotals` (names ``UPDATE_SUMS``).

    Args:
        sums: the all-reduced sums.
        world_size: ranks (each added its own loss and grad norm per update).
        num_updates: optimizer steps taken by each rank this RL step; ``skipped`` of them non-finite.
        full_kl: whether ``distill_loss`` (the dense KL term) is logged.
    """
    per_update = world_size * num_updates
    metrics = {key: (sums[key] / sums["tokens"].clamp_min(1)).item() for key in TOKEN_MEAN_KEYS}
    metrics.update({key: sums[key].item() / per_update for key in LOSS_PART_KEYS})
    if not full_kl:
        metrics.pop("distill_loss")
    metrics["loss"] = sums["loss"].item() / per_update
    metrics["grad_norm"] = sums["grad_norm"].item() / world_size / max(num_updates - skipped, 1)
    metrics["skipped"] = float(skipped)
    return metrics


def trajectory_steps(
    out: SODLossOutput,
    old_logp: torch.Tensor,
    teacher_logp: torch.Tensor | None,
    mask: torch.Tensor,
    loss: LossConfig,
) -> list[tuple[float | None, float | None]]:
    """Per step ``(d_k, w_k)`` of one trajectory for ``steps.jsonl``: sod_loss's step weights (sod), else
    ``d_k`` of ``|old_logp - teacher_logp|`` with the applied ``w = 1`` (opd), else ``(None, None)`` per step
    (grpo: no teacher term).

    Args:
        out: the trajectory's SODLossOutput.
        old_logp: ``[1, L]`` float32 old log-probs of the trajectory's slice of the packed row.
        teacher_logp: ``[1, L]`` float32 teacher log-probs of the slice, or None.
        mask: ``[1, L]`` bool trained-token mask of the slice.
        loss: the loss config (``eps``, ``delta``).
    """
    if out.steps is not None:
        k = int(out.steps.num_steps[0])
        return list(zip(out.steps.step_divergence[0, :k].tolist(), out.steps.step_weights[0, :k].tolist()))
    if teacher_logp is not None:
        steps = stepwise_weights(old_logp, teacher_logp, mask, eps=loss.eps, delta=loss.delta)
        return [(d, 1.0) for d in steps.step_divergence[0, : int(steps.num_steps[0])].tolist()]
    m = mask[0].int()
    runs = int((m[1:] > m[:-1]).sum()) + int(m[0])
    return [(None, None)] * runs


def trajectory_record(
    t: Trajectory, old_logp: torch.Tensor, steps: list[tuple[float | None, float | None]]
) -> dict[str, Any]:
    """One trajectory's line of ``steps.jsonl`` (plus ``tokens`` and ``gap``, which :func:`rollout_metrics`
    takes out).

    Args:
        t: the scored trajectory.
        old_logp: ``[n]`` float32 old log-probs of its generated tokens (the trainer's, beside the engine's
            ``t.logprobs``).
        steps: its steps' ``(d_k, w_k)`` from :func:`trajectory_steps`.
    """
    generated = torch.tensor(t.response_mask) == 1
    rollout_logp = torch.tensor(t.logprobs, dtype=torch.float64)[generated]
    return {
        "uid": t.uid, "sample": t.sample_index, "reward": t.reward.score, "correct": t.reward.correct,
        "num_tool_calls": t.num_tool_calls, "num_turns": t.num_turns, "finish_reason": t.finish_reason,
        "response_length": len(t.response_ids), "tokens": len(t.prompt_ids) + len(t.response_ids),
        "gap": LogprobGap.of(old_logp, rollout_logp),
        "steps": [{"k": k, "d": dk, "w": wk, "tokens": b - a, "span": [a, b]}
                  for k, ((a, b), (dk, wk)) in enumerate(zip(t.spans, steps), start=1)],
    }  # fmt: skip


def rollout_metrics(records: list[dict[str, Any]], rollout_seconds: float) -> dict[str, float]:
    """The step's rollout metrics over every rank's :func:`trajectory_record` (their ``tokens`` and ``gap``
    are popped, leaving the ``steps.jsonl`` lines)."""
    n = len(records)
    gap = sum((r.pop("gap") for r in records), LogprobGap())
    step_values = [s for r in records for s in r["steps"] if s["d"] is not None]
    metrics = {
        "reward/mean": sum(r["reward"] for r in records) / n,
        "accuracy": sum(r["correct"] for r in records) / n,
        "response_length/mean": sum(r["response_length"] for r in records) / n,
        "response_length/max": float(max(r["response_length"] for r in records)),
        "tool_calls/mean": sum(r["num_tool_calls"] for r in records) / n,
        "turns/mean": sum(r["num_turns"] for r in records) / n,
        "finish/length": sum(r["finish_reason"] == "length" for r in records) / n,
        "tokens": float(sum(r.pop("tokens") for r in records)),
        "rollout/tokens_per_s": sum(r["response_length"] for r in records) / max(rollout_seconds, 1e-9),
        **gap.metrics(),
    }
    if step_values:
        metrics["mean_d"] = sum(s["d"] for s in step_values) / len(step_values)
        metrics["mean_w"] = sum(s["w"] for s in step_values) / len(step_values)
    return metrics
