"""One RL step of grpo / opd / sod / opsd_gt / opsd_hint: rollout, scoring, PPO update (SOD.md §2).

The rollout runs on a plain (unsharded) copy of the student, refreshed from the FSDP student before each
step, so every rank samples its own prompts without collectives. Scoring and the update run on packed
micro-batches through the fused head (``linear_logprobs`` / ``sod_loss``; no logits). ``sod_loss`` is called
once per trajectory of a micro-batch (a slice of the packed row), so each trajectory's step weights are its
own: ``w_k = min((d_1 + eps) / (d_k + eps), 1 + delta)`` with *its* first step's ``d_1``.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from sodkern.ops.linear_logprobs import linear_logprobs
from sodkern.ops.sod_loss import SODLossOutput, sod_loss
from sodkern.ops.step_weights import stepwise_weights
from sodkern.trainer.advantages import grpo_advantages
from sodkern.trainer.config import Config, LossConfig
from sodkern.trainer.packing import MicroBatch, make_micro_batch, pack, pad_to_common_count
from sodkern.trainer.parallel import CausalLM, Dist, copy_weights, full_tensor, load_causal_lm, shard
from sodkern.trainer.rollout import loop as ro
from sodkern.trainer.rollout.chat import ChatFormat
from sodkern.trainer.rollout.hf_engine import HFEngine
from sodkern.trainer.sandbox import CodeInterpreter, LocalSandbox
from sodkern.trainer.tasks.data import Problem

# sod_loss metrics averaged over tokens; the loss parts (already over the mini-batch's tokens) are summed
METRIC_KEYS = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "mean_token_weight")
LOSS_KEYS = ("pg_loss", "distill_loss")


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


def _gap_sums(g: torch.Tensor) -> tuple[float, float, int, float]:
    """Sum and max of ``|g|``, count, and the sum of the k3 KL estimate ``r - 1 - log r`` with ``log r = g``."""
    if g.numel() == 0:
        return 0.0, 0.0, 0, 0.0
    c = g.clamp(-20, 20)
    return float(g.abs().sum()), float(g.abs().max()), g.numel(), float((c.exp() - 1 - c).sum())


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
        r = cfg.rollout
        self.rollout_config = ro.RolloutConfig(
            n=r.n, max_turns=r.max_turns, max_response_tokens=r.max_response_tokens, temperature=r.temperature,
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
                    f"teacher {cfg.teacher.path} has vocab_size {t.config.vocab_size} but the student has "
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
            print(f"[sodkern] dropped {len(problems) - len(keep)} prompts over rollout.max_prompt_tokens")
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

    def step(self, problems: list[Problem], optimizer_step: Callable) -> tuple[dict[str, float], list[dict]]:
        """Rollout, scoring and PPO update on this rank's ``problems``; returns (metrics, step-wise records),
        both for all ranks (metrics identical on every rank, records complete on rank 0)."""
        cfg, dev = self.cfg, self.d.device
        t0 = time.perf_counter()
        self.sync_engine()
        trajs = ro.rollout(problems, self.engine, self.chat, self.tool, self.rollout_config)
        self.release_engine()
        t1 = time.perf_counter()
        ro.score_trajectories(
            trajs, problems, max_response_tokens=cfg.rollout.max_response_tokens, sandbox=self.sandbox,
            overlong_penalty=cfg.rollout.overlong_penalty, overlong_buffer=cfg.rollout.overlong_buffer,
            tool_shaping=cfg.rollout.tool_shaping, reward_fn=cfg.rollout.reward_fn or None,
        )  # fmt: skip
        seqs = [torch.tensor(t.prompt_ids + t.response_ids) for t in trajs]
        masks = [torch.tensor([0] * len(t.prompt_ids) + t.response_mask, dtype=torch.bool) for t in trajs]
        tseqs, tmasks = seqs, masks
        if cfg.algorithm.startswith("opsd"):
            by_uid = {p.uid: p for p in problems}
            prompts = {u: self.chat.prompt_ids(teacher_messages(p, cfg)) for u, p in by_uid.items()}
            tseqs = [torch.tensor(prompts[t.uid] + t.response_ids) for t in trajs]
            tmasks = [torch.tensor([0] * len(prompts[t.uid]) + t.response_mask, dtype=torch.bool) for t in trajs]
        old = self.logprobs(self.model, seqs, masks)
        gaps = [o.cpu().double() - torch.tensor(t.logprobs, dtype=torch.float64)[torch.tensor(t.response_mask) == 1]
                for o, t in zip(old, trajs)]  # fmt: skip
        tau = None
        if self.remote_teacher is not None:  # log p(token_t | prefix) per position from the server
            lps = self.remote_teacher.logprobs([s.tolist() for s in tseqs])
            tau = [lp[m].float().to(dev) for lp, m in zip(lps, tmasks)]
        elif self.teacher is not None and cfg.loss.distill == "logprob":
            tau = self.logprobs(self.teacher, tseqs, tmasks)
        adv = grpo_advantages(torch.tensor([t.reward.score for t in trajs]), [t.uid for t in trajs]).to(dev)
        t2 = time.perf_counter()
        metrics, steps = self.update(seqs, masks, tseqs, tmasks, old, tau, adv, optimizer_step)
        t3 = time.perf_counter()

        rows = [
            {"uid": t.uid, "sample": t.sample_index, "reward": t.reward.score, "correct": t.reward.correct,
             "num_tool_calls": t.num_tool_calls, "num_turns": t.num_turns, "finish_reason": t.finish_reason,
             "response_length": len(t.response_ids), "tokens": len(t.prompt_ids) + len(t.response_ids),
             "gap": _gap_sums(gaps[i]),
             "steps": [{"k": k, "d": dk, "w": wk, "tokens": b - a, "span": [a, b]}
                       for k, ((a, b), (dk, wk)) in enumerate(zip(t.spans, steps[i]), start=1)]}
            for i, t in enumerate(trajs)
        ]  # fmt: skip
        gathered: list = [None] * self.d.world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
        n = len(rows)
        step_values = [s for r in rows for s in r["steps"] if s["d"] is not None]
        metrics.update(
            {
                "reward/mean": sum(r["reward"] for r in rows) / n,
                "accuracy": sum(r["correct"] for r in rows) / n,
                "response_length/mean": sum(r["response_length"] for r in rows) / n,
                "response_length/max": float(max(r["response_length"] for r in rows)),
                "tool_calls/mean": sum(r["num_tool_calls"] for r in rows) / n,
                "turns/mean": sum(r["num_turns"] for r in rows) / n,
                "finish/length": sum(r["finish_reason"] == "length" for r in rows) / n,
                "time/rollout": t1 - t0,
                "time/scoring": t2 - t1,
                "time/update": t3 - t2,
                "tokens": float(sum(r.pop("tokens") for r in rows)),
            }
        )
        # the usual engine-vs-trainer gap: rollout log-probs against the recomputed old log-probs
        gaps = [r.pop("gap") for r in rows]
        n_gap = max(sum(g[2] for g in gaps), 1)
        metrics["rollout/logprob_diff_abs_mean"] = sum(g[0] for g in gaps) / n_gap
        metrics["rollout/logprob_diff_abs_max"] = max(g[1] for g in gaps)
        metrics["rollout/kl_k3"] = sum(g[3] for g in gaps) / n_gap
        metrics["rollout/tokens_per_s"] = sum(r["response_length"] for r in rows) / max(t1 - t0, 1e-9)
        if step_values:
            metrics["mean_d"] = sum(s["d"] for s in step_values) / len(step_values)
            metrics["mean_w"] = sum(s["w"] for s in step_values) / len(step_values)
        return metrics, rows

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

    @torch.no_grad()
    def teacher_hidden(self, mb: MicroBatch, tseqs: list, tmasks: list) -> tuple[torch.Tensor, torch.Tensor]:
        """``divergence="full_kl"``: the teacher's hidden states ``[1, T, Ht]`` laid on the student row ``mb``
        (at its trained positions) and the teacher's lm-head weight ``[V, Ht]``."""
        tmb = make_micro_batch([tseqs[i] for i in mb.index], [tmasks[i] for i in mb.index], mb.index)
        tmb = tmb.to(self.d.device)
        h_sel, w = self.teacher(
            tmb.input_ids, tmb.position_ids, lambda h, w: (h[0][tmb.loss_mask[0]], w.detach().clone())
        )
        th = h_sel.new_zeros(1, mb.num_tokens, h_sel.shape[-1])
        th[0][mb.loss_mask[0]] = h_sel
        return th, w

    def update(self, seqs, masks, tseqs, tmasks, old, tau, adv, optimizer_step) -> tuple[dict, list]:
        """``ppo_epochs`` passes over the mini-batches (whole prompt groups), one optimizer step each.

        Returns the loss metrics (token-weighted over ranks) and, per trajectory, its steps' ``(d_k, w_k)``
        from the first epoch (None for grpo, which has no teacher term).
        """
        cfg, L, dev = self.cfg, self.cfg.loss, self.d.device
        per_mb = cfg.data.mini_batch_size // self.d.world_size * cfg.rollout.n
        full_kl = L.distill == "full_kl"
        nm = len(METRIC_KEYS)
        sums = torch.zeros(nm + len(LOSS_KEYS) + 3, device=dev)  # metrics*tokens, loss parts, tokens, loss, norm
        steps: list[list] = [[] for _ in seqs]
        num_updates = skipped = 0
        for epoch in range(L.ppo_epochs):
            for start in range(0, len(seqs), per_mb):
                idx = list(range(start, min(start + per_mb, len(seqs))))
                n_tok = torch.tensor([float(sum(old[i].numel() for i in idx))], device=dev)
                dist.all_reduce(n_tok)
                num_tokens = n_tok.item() / self.d.world_size  # FSDP averages gradients over ranks
                loss_sum = torch.zeros((), device=dev)
                local = pack([seqs[i] for i in idx], [masks[i] for i in idx], cfg.train.micro_batch_tokens)
                for mb in pad_to_common_count(local):
                    mb = mb.to(dev)
                    mb.index = [idx[j] for j in mb.index]
                    th, tw = self.teacher_hidden(mb, tseqs, tmasks) if full_kl else (None, None)

                    old_row = mb.scatter([old[i] for i in mb.index])
                    tau_row = None if tau is None else mb.scatter([tau[i] for i in mb.index])
                    head = functools.partial(
                        trajectory_losses, mb=mb, old_row=old_row, tau_row=tau_row, adv=adv, cfg=cfg,
                        num_tokens=num_tokens, teacher_hidden=th, teacher_weight=tw,
                    )  # fmt: skip
                    loss, outs = self.model(mb.input_ids, mb.position_ids, head)
                    loss.backward()
                    loss_sum += loss.detach()
                    for i, (a, b), out in zip(mb.index, mb.bounds, outs):
                        m, k = out.metrics, out.metrics["num_tokens"]
                        zero = torch.zeros((), device=dev)
                        sums[:nm] += torch.stack([m[key] * k for key in METRIC_KEYS])
                        sums[nm : nm + len(LOSS_KEYS)] += torch.stack([m.get(key, zero) for key in LOSS_KEYS])
                        sums[-3] += k
                        if epoch == 0:
                            tau_i = None if tau_row is None else tau_row[:, a:b]
                            steps[i] = step_values(out, old_row[:, a:b], tau_i, mb.loss_mask[:, a:b], L)
                applied, grad_norm = optimizer_step(loss_sum)
                sums[-2] += loss_sum
                sums[-1] += grad_norm if applied else 0.0
                num_updates += 1
                skipped += not applied
        dist.all_reduce(sums)
        per_update = self.d.world_size * num_updates  # loss parts: token means over each mini-batch, averaged
        metrics = {key: (sums[j] / sums[-3].clamp_min(1)).item() for j, key in enumerate(METRIC_KEYS)}
        metrics.update({key: sums[nm + j].item() / per_update for j, key in enumerate(LOSS_KEYS)})
        if not full_kl:
            metrics.pop("distill_loss")
        metrics["loss"] = sums[-2].item() / per_update
        metrics["grad_norm"] = sums[-1].item() / self.d.world_size / max(num_updates - skipped, 1)
        metrics["skipped"] = float(skipped)
        return metrics, steps


