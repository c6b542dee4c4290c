"""sodkern's code interpreter as a TRL tool and its math reward as a TRL reward function."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from transformers.utils import get_json_schema  # noqa: E402

from sodkern.integrations.trl import code_interpreter_tool, math_reward_func  # noqa: E402


def test_tool_schema_is_what_trl_renders(sandbox):
    schema = get_json_schema(code_interpreter_tool(sandbox))["function"]
    assert schema["name"] == "code_interpreter"
    assert schema["parameters"]["properties"]["code"]["type"] == "string"
    assert schema["parameters"]["required"] == ["code"]
    assert "sandbox" in schema["description"]


def test_tool_runs_code_in_the_sandbox(sandbox):
    tool = code_interpreter_tool(sandbox)
    assert tool("```python\nimport math\nmath.factorial(5)\n```") == "120"
    assert "ZeroDivisionError" in tool("1 / 0")


def call(code):
    return {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": code}}}


def test_math_reward_on_trl_conversations():
    reward = math_reward_func()
    right = [{"role": "assistant", "content": "So \\boxed{4}."}]
    wrong_after_two_calls = [
        {"role": "assistant", "content": "", "tool_calls": [call("print(1)")]},
        {"role": "tool", "content": "1"},
        {"role": "assistant", "content": "", "tool_calls": [call("print(2)")]},
        {"role": "tool", "content": "\\boxed{4}"},  # tool output is not the answer
        {"role": "assistant", "content": "It is \\boxed{5}."},
    ]
    unparsed = [{"role": "assistant", "content": "<tool_call> garbage \\boxed{3}"}]
    scores = reward(prompts=[None] * 3, completions=[right, wrong_after_two_calls, unparsed], ground_truth=["4"] * 3)
    assert scores == pytest.approx([1.0, -0.8, -1.0])
    assert math_reward_func(tool_shaping=False)([None], [wrong_after_two_calls], ground_truth=["4"]) == [-1.0]


def test_math_reward_on_plain_text_and_custom_column():
    reward = math_reward_func(answer_column="answer")
    text = "<tool_call>\n{}\n</tool_call>\n<tool_response>\n7\n</tool_response>\nThus \\boxed{\\frac{1}{2}}"
    assert reward([None, None], ["\\boxed{0.5}", text], answer=["1/2", "0.5"]) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="no 'answer' column"):
        reward([None], ["x"], ground_truth=["1"])
