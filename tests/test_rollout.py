"""The multi-turn rollout loop, driven by a scripted engine (exact masks / spans / observations) and by the
Hugging Face engine on the tiny Qwen3 (log-probs against a teacher-forced forward pass)."""

import pytest
import torch

from sodkern.trainer.demo.tiny import tiny_qwen3, tiny_tokenizer
from sodkern.trainer.rollout.chat import ChatFormat
from sodkern.trainer.rollout.hf_engine import HFEngine
from sodkern.trainer.rollout.loop import (
    Completion,
    RolloutParams,
    SamplingParams,
    mask_spans,
    rollout,
    score_trajectories,
)
from sodkern.trainer.sandbox import CodeInterpreter
from sodkern.trainer.tasks.data import Problem


def call(code: str) -> str:
    return '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "' + code + '"}}\n</tool_call>'


class ScriptedEngine:
    """A second implementation of the engine protocol: it plays fixed assistant turns.

    ``scripts`` maps a problem's prompt text to its turns; the turn played is the number of generation
    prompts after the prompt. The log-prob of the j-th token of turn i is ``-(i + 1) - j / 1000``.
    """

    def __init__(self, chat: ChatFormat, problems: list[Problem], scripts: dict[str, list[str]]):
        self.chat = chat
        self.scripts = {tuple(chat.prompt_ids(p.messages)): scripts[p.uid] for p in problems}
        self.turn_start = chat.encode("<|im_start|>assistant\n")
        self.calls: list[int] = []  # batch size of each generate call

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        self.calls.append(len(prompt_token_ids))
        out = []
        for context in prompt_token_ids:
            prompt = next(p for p in self.scripts if tuple(context[: len(p)]) == p)
            rest, k = context[len(prompt) :], len(self.turn_start)
            turn = sum(rest[j : j + k] == self.turn_start for j in range(len(rest)))
            ids = self.chat.encode(self.scripts[prompt][turn])
            logprobs = [-(turn + 1) - j / 1000 for j in range(len(ids))]
            stop = next((j + 1 for j, t in enumerate(ids) if t in params.stop_token_ids), None)
            if stop is not None and stop <= params.max_tokens:
                out.append(Completion(ids[:stop], logprobs[:stop], "stop"))
            else:
                out.append(Completion(ids[: params.max_tokens], logprobs[: params.max_tokens], "length"))
        return out


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat(tok):
    return ChatFormat(tok)


@pytest.fixture(scope="module")
def tool():
    return CodeInterpreter()


def problem(uid: str, question: str, answer: str = "4") -> Problem:
    return Problem(uid, "test_math", "math", [{"role": "user", "content": question}], answer)


def check_invariants(t, max_response_tokens):
    n = len(t.response_ids)
    assert len(t.response_mask) == len(t.logprobs) == n <= max_response_tokens
    assert t.spans == mask_spans(t.response_mask)
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.response_mask) if m == 0)
    assert len(t.spans) == t.num_turns


