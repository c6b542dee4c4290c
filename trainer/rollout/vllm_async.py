"""Multi-turn rollouts on vLLM with continuous batching: tool calls run while other trajectories generate.

:func:`~sodkern.trainer.rollout.loop.rollout` is turn-synchronous: each round waits for the longest turn of the
batch, then for the slowest tool call. :func:`rollout_async` drives the in-process vLLM engine step by step
instead: every trajectory is its own request; when one finishes a turn with a tool call, the call goes to a
thread pool and the engine keeps decoding the others; when the result is back, the observation ids are
appended and the continuation is submitted at once (its prefix, the whole history, is a prefix-cache hit).
The trajectories, and their masks, log-probs and spans, follow the same rules as ``rollout``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from sodkern.trainer.rollout.chat import ChatFormat, ToolCall
from sodkern.trainer.rollout.loop import Completion, RolloutParams, SamplingParams, Trajectory, mask_spans
from sodkern.trainer.rollout.vllm_engine import VLLMEngine, to_completion
from sodkern.trainer.tasks.data import Problem


def rollout_async(
    problems: Sequence[Problem],
    engine: VLLMEngine,
    chat: ChatFormat,
    tool: Any,
    config: RolloutParams,
    *,
    tool_workers: int = 16,
) -> list[Trajectory]:
    """Sample ``config.n`` multi-turn trajectories per problem, all in flight at once.

    Same contract as :func:`~sodkern.trainer.rollout.loop.rollout` (problem-major order, ``"eos"`` /
    ``"max_turns"`` / ``"length"`` endings, the response budget, error observations for malformed calls).

    Args:
        problems: the problems (``messages`` is the chat prompt).
        engine: the colocated vLLM engine (its ``generate`` must not run at the same time).
        chat: the chat format of the model's tokenizer.
        tool: a ``sodkern.trainer.sandbox.CodeInterpreter`` (``execute(code)`` -> a result with
            ``observation()``; called from ``tool_workers`` threads).
        config: sampling and limits.
        tool_workers: tool calls running at once.

    Returns:
        the trajectories, problem-major (``n`` consecutive samples per problem).
    """
    from vllm.inputs import TokensPrompt

    budget = config.max_response_tokens
    core = engine.llm.llm_engine
    if core.has_unfinished_requests():
        raise RuntimeError("rollout_async: the vLLM engine is already running requests")
    trajectories, messages = [], []
    for problem in problems:
        prompt = chat.prompt_ids(problem.messages)
        for i in range(config.n):
            trajectories.append(Trajectory(problem.uid, i, prompt))
            messages.append(problem.messages)
    params = SamplingParams(
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        max_tokens=budget,
        stop_token_ids=chat.stop_token_ids,
    )
    bar = tqdm(total=len(trajectories), unit="traj", desc="rollout", disable=not config.progress)
    running: dict[str, int] = {}  # request id -> trajectory index
    tools: dict[Future, tuple[int, list[int]]] = {}  # tool call -> (trajectory index, its turn's ids)
    ids = itertools.count()
    generated, started = 0, time.perf_counter()

    def finish(i: int, reason: str) -> None:
        trajectories[i].finish_reason = reason
        bar.update(1)

    def submit(i: int) -> None:
        t = trajectories[i]
        context = t.prompt_ids + t.response_ids
        sp = engine.request_params(replace(params, max_tokens=budget - len(t.response_ids)), len(context))
        if sp is None:  # no room left under max_model_len
            finish(i, "length")
            return
        request_id = f"sodkern-{next(ids)}"
        running[request_id] = i
        core.add_request(request_id, TokensPrompt(prompt_token_ids=context), sp)

    def observe(i: int, turn: list[int], observation: str) -> None:
        t = trajectories[i]
        obs_ids = chat.observation_ids(messages[i], observation, turn)
        if len(t.response_ids) + len(obs_ids) >= budget:
            finish(i, "length")  # no room left to answer the observation
            return
        t._extend(obs_ids, None)
        t.num_tool_calls += 1
        submit(i)

    def end_turn(i: int, c: Completion, pool: ThreadPoolExecutor) -> None:
        t = trajectories[i]
        t._extend(c.token_ids, c.logprobs)
        t.num_turns += 1
        call: ToolCall | None
        if c.finish_reason != "stop":
            finish(i, "length")
        elif (call := chat.parse(c.token_ids)) is None:
            finish(i, "eos")
        elif t.num_turns >= config.max_turns:
            finish(i, "max_turns")
        elif call.error is not None:
            observe(i, c.token_ids, call.error)
        else:
            tools[pool.submit(tool.execute, call.code)] = (i, c.token_ids)

    with ThreadPoolExecutor(tool_workers, thread_name_prefix="sodkern-tool") as pool:
        try:
            for i in range(len(trajectories)):
                submit(i)
            while running or tools:
                if running:
                    outputs = core.step()
                else:  # only tool calls in flight: wait for one
                    wait(list(tools), return_when=FIRST_COMPLETED)
                    outputs = []
                for output in outputs:
                    if output.finished:
                        i = running.pop(output.request_id)
                        engine.count(output)
                        generated += len(output.outputs[0].token_ids)
                        end_turn(i, to_completion(output), pool)
                for future in [f for f in tools if f.done()]:
                    i, turn = tools.pop(future)
                    observe(i, turn, future.result().observation())
                bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - started, 1e-9):.1f}")
        finally:
            if running:  # an error mid-rollout: leave the engine empty for the next call
                core.abort_request(list(running))
    bar.close()
    for t in trajectories:
        t.text = chat.decode(t.response_ids)
        t.spans = mask_spans(t.response_mask)
    return trajectories
