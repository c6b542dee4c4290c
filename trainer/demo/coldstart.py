"""The premise check on the cold-start student's own rollouts, before any RL.

The student samples ``n`` trajectories per problem with the training rollouts' settings (temperature 1.0,
top_p 1.0, the real code-interpreter sandbox); the teacher scores the same tokens; sodkern's
:func:`sodkern.stepwise_weights` gives d_k and w_k exactly as a ``sod`` training step computes them (the
rollout log-probs as ``old_logp``); each step is labelled ``tool_ok`` by comparing its tool output with the
problem's ``extra_info["tool_results"]`` (:func:`sodkern.trainer.premise.label_steps`). The records have the
layout of a run's ``steps.jsonl`` plus the labels, so :func:`sodkern.trainer.premise.premise_check` reads them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from sodkern.trainer.premise import label_steps
from sodkern.trainer.rollout.loop import RolloutParams
from sodkern.trainer.tasks.data import Problem

_RESPONSE = re.compile(r"<tool_response>(.*?)</tool_response>", re.DOTALL)


def observations(text_between: Sequence[str]) -> list[str | None]:
    """The tool output in each step's following observation text (None: no tool response, no call run)."""
    out = []
    for text in text_between:
        found = _RESPONSE.search(text)
        out.append(found.group(1) if found else None)
    return out


@torch.no_grad()
def teacher_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """``[len(response_ids)]`` float32 teacher log-prob of each response token given everything before it."""
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[0, len(prompt_ids) :, None])[:, 0]


def premise_records(
    student: str | Path,
    teacher: str | Path,
    problems: Sequence[Problem],
    config: RolloutParams,
    *,
    eps: float = 1e-6,
    delta: float = 0.2,
) -> list[dict]:
    """Step-wise records (``steps.jsonl`` layout, each step with ``tool_ok``) of ``config.n`` cold-start rollouts
    per problem of ``student`` (an HF folder), sampled with ``config``, scored by ``teacher`` (seed torch before
    calling)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sodkern.trainer.eval import sample_and_score

    trajectories, _ = sample_and_score(student, problems, config)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    return step_records(trajectories, problems, model, AutoTokenizer.from_pretrained(student), eps=eps, delta=delta)


def step_records(trajectories: Sequence, problems: Sequence[Problem], teacher, tokenizer, *, eps: float = 1e-6,
                 delta: float = 0.2) -> list[dict]:  # fmt: skip
    """The step-wise record of each scored :class:`~sodkern.trainer.rollout.loop.Trajectory`: d_k and w_k from
    its rollout log-probs (``old_logp``) and ``teacher``'s log-probs of the same tokens, and ``tool_ok``."""
    from sodkern import stepwise_weights

    by_uid = {p.uid: p for p in problems}
    records = []
    for t in trajectories:
        tau = teacher_logprobs(teacher, t.prompt_ids, t.response_ids)
        old = torch.tensor(t.logprobs, dtype=torch.float32)
        mask = torch.tensor(t.response_mask, dtype=torch.bool)
        sw = stepwise_weights(old[None], tau[None], mask[None], eps=eps, delta=delta)
        k = int(sw.num_steps[0])
        ends = [b for _, b in t.spans]
        starts = [a for a, _ in t.spans[1:]] + [len(t.response_ids)]
        obs = observations([tokenizer.decode(t.response_ids[b:a]) for b, a in zip(ends, starts)])
        labels = label_steps(obs, by_uid[t.uid].extra_info.get("tool_results", []))
        divergences, weights = sw.step_divergence[0, :k].tolist(), sw.step_weights[0, :k].tolist()
        steps = [
            {"k": i + 1, "d": d, "w": w, "tokens": b - a, "span": [a, b], "tool_ok": ok}
            for i, ((a, b), d, w, ok) in enumerate(zip(t.spans, divergences, weights, labels))
        ]
        records.append({"uid": t.uid, "sample": t.sample_index, "reward": t.reward.score, "correct": t.reward.correct,
                        "num_tool_calls": t.num_tool_calls, "steps": steps, "text": t.text})  # fmt: skip
    return records