def test_multi_turn_with_real_tool_calls(tok, chat, tool):
    p = problem("p0", "What is 2 + 2?")
    turns = [
        "Let me compute.\n" + call("print(2 + 2)"),
        "Check once more.\n" + call("x = 3\\nx * 7"),
        "Both ran. The answer is \\boxed{4}.<|im_end|>",
    ]
    engine = ScriptedEngine(chat, [p], {"p0": turns})
    [t] = rollout([p], engine, chat, tool, RolloutParams(max_response_tokens=400, progress=False))
    assert (t.finish_reason, t.num_turns, t.num_tool_calls) == ("eos", 3, 2)
    turn_ids = [chat.encode(s) for s in turns]
    obs = [chat.observation_ids(p.messages, out, ids) for out, ids in (("4", turn_ids[0]), ("21", turn_ids[1]))]
    assert t.response_ids == turn_ids[0] + obs[0] + turn_ids[1] + obs[1] + turn_ids[2]
    lengths = [len(x) for x in (turn_ids[0], obs[0], turn_ids[1], obs[1], turn_ids[2])]
    ends = [sum(lengths[: i + 1]) for i in range(5)]
    assert t.spans == [(0, ends[0]), (ends[1], ends[2]), (ends[3], ends[4])]
    assert t.response_mask == sum(([m] * n for m, n in zip([1, 0, 1, 0, 1], lengths)), [])
    assert t.logprobs[ends[1] : ends[1] + 2] == [-2.0, -2.001]  # scripted log-probs of turn 2 in place
    check_invariants(t, 400)
    assert "<tool_response>\n4\n</tool_response>" in t.text and "<tool_response>\n21\n</tool_response>" in t.text
    # the ids are what the chat template renders for the whole conversation
    conversation = [*p.messages]
    for text, out in zip(turns, ["4", "21", None]):
        conversation.append({"role": "assistant", "content": text.removesuffix("<|im_end|>")})
        if out is not None:
            conversation.append({"role": "tool", "content": out})
    rendered = tok.apply_chat_template(conversation, tools=chat.tools, tokenize=False)
    assert t.prompt_ids + t.response_ids == chat.encode(rendered.removesuffix("\n"))
    [reward] = score_trajectories([t], [p], max_response_tokens=400)
    assert t.reward is reward and reward.correct and reward.score == 1.0


def test_malformed_call_gets_an_error_observation(chat, tool):
    p = problem("p1", "What is 2 + 2?")
    turns = ['<tool_call>{"name": "code_interpreter", "arguments": {"code": 1</tool_call>', "\\boxed{5}<|im_end|>"]
    engine = ScriptedEngine(chat, [p], {"p1": turns})
    [t] = rollout([p], engine, chat, tool, RolloutParams(max_response_tokens=400, progress=False))
    assert (t.finish_reason, t.num_turns, t.num_tool_calls) == ("eos", 2, 1)
    assert "<tool_response>\nError: the tool call is not valid JSON" in t.text
    check_invariants(t, 400)
    [reward] = score_trajectories([t], [p], max_response_tokens=400)
    assert not reward.correct and reward.score == pytest.approx(-0.9)  # one tool call: -1 + 0.1


def test_n_samples_max_turns_and_length(chat, tool):
    forever = ["Again.\n" + call("print(1)")] * 5
    problems = [problem("loop", "Loop?"), problem("short", "Short?")]
    scripts = {"loop": forever, "short": ["\\boxed{4}<|im_end|>"]}
    engine = ScriptedEngine(chat, problems, scripts)
    config = RolloutParams(n=3, max_turns=3, max_response_tokens=2000, progress=False)
    out = rollout(problems, engine, chat, tool, config)
    assert [(t.uid, t.sample_index) for t in out] == [(u, i) for u in ("loop", "short") for i in range(3)]
    for t in out[:3]:
        assert (t.finish_reason, t.num_turns, t.num_tool_calls) == ("max_turns", 3, 2)
        check_invariants(t, 2000)
    for t in out[3:]:
        assert (t.finish_reason, t.num_turns, t.num_tool_calls) == ("eos", 1, 0)
    assert engine.calls == [6, 3, 3]  # one batched generate per round over the unfinished trajectories

    # the response budget: cut inside a turn, and an observation that does not fit
    first = len(chat.encode(forever[0]))
    obs = len(chat.observation_ids(problems[0].messages, "1", chat.encode(forever[0])))
    for budget in (first - 3, first + obs, first + obs + 5):
        [t] = rollout(problems[:1], engine, chat, tool, RolloutParams(max_response_tokens=budget, progress=False))
        assert t.finish_reason == "length" and len(t.response_ids) <= budget
        check_invariants(t, budget)
    assert len(t.response_ids) == first + obs + 5  # the last turn was cut at the budget


