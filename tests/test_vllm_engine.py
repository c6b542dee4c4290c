"""The colocated vLLM engine on CPU with a tiny Qwen3: log-probs against the HF model, stop / length rules,
prefix-cache continuations, in-place weight updates, and multi-turn rollouts with real tool calls (both the
turn-synchronous loop and the continuous-batching one). One engine for the whole module."""

import logging
import time

import pytest
import torch

vllm = pytest.importorskip("vllm")

from sodkern.trainer.demo.tiny import save_tiny, tiny_qwen3, tiny_tokenizer  # noqa: E402
from sodkern.trainer.rollout.chat import ChatFormat  # noqa: E402
from sodkern.trainer.rollout.loop import RolloutParams, SamplingParams, mask_spans, rollout  # noqa: E402
from sodkern.trainer.rollout.vllm_async import rollout_async  # noqa: E402
from sodkern.trainer.rollout.vllm_engine import VLLMEngine  # noqa: E402
from sodkern.trainer.sandbox import CodeInterpreter  # noqa: E402
from sodkern.trainer.tasks.data import Problem  # noqa: E402

# A short tool schema keeps the rendered prompt short (and the teaching below quick).
TOOL = {"type": "function", "function": {"name": "code_interpreter", "parameters": {}}}
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]
CALL = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(2 + 2)"}}\n</tool_call>'
ANSWER = "The answer is \\boxed{4}.<|im_end|>"
GREETING = [{"role": "user", "content": "Say hello."}]
REPLY = "No tool is needed for this one. Hello, hello! The answer is \\boxed{hello}.<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat(tok):
    return ChatFormat(tok, TOOL)


@pytest.fixture(scope="module")
def base(tok):
    """The random tiny Qwen3 the engine starts from (``save_tiny``'s seed 0)."""
    return tiny_qwen3(tok, seed=0)


@pytest.fixture(scope="module")
def script(chat):
    """The conversation the tool caller is taught: prompt, tool call, observation, answer (token ids)."""
    turn = chat.encode(CALL)
    return chat.prompt_ids(QUESTION), turn, chat.observation_ids(QUESTION, "4", turn), chat.encode(ANSWER)


@pytest.fixture(scope="module")
def tool_caller(tok, chat, script):
    """The tiny Qwen3 taught two conversations until it follows them greedily: :func:`script` (call the tool,
    then answer) and a longer direct reply to :data:`GREETING` (no tool)."""
    prompt, turn, obs, answer = script
    greeting, reply = chat.prompt_ids(GREETING), chat.encode(REPLY)
    examples = [
        (prompt + turn + obs + answer, [0] * len(prompt) + [1] * len(turn) + [0] * len(obs) + [1] * len(answer)),
        (greeting + reply, [0] * len(greeting) + [1] * len(reply)),
    ]
    model = tiny_qwen3(tok, seed=0).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        losses = []
        for ids, mask in examples:
            ids, mask = torch.tensor([ids]), torch.tensor(mask[1:], dtype=torch.bool)
            losses.append(torch.nn.functional.cross_entropy(model(ids).logits[0, :-1][mask], ids[0, 1:][mask]))
        if max(loss.item() for loss in losses) < 0.02:
            break
        optimizer.zero_grad()
        sum(losses).backward()
        optimizer.step()
    assert max(loss.item() for loss in losses) < 0.02, f"the scripts were not learned (losses {losses})"
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tool_caller):  # taught first: on CPU the engine cuts torch to one thread
    path = save_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        engine = VLLMEngine(path, dtype="float32", max_model_len=1024, max_num_seqs=8, enforce_eager=True)
    yield engine
    engine.close()


