"""Multi-turn tool-integrated rollouts: generate, run the tool calls, append the observations, continue.

The loop is engine-agnostic: an engine implements :class:`GenerationEngine` (one batched ``generate`` on
token ids that returns the sampled ids and their log-probs). Its implementations are
:class:`~sodkern.trainer.rollout.hf_engine.HFEngine` (Hugging Face ``transformers``; the CPU default),
:class:`~sodkern.trainer.rollout.vllm_engine.VLLMEngine` (vLLM in process) and
:class:`~sodkern.trainer.rollout.vllm_server.VLLMServerEngine` (a vLLM server).

Each problem is sampled ``n`` times. A trajectory alternates assistant turns (mask 1) and tool observations
(mask 0) until the model ends a turn without a tool call (``"eos"``), it has made ``max_turns`` assistant
turns (``"max_turns"``), or the response reaches ``max_response_tokens`` or a turn ``max_turn_tokens``
(``"length"``). The tool calls of a round run concurrently with ``CodeInterpreter.execute_many``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from sodkern.trainer.rollout.chat import ChatFormat
from sodkern.trainer.sandbox import CodeInterpreter
from sodkern.trainer.tasks.data import Problem
from sodkern.trainer.tasks.rewards import RewardResult, compute_reward


@dataclass
class SamplingParams:
    """Sampling settings of one ``generate`` call.

    ``temperature == 0`` is greedy decoding; ``top_k <= 0`` and ``top_p == 1`` disable those filters.
    ``stop_token_ids`` end a sequence (the stop token is kept in the output).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 1024
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class Completion:
    """One generated continuation.

    Attributes:
        token_ids: the sampled ids, ending with the stop token if one ended the sequence.
        logprobs: per sampled id, ``log_softmax(logits / temperature)[id]`` (temperature 1 when greedy), from
            the full distribution, before top-p / top-k truncation; same length as ``token_ids``.
        finish_reason: ``"stop"`` (a stop token was sampled) or ``"length"`` (``max_tokens`` reached).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class GenerationEngine(Protocol):
    """A batched generator on token ids (HF, in-process vLLM and vLLM-server engines implement it)."""

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One :class:`Completion` per prompt, in order."""
        ...


@dataclass
class RolloutParams:
    """How :func:`rollout` samples (the recipe: temperature 1.0; eval top_p 0.6; 16 turns; 20,480 response
    tokens). The trainer builds it from the ``rollout:`` section of its config
    (:class:`sodkern.trainer.config.RolloutConfig`), ``sodkern eval`` from its flags.

    Attributes:
        n: responses per problem.
        max_turns: assistant turns per response.
        max_response_tokens: tokens per response, tool observations included.
        max_turn_tokens: tokens per assistant turn; a turn that reaches it without ending ends the response
            (``"length"``), as one that reaches ``max_response_tokens`` does. 0: no cap but the response's.
            A batch decodes until its last row stops, so one rambling turn costs every row of its round.
        temperature: sampling temperature (0: greedy).
        top_p: nucleus sampling (1.0: off).
        top_k: top-k sampling (<= 0: off).
        progress: show a progress bar.
    """

    n: int = 1
    max_turns: int = 16
    max_response_tokens: int = 20480
    max_turn_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_turns < 1 or self.max_response_tokens < 1:
            raise ValueError(
                f"RolloutParams: n, max_turns and max_response_tokens must be >= 1, got n={self.n}, "
                f"max_turns={self.max_turns}, max_response_tokens={self.max_response_tokens}"
            )
        if self.max_turn_tokens < 0:
            raise ValueError(f"RolloutParams: max_turn_tokens must be >= 0 (0: no cap), got {self.max_turn_tokens}")


