"""The demo's synthetic task: splits, scripted trajectories run through the real sandbox and the math reward,
and the demo tokenizer / chat template the rollout loop relies on."""

from __future__ import annotations

import pytest

from sodkern.trainer.demo import task as demo_task
from sodkern.trainer.demo.tiny import tiny_tokenizer
from sodkern.trainer.rollout.chat import ChatFormat
from sodkern.trainer.sandbox import CodeInterpreter, LocalSandbox
from sodkern.trainer.tasks.prompts import CODE_INTERPRETER_TOOL
from sodkern.trainer.tasks.rewards import math_reward


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(
        512, corpus=demo_task.corpus(), split_digits=True, merge_across_words=True,
        chat_template=demo_task.CHAT_TEMPLATE,
    )  # fmt: skip


def test_splits_are_fixed_and_the_test_split_is_held_out():
    a, b = demo_task.make_problems(50, "train"), demo_task.make_problems(50, "train")
    assert [p.extra_info for p in a] == [p.extra_info for p in b]
    assert len({p.uid for p in a}) == 50
    seen = {p.extra_info["question"] for s in ("train", "sft") for p in demo_task.make_problems(2000, s)}
    test = demo_task.make_problems(96, "test")
    assert len({p.extra_info["question"] for p in test}) == 96  # distinct held-out problems
    assert not seen & {p.extra_info["question"] for p in test}
    assert {p.extra_info["times"] for p in test} == {2, 3, 4}  # 2 to 4 tool steps per problem
    with pytest.raises(ValueError, match="n=97"):
        demo_task.make_problems(97, "test")


def test_every_problem_applies_the_one_map_and_every_call_is_the_same_code_but_its_number():
    problems = demo_task.make_problems(64, "test")
    assert {p.extra_info["question"].split(" and ")[1].split(" mod ")[0] for p in problems} == {"apply x*2-63"}
    codes = [code for p in problems for code, _ in demo_task.solution_steps(p)]
    assert {code.split(";", 1)[1] for code in codes} == {"assert x%7==0;print((x*2-63)%1001)"}
    # step 1 carries the start value from the question, later steps the previous output: both 3-digit numbers
    assert all(100 <= p.extra_info["start"] < 1000 for p in problems)


def test_scripted_trajectories_run_in_the_sandbox_and_score_correct():
    problems = demo_task.make_problems(6, "test")
    interpreter = CodeInterpreter(LocalSandbox(timeout=10))
    for problem in problems:
        ex = demo_task.scripted_trajectory(problem)
        calls = [m["tool_calls"][0]["function"]["arguments"]["code"] for m in ex.messages if m.get("tool_calls")]
        outputs = [m["content"] for m in ex.messages if m["role"] == "tool"]
        assert len(calls) == problem.extra_info["times"]
        for code, expected, result in zip(calls, outputs, interpreter.execute_many(calls)):
            assert result.ok and result.stdout.strip() == expected, (code, result)
        final = ex.messages[-1]["content"]
        assert outputs[-1] == problem.ground_truth and math_reward(problem, final).correct
        wrong = final.replace(problem.ground_truth, str(int(problem.ground_truth) + 1))
        assert not math_reward(problem, wrong).correct


def test_every_value_is_a_checked_multiple_of_7_and_a_miscopy_fails_the_check():
    problems = demo_task.make_problems(40, "test")
    for problem in problems:
        info = problem.extra_info
        assert info["tool_results"] == [out for _, out in demo_task.solution_steps(problem)]
        assert all(int(v) % demo_task.CHECK == 0 and 0 <= int(v) < demo_task.MOD for v in info["tool_results"])
    # a mis-copied digit in a carried value: the call's own check fails, the tool answers with an error message
    code, _ = demo_task.solution_steps(problems[0])[1]
    value = code.split(";")[0].removeprefix("x=")
    wrong = code.replace(f"x={value};", f"x={int(value) + 1};", 1)
    result = CodeInterpreter(LocalSandbox(timeout=10)).execute_many([wrong])[0]
    assert not result.ok and "AssertionError" in result.observation()


def test_demo_tokenizer_spells_numbers_and_round_trips(tok, tmp_path):
    ids = tok.encode("print(2641*4-13)", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert all(len(p) == 1 for p in pieces if p.isdigit() or any(ch.isdigit() for ch in p))
    ex = demo_task.scripted_trajectory(demo_task.make_problems(1, "test")[0])
    text = tok.apply_chat_template(ex.messages, tools=ex.tools, tokenize=False)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    tok.save_pretrained(tmp_path)  # the saved tokenizer (what the models load) keeps the template
    assert "<tool_response>" in (tmp_path / "tokenizer_config.json").read_text() + (
        (tmp_path / "chat_template.jinja").read_text() if (tmp_path / "chat_template.jinja").exists() else ""
    )


def test_rollout_framing_matches_the_rendered_sft_conversation(tok):
    """What the rollout loop builds (prompt, generated turns, observation ids) is token for token what the SFT
    data renders, so the models are trained and sampled on the same sequences."""
    problem = demo_task.make_problems(1, "test")[0]
    ex = demo_task.scripted_trajectory(problem)
    chat = ChatFormat(tok)
    assert chat.supports_tools and chat.tools == [CODE_INTERPRETER_TOOL]
    messages = list(problem.messages)
    ids = chat.prompt_ids(messages)
    for msg in ex.messages[len(messages) :]:
        if msg["role"] == "tool":
            continue
        before = tok.apply_chat_template(messages, tools=ex.tools, tokenize=False, add_generation_prompt=True)
        turn_text = tok.apply_chat_template([*messages, msg], tools=ex.tools, tokenize=False)[len(before) :]
        turn = chat.encode(turn_text.rstrip("\n"))  # what the model generates: up to and with <|im_end|>
        ids += turn
        messages.append(msg)
        call = chat.parse(turn)
        if msg.get("tool_calls"):
            assert call is not None and call.code == msg["tool_calls"][0]["function"]["arguments"]["code"]
            out = ex.messages[len(messages)]["content"]
            ids += chat.observation_ids(problem.messages, out, turn)
            messages.append({"role": "tool", "content": out})
        else:
            assert call is None
    full = tok.apply_chat_template(ex.messages, tools=ex.tools, tokenize=False)
    assert ids == chat.encode(full.rstrip("\n"))