def trajectory_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    mb: MicroBatch,
    old_row: torch.Tensor,
    tau_row: torch.Tensor | None,
    adv: torch.Tensor,
    cfg: Config,
    num_tokens: float,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[SODLossOutput]]:
    """The RL loss of a packed micro-batch: :func:`sod_loss` on each trajectory's slice of the row, so its
    step weights use its own ``d_1``; summed (each term is already over the mini-batch's ``num_tokens``).

    Args:
        hidden: ``[1, T, H]`` student hidden states of the packed row.
        weight: ``[V, H]`` student lm-head weight.
        mb: the micro-batch; ``mb.index`` holds the trajectories' indices into ``adv``.
        old_row: ``[1, T]`` float32 rollout log-probs ``s_t`` (0 off the mask).
        tau_row: ``[1, T]`` float32 teacher log-probs ``tau_t``, or None (grpo, full_kl).
        adv: ``[N]`` float32 GRPO advantage of every trajectory of the batch.
        cfg: the config: ``cfg.weighting`` (none for grpo, uniform for opd, sod) and ``cfg.loss``.
        num_tokens: normaliser: the mini-batch's trained tokens over the world size.
        teacher_hidden: ``[1, T, Ht]`` teacher hidden states at the trained positions (full_kl).
        teacher_weight: ``[V, Ht]`` teacher lm-head weight (full_kl).

    Returns:
        ``(loss, outputs)``: the differentiable sum and one :class:`SODLossOutput` per trajectory (in
        ``mb.index`` order).
    """
    if mb.is_padding:  # keeps every layer's collectives in step; zero gradient
        return (hidden.sum() + weight.sum()) * 0.0, []
    L = cfg.loss
    total, outs = hidden.new_zeros((), dtype=torch.float32), []
    for i, (a, b) in zip(mb.index, mb.bounds):
        out = sod_loss(
            hidden[:, a:b], weight, mb.targets[:, a:b], old_row[:, a:b],
            None if tau_row is None else tau_row[:, a:b], adv[i : i + 1], mb.loss_mask[:, a:b],
            weighting=cfg.weighting, eps=L.eps, delta=L.delta, opd_coef=L.opd_coef, clip_low=L.clip_low,
            clip_high=L.clip_high, clip_c=L.clip_c, temperature=cfg.rollout.temperature, divergence=L.distill,
            teacher_hidden=None if teacher_hidden is None else teacher_hidden[:, a:b], teacher_weight=teacher_weight,
            num_tokens=num_tokens,
        )  # fmt: skip
        total = total + out.loss
        outs.append(out)
    return total, outs