@dataclass
class Trajectory:
    """One sampled multi-turn response.

    Response coordinates: position 0 is the first token after the prompt. All per-token lists have the
    length of ``response_ids``.

    Attributes:
        uid: the problem's uid.
        sample_index: which of the ``n`` samples of the problem, 0-based.
        prompt_ids: the rendered prompt (chat template with the tool schema and the generation prompt).
        response_ids: assistant tokens as generated, interleaved with the tool observations as rendered.
        response_mask: 1 on tokens the model generated, 0 on tool-observation (and turn-framing) tokens.
        logprobs: rollout log-prob of each generated token, ``log_softmax(logits / temperature)[token]``
            before top-p / top-k truncation (the engine's :class:`Completion` log-probs); 0.0 where mask is 0.
        spans: ``(start, end)`` of each assistant turn (a step), end exclusive: the maximal runs of mask 1.
        num_turns: assistant turns generated.
        num_tool_calls: tool calls answered with an observation (malformed calls get an error observation
            and count; a call in the last allowed turn is not run and does not count).
        finish_reason: ``"eos"`` (a turn ended without a tool call), ``"max_turns"`` or ``"length"``.
        text: the decoded response, special tokens kept.
        reward: set by :func:`score_trajectories`.
    """

    uid: str
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    num_turns: int = 0
    num_tool_calls: int = 0
    finish_reason: str | None = None
    text: str = ""
    reward: RewardResult | None = None

    def _extend(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.response_ids += ids
        self.response_mask += [0 if logprobs is None else 1] * len(ids)
        self.logprobs += [0.0] * len(ids) if logprobs is None else logprobs


def mask_spans(mask: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, end)`` (end exclusive) of each maximal run of 1 in ``mask``."""
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def rollout(
    problems: Sequence[Problem],
    engine: GenerationEngine,
    chat: ChatFormat,
    tool: CodeInterpreter,
    config: RolloutParams,
) -> list[Trajectory]:
    """Sample ``config.n`` multi-turn trajectories per problem.

    Every round generates the next assistant turn of all unfinished trajectories in one engine call, runs
    their tool calls concurrently, and appends the observations.

    Args:
        problems: the problems (``messages`` is the chat prompt).
        engine: the generator.
        chat: the chat format of the model's tokenizer.
        tool: the code interpreter (``execute_many(codes)`` -> results with ``observation()``).
        config: sampling and limits.

    Returns:
        the trajectories, problem-major (``n`` consecutive samples per problem).
    """
    trajectories, chats = [], {}  # chats: id(trajectory) -> its prompt messages
    for problem in problems:
        prompt = chat.prompt_ids(problem.messages)
        for i in range(config.n):
            trajectories.append(Trajectory(problem.uid, i, prompt))
            chats[id(trajectories[-1])] = problem.messages
    with tqdm(total=len(trajectories), unit="traj", desc="rollout", disable=not config.progress) as bar:
        _run_rounds(trajectories, chats, engine, chat, tool, config, bar)
    for t in trajectories:
        t.text = chat.decode(t.response_ids)
        t.spans = mask_spans(t.response_mask)
    return trajectories


def _run_rounds(
    trajectories: list[Trajectory],
    chats: dict[int, list[dict]],
    engine: GenerationEngine,
    chat: ChatFormat,
    tool: CodeInterpreter,
    config: RolloutParams,
    bar: tqdm,
) -> None:
    """The rounds of :func:`rollout`: generate a turn for every unfinished trajectory, run the tools."""
    budget = config.max_response_tokens
    turn_cap = config.max_turn_tokens or budget
    generated, started = 0, time.perf_counter()

    def finish(t: Trajectory, reason: str) -> None:
        t.finish_reason = reason
        bar.update(1)

    active = list(trajectories)
    while active:
        params = SamplingParams(
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_tokens=min(turn_cap, max(budget - len(t.response_ids) for t in active)),
            stop_token_ids=chat.stop_token_ids,
        )
        completions = engine.generate([t.prompt_ids + t.response_ids for t in active], params)
        if len(completions) != len(active):
            raise RuntimeError(f"engine returned {len(completions)} completions for {len(active)} prompts")
        pending = []  # (trajectory, its turn's ids, the tool call)
        for t, c in zip(active, completions):
            room = budget - len(t.response_ids)
            ids = c.token_ids[:room]
            t._extend(ids, c.logprobs[:room])
            t.num_turns += 1
            generated += len(ids)
            if c.finish_reason != "stop" or len(c.token_ids) > room:
                finish(t, "length")
            elif (call := chat.parse(ids)) is None:
                finish(t, "eos")
            elif t.num_turns >= config.max_turns:
                finish(t, "max_turns")
            else:
                pending.append((t, ids, call))
        codes = [call.code for _, _, call in pending if call.error is None]
        results = iter(tool.execute_many(codes) if codes else [])
        for t, ids, call in pending:
            observation = call.error if call.error is not None else next(results).observation()
            obs_ids = chat.observation_ids(chats[id(t)], observation, ids)
            if len(t.response_ids) + len(obs_ids) >= budget:
                finish(t, "length")  # no room left to answer the observation
            else:
                t._extend(obs_ids, None)
                t.num_tool_calls += 1
        active = [t for t in active if t.finish_reason is None]
        bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - started, 1e-9):.1f}")


def score_trajectories(
    trajectories: Sequence[Trajectory],
    problems: Sequence[Problem],
    *,
    max_response_tokens: int,
    **reward_kwargs: Any,
) -> list[RewardResult]:
    """Score each trajectory with ``compute_reward`` and store it in ``trajectory.reward``.

    ``num_turns`` is passed as verl's agent loop counts it: the prompt, the assistant turns and the tool
    turns (``1 + num_turns + num_tool_calls``; ``2 + 2k`` for a finished response with k tool calls).

    Args:
        trajectories: from :func:`rollout`.
        problems: the problems they answer (matched by uid).
        max_response_tokens: the rollout's response limit (for the overlong penalty).
        reward_kwargs: more ``compute_reward`` options (``overlong_penalty``, ``sandbox``, ``reward_fn``...).
    """
    by_uid = {p.uid: p for p in problems}
    rewards = []
    for t in trajectories:
        if t.uid not in by_uid:
            raise ValueError(f"trajectories: uid {t.uid!r} is not among the problems")
        t.reward = compute_reward(
            by_uid[t.uid],
            t.text,
            num_turns=1 + t.num_turns + t.num_tool_calls,
            response_tokens=len(t.response_ids),
            max_response_tokens=max_response_tokens,
            **reward_kwargs,
        )
        rewards.append(t.reward)
    return rewards
