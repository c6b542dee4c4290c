"""One RL step of grpo / opd / sod / opsd_gt / opsd_hint, on one screen: :meth:`RLWorker.step`.

The step's phases, in order (each a call by name; the module docstring of :mod:`sodkern.trainer.train`
has the map of the files):

1. **sync the engine**: the rollout engine gets the student's current weights (:meth:`RLWorker.sync_engine`).
   The HF engine is a plain (unsharded) copy of the student, so every rank samples its own prompts without
   collectives; vLLM gets the gathered FSDP2 shards streamed in.
2. **roll out** ``rollout.n`` multi-turn responses per prompt with the code interpreter
   (:func:`sodkern.trainer.rollout.loop.rollout`).
3. **score** each response with its outcome reward (:func:`sodkern.trainer.rollout.loop.score_trajectories`).
4. **old log-probs** ``old_logp`` (s_t): recomputed by the FSDP student, not taken from the engine
   (:meth:`RLWorker.logprobs`); the engine's own log-probs only measure the engine-vs-trainer gap.
5. **teacher log-probs** ``teacher_logp`` (tau_t) of the same tokens (:meth:`RLWorker.teacher_logprobs`).
6. **advantages**: GRPO, per prompt group (:func:`sodkern.trainer.advantages.grpo_advantages`).
7. **update**: ``loss.ppo_epochs`` passes over the mini-batches, :func:`sodkern.sod_loss` per trajectory,
   one optimizer step per mini-batch (:meth:`RLWorker.update`).

Scoring and the update run on packed micro-batches through the fused head (:func:`sodkern.linear_logprobs`
/ :func:`sodkern.sod_loss`; no logits). ``sod_loss`` is called once per trajectory of a micro-batch (a slice
of the packed row), so each trajectory's step weights are its own: ``w_k = min((d_1 + eps) / (d_k + eps),
1 + delta)`` with *its* first step's ``d_1``. The step's metrics are built in :mod:`sodkern.trainer.metrics`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from sodkern import SODLossOutput, linear_logprobs, sod_loss
from sodkern.trainer.advantages import grpo_advantages
from sodkern.trainer.config import Config
from sodkern.trainer.metrics import (
    UPDATE_SUMS,
    UpdateTotals,
    add_loss_output,
    rollout_metrics,
    trajectory_record,
    trajectory_steps,
    update_metrics,
)
from sodkern.trainer.packing import MicroBatch, make_micro_batch, pack, pad_to_common_count
from sodkern.trainer.parallel import CausalLM, Dist, copy_weights, full_tensor, load_causal_lm, shard
from sodkern.trainer.rollout import loop as ro
from sodkern.trainer.rollout.chat import ChatFormat
from sodkern.trainer.rollout.hf_engine import HFEngine
from sodkern.trainer.sandbox import CodeInterpreter, LocalSandbox
from sodkern.trainer.tasks.data import Problem

log = logging.getLogger("sodkern.train")

OptimizerStep = Callable[[torch.Tensor], tuple[bool, float]]
"""``optimizer_step(loss_sum) -> (applied, grad_norm)``: :meth:`sodkern.trainer.train.Trainer.optimizer_step`.
Clips and applies the gradients accumulated over a mini-batch (optimizer and LR scheduler step, gradients
zeroed), or skips the update when ``loss_sum`` (any rank) or the gradient norm is not finite."""


def answer_text(problem: Problem) -> str:
    """The ground truth as text, for the opsd_gt teacher prompt."""
    gt = problem.ground_truth
    if isinstance(gt, list):
        return " or ".join(map(str, gt))
    if isinstance(gt, dict):  # code: a reference solution if the row has one, else the first tests
        solution = problem.extra_info.get("solution") or problem.extra_info.get("reference_solution")
        if solution:
            return f"\n```python\n{solution}\n```"
        tests = [{"input": i, "output": o} for i, o in zip(gt.get("inputs", [])[:2], gt.get("outputs", [])[:2])]
        return f"a program that passes these tests: {json.dumps(tests)}"
    return str(gt)


def teacher_messages(problem: Problem, cfg: Config) -> list[dict]:
    """The prompt of the self-distillation teacher: the student's prompt with the answer / hint added to its
    last user message."""
    if cfg.algorithm == "opsd_gt":
        extra = cfg.teacher.gt_template.format(answer=answer_text(problem))
    else:
        hint = problem.extra_info.get(cfg.teacher.hint_field)
        if not hint:
            raise ValueError(
                f"problem {problem.uid}: opsd_hint needs a hint in extra_info[{cfg.teacher.hint_field!r}] "
                "(teacher.hint_field names the key)"
            )
        extra = cfg.teacher.hint_template.format(hint=hint)
    messages = copy.deepcopy(problem.messages)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] += extra
    return messages


@dataclass
class TokenBatch:
    """The step's trajectories on this rank as token sequences, in trajectory order.

    Attributes:
        seqs: per trajectory, ``[L_i]`` int64 prompt + response ids (the student's prompt).
        masks: per trajectory, ``[L_i]`` bool, 1 on the tokens the student generated (the trained tokens).
        teacher_seqs: the same responses after the teacher's prompt (opsd_*: with the answer / hint added),
            else ``seqs``.
        teacher_masks: ``teacher_seqs``' generated-token masks, else ``masks``.
    """

    seqs: list[torch.Tensor]
    masks: list[torch.Tensor]
    teacher_seqs: list[torch.Tensor]
    teacher_masks: list[torch.Tensor]


class RLWorker:
    """Rollout engine, teacher and tool of one rank, and the RL step.

    Args:
        cfg: the run config.
        d: the distributed context.
        model: the sharded student.
        chat: the student's chat format.
        dtype: compute dtype (rollout copy and teacher parameters).
    """

    def __init__(self, cfg: Config, d: Dist, model: CausalLM, chat: ChatFormat, dtype: torch.dtype) -> None:
        self.cfg, self.d, self.model, self.chat = cfg, d, model, chat
        r = cfg.rollout
        self.engine_model: torch.nn.Module | None = None
        if r.engine == "vllm":  # weights are pushed into the engine in place before every rollout
            from sodkern.trainer.rollout.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(
                cfg.student.path,
                max_model_len=r.max_prompt_tokens + r.max_response_tokens,
                seed=cfg.seed + d.rank,
                dtype=str(dtype).removeprefix("torch."),  # the trainer's compute dtype, so the log-probs agree
                enable_sleep_mode=d.device.type == "cuda",  # colocated: memory released during the update
            )
            self.engine.sleep()
        else:
            self.engine_model = AutoModelForCausalLM.from_pretrained(cfg.student.path, dtype=dtype).to(d.device).eval()
            pad = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else chat.stop_token_ids[0]
            self.engine = HFEngine(self.engine_model, pad_token_id=pad)
        self.sandbox = LocalSandbox(timeout=cfg.rollout.tool_timeout_s)
        self.tool = CodeInterpreter(self.sandbox)
        self.rollout_params = ro.RolloutParams(
            n=r.n, max_turns=r.max_turns, max_response_tokens=r.max_response_tokens,
            max_turn_tokens=r.max_turn_tokens, temperature=r.temperature,
            top_p=r.top_p, progress=False,
        )  # fmt: skip
        self.teacher: CausalLM | None = None
        self.remote_teacher = None
        if cfg.algorithm in ("opd", "sod") and cfg.teacher.server:
            from sodkern.trainer.rollout.vllm_server import RemoteTeacher

            self.remote_teacher = RemoteTeacher(cfg.teacher.server)
        elif cfg.algorithm in ("opd", "sod"):
            t = load_causal_lm(cfg.teacher.path, device=d.device, dtype=dtype, liger=cfg.student.liger,
                               attn_implementation=cfg.student.attn_implementation)  # fmt: skip
            if t.config.vocab_size != model.model.config.vocab_size:
                raise ValueError(
                    f"teacher.path={cfg.teacher.path} has vocab_size {t.config.vocab_size} but the student has "
                    f"{model.model.config.vocab_size}: the teacher must share the student's tokenizer"
                )
            t.requires_grad_(False)
            self.teacher = shard(CausalLM(t).eval(), d.mesh, compute_dtype=dtype, offload=cfg.teacher.offload)
        elif cfg.algorithm in ("opsd_gt", "opsd_hint"):
            self.teacher = model  # the student itself, conditioned on the answer / hint

    def filter_prompts(self, problems: list[Problem]) -> list[Problem]:
        """Drop problems whose prompt is longer than ``rollout.max_prompt_tokens`` (warned once)."""
        keep = [p for p in problems if len(self.chat.prompt_ids(p.messages)) <= self.cfg.rollout.max_prompt_tokens]
        if self.cfg.algorithm == "opsd_hint":
            for p in keep:
                teacher_messages(p, self.cfg)  # fails early, naming the problem without a hint
        if len(keep) < len(problems) and self.d.is_main:
            log.warning("dropped %d prompts over rollout.max_prompt_tokens", len(problems) - len(keep))
        return keep

    def sync_engine(self) -> None:
        """Give the rollout engine the student's current weights (and, for vLLM, its memory back)."""
        if self.engine_model is None:  # vLLM: stream the gathered FSDP2 shards into the engine, one at a time
            self.engine.wake_up(["weights"])
            self.engine.update_weights((n, full_tensor(v)) for n, v in self.model.model.state_dict().items())
            self.engine.wake_up(["kv_cache"])
        else:
            copy_weights(self.model, self.engine_model)

    def release_engine(self) -> None:
        """After sampling: a vLLM engine sleeps, giving the accelerator memory back to scoring and the update."""
        if self.engine_model is None:
            self.engine.sleep()

    # ------------------------------------------------------------------------------------------ the step

    def step(self, problems: list[Problem], optimizer_step: OptimizerStep) -> tuple[dict[str, float], list[dict]]:
        """One RL step on this rank's ``problems``; returns (metrics, step-wise records), both for all ranks
        (metrics identical on every rank, records of every rank's trajectories).

        Args:
            problems: this rank's share of the step's prompts.
            optimizer_step: applies (or skips) one mini-batch's update; see :data:`OptimizerStep`.
        """
        cfg = self.cfg
        started = time.perf_counter()
        # 1. sync the engine with the student's current weights, 2. roll out rollout.n responses per prompt
        self.sync_engine()
        trajs = ro.rollout(problems, self.engine, self.chat, self.tool, self.rollout_params)
        self.release_engine()
        rolled_out = time.perf_counter()
        # 3. score: the outcome reward of each response (overlong penalty and tool shaping per the config)
        ro.score_trajectories(
            trajs, problems, max_response_tokens=cfg.rollout.max_response_tokens, sandbox=self.sandbox,
            overlong_penalty=cfg.rollout.overlong_penalty, overlong_buffer=cfg.rollout.overlong_buffer,
            tool_shaping=cfg.rollout.tool_shaping, reward_fn=cfg.rollout.reward_fn or None,
        )  # fmt: skip
        batch = self.token_batch(trajs, problems)
        # 4. old log-probs s_t: recomputed HERE by the FSDP student (the engine's log-probs are only compared
        #    with them, as rollout/logprob_diff_*); the PPO ratio's denominator and SOD's s_t
        old_logp = self.logprobs(self.model, batch.seqs, batch.masks)
        # 5. teacher log-probs tau_t of the same tokens (None for grpo and for loss.distill=full_kl)
        teacher_logp = self.teacher_logprobs(batch)
        # 6. GRPO advantages, per prompt group
        advantages = grpo_advantages(torch.tensor([t.reward.score for t in trajs]), [t.uid for t in trajs])
        scored = time.perf_counter()
        # 7. update: ppo_epochs passes over the mini-batches, sod_loss per trajectory, one optimizer step each
        metrics, steps = self.update(batch, old_logp, teacher_logp, advantages.to(self.d.device), optimizer_step)
        updated = time.perf_counter()

        # the logs: one record per trajectory (every rank's, for steps.jsonl) and the step's metrics
        local = [trajectory_record(t, old_logp[i], steps[i]) for i, t in enumerate(trajs)]
        gathered: list = [None] * self.d.world_size
        dist.all_gather_object(gathered, local)
        records = [r for part in gathered for r in part]
        metrics.update(rollout_metrics(records, rolled_out - started))
        metrics.update({"time/rollout": rolled_out - started, "time/scoring": scored - rolled_out,
                        "time/update": updated - scored})  # fmt: skip
        return metrics, records

    def token_batch(self, trajs: list[ro.Trajectory], problems: list[Problem]) -> TokenBatch:
        """The trajectories as token sequences for the student and the teacher (see :class:`TokenBatch`)."""
        seqs = [torch.tensor(t.prompt_ids + t.response_ids) for t in trajs]
        masks = [torch.tensor([0] * len(t.prompt_ids) + t.response_mask, dtype=torch.bool) for t in trajs]
        if not self.cfg.algorithm.startswith("opsd"):
            return TokenBatch(seqs, masks, seqs, masks)
        prompts = {p.uid: self.chat.prompt_ids(teacher_messages(p, self.cfg)) for p in problems}
        teacher_seqs = [torch.tensor(prompts[t.uid] + t.response_ids) for t in trajs]
        teacher_masks = [torch.tensor([0] * len(prompts[t.uid]) + t.response_mask, dtype=torch.bool) for t in trajs]
        return TokenBatch(seqs, masks, teacher_seqs, teacher_masks)

    @torch.no_grad()
    def logprobs(self, model: CausalLM, seqs: list[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Log-probs of each sequence's trained tokens, ``[n_i]`` float32 each (fused head, packed, no grad)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        temperature = self.cfg.rollout.temperature
        for mb in pad_to_common_count(pack(seqs, masks, self.cfg.train.micro_batch_tokens)):
            mb = mb.to(self.d.device)
            sel = mb.loss_mask[0]
            lp = model(mb.input_ids, mb.position_ids,
                       lambda h, w, sel=sel, mb=mb: linear_logprobs(h[0][sel], w, mb.targets[0][sel],
                                                                   temperature=temperature))  # fmt: skip
            counts = [int(sel[a:b].sum()) for a, b in mb.bounds]
            for i, v in zip(mb.index, lp.float().split(counts)):
                out[i] = v
        return out

    def teacher_logprobs(self, batch: TokenBatch) -> list[torch.Tensor] | None:
        """``teacher_logp``: per trajectory ``[n_i]`` float32 log p_teacher of the generated tokens, from the
        remote teacher (a vLLM server), the local sharded teacher (opd, sod) or the student given the answer /
        hint (opsd_*); None for grpo and for ``loss.distill=full_kl`` (the update then reads the teacher's
        hidden states instead, :meth:`teacher_hidden`)."""
        if self.remote_teacher is not None:  # log p(token_t | prefix) per position from the server
            per_position = self.remote_teacher.logprobs([s.tolist() for s in batch.teacher_seqs])
            return [lp[m].float().to(self.d.device) for lp, m in zip(per_position, batch.teacher_masks)]
        if self.teacher is not None and self.cfg.loss.distill == "logprob":
            return self.logprobs(self.teacher, batch.teacher_seqs, batch.teacher_masks)
        return None

    @torch.no_grad()
    def teacher_hidden(self, mb: MicroBatch, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``loss.distill=full_kl``: the teacher's hidden states ``[1, T, Ht]`` laid on the student row ``mb``
        (at its trained positions) and the teacher's lm-head weight ``[V, Ht]``."""
        teacher_mb = make_micro_batch(
            [batch.teacher_seqs[i] for i in mb.index], [batch.teacher_masks[i] for i in mb.index], mb.index
        ).to(self.d.device)
        hidden_sel, weight = self.teacher(
            teacher_mb.input_ids, teacher_mb.position_ids,
            lambda h, w: (h[0][teacher_mb.loss_mask[0]], w.detach().clone()),
        )  # fmt: skip
        hidden = hidden_sel.new_zeros(1, mb.num_tokens, hidden_sel.shape[-1])
        hidden[0][mb.loss_mask[0]] = hidden_sel
        return hidden, weight

    def update(
        self,
        batch: TokenBatch,
        old_logp: list[torch.Tensor],
        teacher_logp: list[torch.Tensor] | None,
        advantages: torch.Tensor,
        optimizer_step: OptimizerStep,
    ) -> tuple[dict[str, float], list[list[tuple[float | None, float | None]]]]:
        """``loss.ppo_epochs`` passes over the mini-batches (whole prompt groups), one optimizer step each.

        Args:
            batch: the step's token sequences on this rank.
            old_logp: per trajectory ``[n_i]`` float32 old log-probs.
            teacher_logp: per trajectory ``[n_i]`` float32 teacher log-probs, or None.
            advantages: ``[N]`` float32 GRPO advantage of each trajectory, on the device.
            optimizer_step: applies (or skips) one mini-batch's update; see :data:`OptimizerStep`.

        Returns:
            the loss metrics (token-weighted over ranks) and, per trajectory, its steps' ``(d_k, w_k)`` from
            the first epoch (None for grpo, which has no teacher term).
        """
        cfg, dev = self.cfg, self.d.device
        per_mini_batch = cfg.data.mini_batch_size // self.d.world_size * cfg.rollout.n  # this rank's trajectories
        full_kl = cfg.loss.distill == "full_kl"
        totals = UpdateTotals(UPDATE_SUMS, dev)
        steps: list[list] = [[] for _ in batch.seqs]
        num_updates = skipped = 0
        for epoch in range(cfg.loss.ppo_epochs):
            for start in range(0, len(batch.seqs), per_mini_batch):
                idx = list(range(start, min(start + per_mini_batch, len(batch.seqs))))
                tokens = torch.tensor([float(sum(old_logp[i].numel() for i in idx))], device=dev)
                dist.all_reduce(tokens)
                num_tokens = tokens.item() / self.d.world_size  # FSDP averages gradients over ranks
                loss_sum = torch.zeros((), device=dev)
                local = pack([batch.seqs[i] for i in idx], [batch.masks[i] for i in idx], cfg.train.micro_batch_tokens)
                for mb in pad_to_common_count(local):  # every rank runs as many micro-batches (FSDP collectives)
                    mb = mb.to(dev)
                    mb.index = [idx[j] for j in mb.index]
                    old_logp_row = mb.scatter([old_logp[i] for i in mb.index])
                    teacher_logp_row = None if teacher_logp is None else mb.scatter([teacher_logp[i] for i in mb.index])
                    teacher_hidden, teacher_weight = self.teacher_hidden(mb, batch) if full_kl else (None, None)
                    # The loss runs INSIDE the FSDP root's forward: CausalLM.forward calls head_fn(hidden, weight)
                    # with the final hidden states and the lm-head weight, which FSDP2 keeps unsharded only
                    # during the root's forward; sod_loss then never materialises [T, V] logits.
                    head_fn = functools.partial(
                        trajectory_losses, mb=mb, old_logp=old_logp_row, teacher_logp=teacher_logp_row,
                        advantages=advantages, cfg=cfg, num_tokens=num_tokens, teacher_hidden=teacher_hidden,
                        teacher_weight=teacher_weight,
                    )  # fmt: skip
                    loss, outs = self.model(mb.input_ids, mb.position_ids, head_fn)
                    loss.backward()
                    loss_sum += loss.detach()
                    for i, (a, b), out in zip(mb.index, mb.bounds, outs):
                        add_loss_output(totals, out)
                        if epoch == 0:
                            teacher_i = None if teacher_logp_row is None else teacher_logp_row[:, a:b]
                            steps[i] = trajectory_steps(
                                out, old_logp_row[:, a:b], teacher_i, mb.loss_mask[:, a:b], cfg.loss
                            )
                applied, grad_norm = optimizer_step(loss_sum)
                totals.add("loss", loss_sum)
                totals.add("grad_norm", grad_norm if applied else 0.0)
                num_updates += 1
                skipped += not applied
        metrics = update_metrics(
            totals.all_reduce(), world_size=self.d.world_size, num_updates=num_updates, skipped=skipped,
            full_kl=full_kl,
        )  # fmt: skip
        return metrics, steps


def trajectory_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    mb: MicroBatch,
    old_logp: torch.Tensor,
    teacher_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    cfg: Config,
    num_tokens: float,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[SODLossOutput]]:
    """The RL loss of a packed micro-batch: :func:`sodkern.sod_loss` on each trajectory's slice of the row, so
    its step weights use its own ``d_1``; summed (each term is already over the mini-batch's ``num_tokens``).

    Args:
        hidden: ``[1, T, H]`` student hidden states of the packed row.
        weight: ``[V, H]`` student lm-head weight.
        mb: the micro-batch; ``mb.index`` holds the trajectories' indices into ``advantages``.
        old_logp: ``[1, T]`` float32 old log-probs ``s_t`` laid on the row (0 off the mask).
        teacher_logp: ``[1, T]`` float32 teacher log-probs ``tau_t`` laid on the row, or None (grpo, full_kl).
        advantages: ``[N]`` float32 GRPO advantage of every trajectory of the batch.
        cfg: the config: ``cfg.weighting`` (none for grpo, uniform for opd, sod) and ``cfg.loss``.
        num_tokens: normaliser: the mini-batch's trained tokens over the world size.
        teacher_hidden: ``[1, T, Ht]`` teacher hidden states at the trained positions (full_kl).
        teacher_weight: ``[V, Ht]`` teacher lm-head weight (full_kl).

    Returns:
        ``(loss, outputs)``: the differentiable sum and one :class:`~sodkern.SODLossOutput` per trajectory
        (in ``mb.index`` order).
    """
    if mb.is_padding:  # keeps every layer's collectives in step; zero gradient
        return (hidden.sum() + weight.sum()) * 0.0, []
    L = cfg.loss
    total, outs = hidden.new_zeros((), dtype=torch.float32), []
    for i, (a, b) in zip(mb.index, mb.bounds):
        out = sod_loss(
            hidden[:, a:b], weight, mb.targets[:, a:b], old_logp[:, a:b],
            None if teacher_logp is None else teacher_logp[:, a:b], advantages[i : i + 1], mb.loss_mask[:, a:b],
            weighting=cfg.weighting, eps=L.eps, delta=L.delta, opd_coef=L.opd_coef, clip_low=L.clip_low,
            clip_high=L.clip_high, clip_c=L.clip_c, temperature=cfg.rollout.temperature, divergence=L.distill,
            teacher_hidden=None if teacher_hidden is None else teacher_hidden[:, a:b], teacher_weight=teacher_weight,
            num_tokens=num_tokens,
        )  # fmt: skip
        total = total + out.loss
        outs.append(out)
    return total, outs