def step_values(
    out: SODLossOutput, old: torch.Tensor, tau: torch.Tensor | None, mask: torch.Tensor, L: LossConfig
) -> list[tuple[float | None, float | None]]:
    """Per step ``(d_k, w_k)`` of one trajectory: sod_loss's step weights (sod), else ``d_k`` of ``|s - tau|``
    with the applied ``w = 1`` (opd), else ``(None, None)`` per step (grpo: no teacher term).

    Args:
        out: the trajectory's SODLossOutput.
        old: ``[1, L]`` float32 rollout log-probs of the trajectory's slice of the packed row.
        tau: ``[1, L]`` float32 teacher log-probs of the slice, or None.
        mask: ``[1, L]`` bool trained-token mask of the slice.
    """
    if out.steps is not None:
        k = int(out.steps.num_steps[0])
        return list(zip(out.steps.step_divergence[0, :k].tolist(), out.steps.step_weights[0, :k].tolist()))
    if tau is not None:
        steps = stepwise_weights(old, tau, mask, eps=L.eps, delta=L.delta)
        return [(d, 1.0) for d in steps.step_divergence[0, : int(steps.num_steps[0])].tolist()]
    m = mask[0].int()
    runs = int((m[1:] > m[:-1]).sum()) + int(m[0])
    return [(None, None)] * runs
