"""Multi-turn tool-integrated rollouts: generate, run the tool calls, append the observations, continue.

The loop is engine-agnostic: an engine implements :class:`GenerationEngine` (one batched ``generate`` on
token ids that returns the sampled ids and their log-probs). :class:`HFEngine` is the Hugging Face
``transformers`` implementation (KV cache, left-padded batches; the CPU default); a vLLM engine is the
second implementation of the same protocol.

Each problem is sampled ``n`` times. A trajectory alternates assistant turns (mask 1) and tool observations
(mask 0) until the model ends a turn without a tool call (``"eos"``), it has made ``max_turns`` assistant
turns (``"max_turns"``), or the response reaches ``max_response_tokens`` (``"length"``). The tool calls of a
round run concurrently with ``CodeInterpreter.execute_many``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from sodkern.trainer.chat import ChatFormat
from sodkern.trainer.data import Problem
from sodkern.trainer.rewards import RewardResult, compute_reward
from sodkern.trainer.sandbox import CodeInterpreter
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel


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
    """A batched generator on token ids (implemented by :class:`HFEngine`; a vLLM engine is the second)."""

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One :class:`Completion` per prompt, in order."""
        ...


class _LogprobRecorder(LogitsProcessor):
    """Records ``log_softmax(scores / temperature)`` of each sampled token, one step late.

    Called with the scores of step t and the ids up to step t - 1, it gathers the log-prob of the token
    sampled at step t - 1 from the distribution it kept, so only one ``[batch, vocab]`` distribution is held.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.last: torch.Tensor | None = None  # [B, V] fp32 log-probs of the latest step
        self.steps: list[torch.Tensor] = []  # per step, [B] fp32 log-prob of the sampled id

    def gather(self, ids: torch.Tensor) -> None:
        if self.last is not None:
            self.steps.append(self.last.gather(1, ids[:, None].to(self.last.device))[:, 0])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.gather(input_ids[:, -1])
        self.last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores


class HFEngine:
    """:class:`GenerationEngine` on a Hugging Face causal LM: ``model.generate`` with its KV cache.

    Prompts are sorted by length and generated in left-padded batches of at most ``max_batch_size``. Every
    sampling setting not in :class:`SamplingParams` is neutral (no repetition penalty, no min-p), whatever
    the model's ``generation_config`` says. Sampling uses the global torch RNG (``torch.manual_seed``).

    Args:
        model: the causal LM (in eval mode, on its device).
        pad_token_id: the id used for left padding (masked out).
        max_batch_size: prompts per ``model.generate`` call.
    """

    def __init__(self, model: PreTrainedModel, *, pad_token_id: int, max_batch_size: int = 64) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        order = sorted(range(len(prompt_token_ids)), key=lambda i: -len(prompt_token_ids[i]))
        out: list[Completion | None] = [None] * len(prompt_token_ids)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            for i, c in zip(chunk, self._generate_batch([prompt_token_ids[i] for i in chunk], params)):
                out[i] = c
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        device = self.model.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[row, width - len(p) :] = 1
        greedy = params.temperature <= 0
        recorder = _LogprobRecorder(1.0 if greedy else params.temperature)
        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": max(params.top_k, 0)}
        config = GenerationConfig(
            max_new_tokens=params.max_tokens,
            do_sample=not greedy,
            **({} if greedy else {**sampling, "min_p": 0.0}),
            repetition_penalty=1.0,
            eos_token_id=list(params.stop_token_ids) or None,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
        )
        result = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
        )
        new = result.sequences[:, width:]
        recorder.gather(new[:, -1])
        logprobs = torch.stack(recorder.steps, dim=1).cpu()  # [B, T]
        stops = set(params.stop_token_ids)
        completions = []
        for row in range(len(prompts)):
            ids = new[row].tolist()
            end = next((t + 1 for t, tok in enumerate(ids) if tok in stops), None)
            if end is None:
                completions.append(Completion(ids, logprobs[row].tolist(), "length"))
            else:
                completions.append(Completion(ids[:end], logprobs[row, :end].tolist(), "stop"))
        return completions


@dataclass
class RolloutConfig:
    """Rollout settings (the recipe: temperature 1.0; eval top_p 0.6; 16 turns; 20,480 response tokens)."""

    n: int = 1
    max_turns: int = 16
    max_response_tokens: int = 20480
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_turns < 1 or self.max_response_tokens < 1:
            raise ValueError(
                f"RolloutConfig: n, max_turns and max_response_tokens must be >= 1, got n={self.n}, "
                f"max_turns={self.max_turns}, max_response_tokens={self.max_response_tokens}"
            )


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
    config: RolloutConfig,
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
    config: RolloutConfig,
    bar: tqdm,
) -> None:
    """The rounds of :func:`rollout`: generate a turn for every unfinished trajectory, run the tools."""
    budget = config.max_response_tokens
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
            max_tokens=max(budget - len(t.response_ids) for t in active),
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
