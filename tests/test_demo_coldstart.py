"""The demo's premise measurement: step records with per-step labels from real trajectories' token ids."""

from __future__ import annotations

import pytest
import torch

from sodkern.trainer.demo import task as demo_task
from sodkern.trainer.demo.coldstart import observations, step_records
from sodkern.trainer.demo.tiny import tiny_qwen3, tiny_tokenizer
from sodkern.trainer.premise import premise_check
from sodkern.trainer.rollout.chat import ChatFormat
from sodkern.trainer.rollout.loop import Trajectory, mask_spans
from sodkern.trainer.tasks.rewards import RewardResult


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(
        512, corpus=demo_task.corpus(100), split_digits=True, merge_across_words=True,
        chat_template=demo_task.CHAT_TEMPLATE,
    )  # fmt: skip


def _trajectory(tok, problem, outputs: list[str], correct: bool) -> Trajectory:
    """The scripted solution's turns with the tool outputs ``outputs``, framed as the rollout loop frames them."""
    chat = ChatFormat(tok)
    ex = demo_task.scripted_trajectory(problem)
    messages = list(problem.messages)
    t = Trajectory(uid=problem.uid, sample_index=0, prompt_ids=chat.prompt_ids(messages))
    calls = iter(outputs)
    for msg in ex.messages[len(messages) :]:
        if msg["role"] == "tool":
            continue
        before = tok.apply_chat_template(messages, tools=ex.tools, tokenize=False, add_generation_prompt=True)
        turn = chat.encode(tok.apply_chat_template([*messages, msg], tools=ex.tools, tokenize=False)[len(before) :]
                           .rstrip("\n"))  # fmt: skip
        t._extend(turn, [-0.1] * len(turn))
        messages.append(msg)
        if msg.get("tool_calls"):
            out = next(calls)
            t._extend(chat.observation_ids(problem.messages, out, turn), None)
            messages.append({"role": "tool", "content": out})
    t.spans = mask_spans(t.response_mask)
    t.reward = RewardResult(score=float(correct), correct=correct, extracted=None)
    return t


def test_observations_reads_each_steps_tool_response():
    assert observations(["<|im_end|>\n<|im_start|>user\n<tool_response>161</tool_response><|im_end|>\n", ""]) == [
        "161",
        None,
    ]


def test_step_records_label_each_call_against_the_expected_results(tok):
    problem = next(p for p in demo_task.make_problems(20, "test") if p.extra_info["times"] == 3)
    right = problem.extra_info["tool_results"]
    error = "Traceback (most recent call last):\nAssertionError"
    trajs = [_trajectory(tok, problem, right, True), _trajectory(tok, problem, [right[0], error, error], False)]
    teacher = tiny_qwen3(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                         intermediate_size=64, seed=0).eval()  # fmt: skip
    with torch.no_grad():
        records = step_records(trajs, [problem], teacher, tok)
    labels = [[s["tool_ok"] for s in r["steps"]] for r in records]
    assert labels == [[True, True, True, None], [True, False, False, None]]
    for r in records:
        assert r["steps"][0]["w"] == pytest.approx(1.0) and all(s["d"] > 0 for s in r["steps"])
    check = premise_check(records)
    assert check["labeled"] and check["clean"]["n"] == 3 + 1 and check["after_error"]["n"] == 2