def hf_logprobs(model, prompt, ids, temperature=1.0):
    """``log_softmax(logits / T)`` of ``ids`` after ``prompt`` under the HF model (teacher forcing)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None])[:, 0]


def test_generate_matches_the_hf_model(engine, base, tok):
    engine.update_weights(base.named_parameters())
    prompts = [tok.encode("a b c"), tok.encode("print(1)\nfor n in range(10):"), tok.encode("x")]
    stops = list(range(0, len(tok), 16))
    out = engine.generate(prompts, SamplingParams(temperature=0.7, max_tokens=30, stop_token_ids=stops))
    assert {c.finish_reason for c in out} <= {"stop", "length"}
    for p, c in zip(prompts, out):
        assert len(c.token_ids) == len(c.logprobs) >= 1
        assert not any(t in stops for t in c.token_ids[:-1])
        assert (c.token_ids[-1] in stops) == (c.finish_reason == "stop")
        assert c.finish_reason == "stop" or len(c.token_ids) == 30
        torch.testing.assert_close(torch.tensor(c.logprobs), hf_logprobs(base, p, c.token_ids, 0.7), atol=1e-4, rtol=0)
    # greedy: the argmax, log-probs at temperature 1
    [g] = engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=5))
    with torch.no_grad():
        assert g.token_ids[0] == int(base(torch.tensor([prompts[0]])).logits[0, -1].argmax())
    torch.testing.assert_close(torch.tensor(g.logprobs), hf_logprobs(base, prompts[0], g.token_ids), atol=1e-4, rtol=0)
    # max_model_len (1024): a full prompt gets nothing, a nearly full one stops at the limit
    full, near = engine.generate([[5] * 1024, [5] * 1020], SamplingParams(max_tokens=50))
    assert (full.token_ids, full.finish_reason) == ([], "length")
    assert len(near.token_ids) == 4 and near.finish_reason == "length"


def test_continuation_after_an_observation_hits_the_prefix_cache(engine, base, chat, script):
    engine.update_weights(base.named_parameters())
    prompt, turn, obs, _ = script
    engine.generate([prompt + turn], SamplingParams(max_tokens=4))
    cached = engine.cached_tokens
    context = prompt + turn + obs  # the history, as ids, plus the observation: no re-encoding
    [c] = engine.generate([context], SamplingParams(max_tokens=8, stop_token_ids=chat.stop_token_ids))
    assert len(prompt + turn) > 128 and engine.cached_tokens - cached >= 128  # whole KV blocks reused
    torch.testing.assert_close(torch.tensor(c.logprobs), hf_logprobs(base, context, c.token_ids), atol=1e-4, rtol=0)


def test_weight_update_changes_the_next_rollout(engine, base, tool_caller, script):
    prompt, turn, _, _ = script
    engine.update_weights(base.named_parameters())
    greedy = SamplingParams(temperature=0, max_tokens=len(turn))
    [before] = engine.generate([prompt], greedy)
    cached = engine.cached_tokens
    assert engine.update_weights(tool_caller.named_parameters(), bucket_bytes=1 << 14) == len(
        list(tool_caller.parameters())
    )
    [after] = engine.generate([prompt], greedy)
    assert engine.cached_tokens == cached  # the prompt's KV from the old weights was dropped
    assert after.token_ids == turn != before.token_ids  # the taught tool call
    torch.testing.assert_close(torch.tensor(after.logprobs), hf_logprobs(tool_caller, prompt, turn), atol=1e-4, rtol=0)
    # a bad name fails, naming it; the engine stays whole and takes the next full update
    with pytest.raises(ValueError, match="no_such_weight"):
        engine.update_weights([("model.no_such_weight", torch.zeros(3))])
    engine.update_weights(base.named_parameters())
    [again] = engine.generate([prompt], greedy)
    assert again.token_ids == before.token_ids
    torch.testing.assert_close(torch.tensor(again.logprobs), torch.tensor(before.logprobs), atol=1e-5, rtol=0)


def test_sleep_and_wake_up_are_logged_no_ops_on_cpu(engine, caplog):
    assert not engine.sleep_supported
    with caplog.at_level(logging.INFO, logger="sodkern.trainer.rollout.vllm_engine"):
        engine.sleep()
        engine.wake_up()
    assert "sleep mode is off or unsupported" in caplog.text
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3))[0].token_ids) == 3


def check_trajectory(t, max_response_tokens):
    n = len(t.response_ids)
    assert len(t.response_mask) == len(t.logprobs) == n <= max_response_tokens
    assert t.spans == mask_spans(t.response_mask) and len(t.spans) == t.num_turns
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.response_mask) if m == 0)


def test_multi_turn_rollouts_with_tool_calls(engine, tool_caller, chat, script):
    engine.update_weights(tool_caller.named_parameters())
    _, turn, obs, answer = script
    tool = CodeInterpreter()
    problems = [Problem("p", "test_math", "math", QUESTION, "4")]
    greedy = RolloutParams(n=2, max_turns=4, max_response_tokens=300, temperature=0, progress=False)
    sync = rollout(problems, engine, chat, tool, greedy)
    overlapped = rollout_async(problems, engine, chat, tool, greedy)
    for t in sync + overlapped:
        check_trajectory(t, 300)
        assert (t.finish_reason, t.num_turns, t.num_tool_calls) == ("eos", 2, 1)
        assert t.response_ids == turn + obs + answer  # the observation is the sandbox's real output, "4"
        assert t.response_mask == [1] * len(turn) + [0] * len(obs) + [1] * len(answer)
        assert "<tool_response>\n4\n</tool_response>" in t.text
    for a, b in zip(sync, overlapped):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)

    # sampled, several trajectories in flight: the log-probs over the mask are the HF model's
    torch.manual_seed(0)
    config = RolloutParams(n=3, max_turns=3, max_response_tokens=120, temperature=0.9, progress=False)
    out = rollout_async(
        [*problems, Problem("q", "test_math", "math", [{"role": "user", "content": "What is 3 + 5?"}], "8")],
        engine,
        chat,
        tool,
        config,
    )
    assert [(t.uid, t.sample_index) for t in out] == [(u, i) for u in "pq" for i in range(3)]
    assert any(t.num_tool_calls >= 1 for t in out)
    for t in out:
        check_trajectory(t, 120)
        ref = hf_logprobs(tool_caller, t.prompt_ids, t.response_ids, 0.9)
        mask = torch.tensor(t.response_mask, dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(t.logprobs)[mask], ref[mask], atol=1e-4, rtol=0)
    assert not engine.llm.llm_engine.has_unfinished_requests()


class SlowTool:
    """The code interpreter, two seconds slower per call; records when each call ran."""

    def __init__(self) -> None:
        self.tool, self.windows = CodeInterpreter(), []

    def execute(self, code):
        start = time.monotonic()
        time.sleep(2.0)
        result = self.tool.execute(code)
        self.windows.append((start, time.monotonic()))
        return result

    def execute_many(self, codes):
        return [self.execute(code) for code in codes]


def test_generation_goes_on_while_tools_run(engine, tool_caller, chat, monkeypatch):
    engine.update_weights(tool_caller.named_parameters())
    core = engine.llm.llm_engine
    steps, step = [], core.step
    monkeypatch.setattr(core, "step", lambda: steps.append(time.monotonic()) or step())
    problems = [
        Problem("tool", "test_math", "math", QUESTION, "4"),
        Problem("hi", "test_math", "math", GREETING, "hello"),
    ]
    config = RolloutParams(n=1, max_turns=3, max_response_tokens=200, temperature=0, progress=False)
    reply = chat.encode(REPLY)
    for loop, overlapping in ((rollout, 0), (rollout_async, 5)):
        tool = SlowTool()
        steps.clear()
        with_tool, direct = loop(problems, engine, chat, tool, config)
        assert (with_tool.num_tool_calls, direct.num_tool_calls, direct.response_ids) == (1, 0, reply)
        [(start, end)] = tool.windows
        during = sum(start < t < end for t in steps)
        # the turn-synchronous loop waits for the tool; the other keeps decoding the direct reply meanwhile
        assert during == 0 if overlapping == 0 else during >= overlapping, (loop.__name__, during)