def test_max_turn_tokens_ends_a_long_turn(chat, tool):
    long_turn, short_turn = "Let me think. " * 20 + call("print(1)"), call("print(2)")
    problems = [problem("long", "Long?"), problem("short", "Short?")]
    scripts = {"long": [long_turn, "\\boxed{4}<|im_end|>"], "short": [short_turn, "\\boxed{4}<|im_end|>"]}
    engine = ScriptedEngine(chat, problems, scripts)
    cap = len(chat.encode(short_turn)) + 2
    assert len(chat.encode(long_turn)) > cap
    out = rollout(problems, engine, chat, tool, RolloutParams(max_turn_tokens=cap, progress=False))
    long, short = out
    assert (long.finish_reason, long.num_turns, long.num_tool_calls) == ("length", 1, 0)
    assert long.response_ids == chat.encode(long_turn)[:cap]  # cut at the cap, not at max_response_tokens
    assert (short.finish_reason, short.num_turns, short.num_tool_calls) == ("eos", 2, 1)  # shorter turns unaffected
    for t in out:
        check_invariants(t, 20480)
    [free] = rollout(problems[:1], engine, chat, tool, RolloutParams(progress=False))  # 0: no cap
    assert (free.finish_reason, free.num_turns) == ("eos", 2)


def test_hf_engine_logprobs_match_a_teacher_forced_forward(tok, chat, tool):
    model = tiny_qwen3(tok, seed=1)
    # a logit bias on </tool_call> and <|im_end|> so that the random model ends turns and calls the tool
    # (malformed calls: error observations), giving multi-turn contexts of different lengths in a batch
    bias = torch.zeros(len(tok))
    bias[chat.stop_token_ids] = torch.tensor([0.5, 1.5])
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + bias)
    engine = HFEngine(model, pad_token_id=tok.pad_token_id, max_batch_size=3)
    problems = [problem("a", "Hi"), problem("b", "What is the sum of the first 100 positive integers?")]
    torch.manual_seed(0)
    config = RolloutParams(
        n=2, max_turns=3, max_response_tokens=200, temperature=0.7, top_p=0.8, top_k=40, progress=False
    )
    out = rollout(problems, engine, chat, tool, config)
    assert len(out) == 4 and len({len(t.prompt_ids) for t in out}) == 2  # left padding in play
    assert any(t.num_tool_calls >= 1 for t in out)
    for t in out:
        check_invariants(t, 200)
        assert t.num_tool_calls == t.num_turns - 1 or t.finish_reason == "length"
        ids = torch.tensor([t.prompt_ids + t.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(t.prompt_ids) - 1 : -1].float() / 0.7
        ref = torch.log_softmax(logits, -1).gather(1, ids[0, len(t.prompt_ids) :, None])[:, 0]
        mask = torch.tensor(t.response_mask, dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(t.logprobs)[mask], ref[mask], atol=1e-4, rtol=0)


def test_hf_engine_stops_at_the_first_stop_token(tok):
    model = tiny_qwen3(tok, seed=2)
    engine = HFEngine(model, pad_token_id=tok.pad_token_id)
    prompts = [tok.encode("a b c"), tok.encode("print(1)"), tok.encode("x")]
    stops = list(range(0, len(tok), 16))  # random stopping points
    torch.manual_seed(0)
    out = engine.generate(prompts, SamplingParams(max_tokens=30, stop_token_ids=stops))
    assert {c.finish_reason for c in out} <= {"stop", "length"}
    for p, c in zip(prompts, out):
        assert len(c.token_ids) == len(c.logprobs) >= 1
        assert not any(t in stops for t in c.token_ids[:-1])
        assert (c.token_ids[-1] in stops) == (c.finish_reason == "stop")
        assert c.finish_reason == "stop" or len(c.token_ids) == 30
        with torch.no_grad():
            logits = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1]
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
    # every token a stop token: one token each; greedy: the argmax
    greedy = engine.generate(prompts, SamplingParams(temperature=0, stop_token_ids=list(range(len(tok)))))
    for p, c in zip(prompts, greedy):
        with torch.no_grad():
            assert c.token_ids == [int(model(torch.tensor([p])).logits[0, -1].argmax())]
        assert c.finish_reason == "stop"


def test_bad_config(chat, tool):
    with pytest.raises(ValueError, match="max_turns"):
        rollout([], ScriptedEngine(chat, [], {}), chat, tool, RolloutParams(max_turns=0))
    with pytest.raises(ValueError, match="max_turn_tokens"):
        RolloutParams(max_turn_tokens=-1)
