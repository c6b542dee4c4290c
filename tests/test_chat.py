"""Tool-call parsing and the chat format: prompt ids, stop ids, observation ids that match a re-render."""

import pytest

from sodkern.trainer.demo.tiny import tiny_tokenizer
from sodkern.trainer.rollout.chat import ChatFormat, ToolCall, parse_tool_call
from sodkern.trainer.tasks.prompts import CODE_INTERPRETER_TOOL

CALL = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(2 + 2)"}}\n</tool_call>'
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
# a template that knows neither tools nor the tool role
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_parse_valid_calls():
    assert parse_tool_call("Let me compute.\n" + CALL) == ToolCall("print(2 + 2)")
    assert parse_tool_call(CALL + "\n  ") == ToolCall("print(2 + 2)")  # trailing whitespace
    # arguments as a JSON string, and "parameters" instead of "arguments"
    s = '<tool_call>{"name": "code_interpreter", "arguments": "{\\"code\\": \\"x = 1\\"}"}</tool_call>'
    assert parse_tool_call(s) == ToolCall("x = 1")
    s = '<tool_call>{"name": "code_interpreter", "parameters": {"code": "y"}}</tool_call>'
    assert parse_tool_call(s) == ToolCall("y")
    # the last of two calls ends the turn
    assert parse_tool_call(CALL.replace("2 + 2", "1") + "\n" + CALL).code == "print(2 + 2)"


def test_parse_no_call():
    assert parse_tool_call("The answer is \\boxed{4}.") is None
    assert parse_tool_call(CALL + "\nSo the answer is 4.") is None  # a call not at the end of the turn
    assert parse_tool_call("```python\nprint(1)\n```") is None  # fences only in fenced mode


@pytest.mark.parametrize(
    "text, message",
    [
        ("<tool_call>{'name': 'code_interpreter'}</tool_call>", "not valid JSON"),
        ('<tool_call>{"name": "code_interpreter", "arguments": {"code": "1"}</tool_call>', "not valid JSON"),
        ('<tool_call>["code_interpreter"]</tool_call>', "must be a JSON object, got list"),
        ('<tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>', "unknown tool 'python'"),
        ('<tool_call>{"arguments": {"code": "1"}}</tool_call>', "unknown tool None"),
        ('<tool_call>{"name": "code_interpreter"}</tool_call>', "missing argument 'code'"),
        ('<tool_call>{"name": "code_interpreter", "arguments": {"cmd": "1"}}</tool_call>', "missing argument"),
        ('<tool_call>{"name": "code_interpreter", "arguments": {"code": 3}}</tool_call>', "missing argument"),
        ('<tool_call>{"name": "code_interpreter", "arguments": "{bad"}</tool_call>', "arguments string"),
        ('<tool_call>{"name": "code_interpreter", "arguments": {"code": " "}}</tool_call>', "is empty"),
        ("text </tool_call>", "without a matching <tool_call>"),
    ],
)
def test_parse_malformed_calls_give_an_error_observation(text, message):
    call = parse_tool_call(text)
    assert call.code is None and message in call.error
    assert call.error.startswith("Error: ") and '"name": "code_interpreter"' in call.error


def test_parse_fenced_fallback():
    turn = "Check:\n```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n"
    assert parse_tool_call(turn, fenced=True) == ToolCall("print(2)\n")
    assert parse_tool_call("```python\nprint(1)\n```\nDone.", fenced=True) is None
    assert parse_tool_call("```text\nhello\n```", fenced=True) is None
    assert parse_tool_call("```python\n\n```", fenced=True).error is not None


def test_chat_format_tokens(tok):
    chat = ChatFormat(tok)
    assert chat.supports_tools and chat.tools == [CODE_INTERPRETER_TOOL]
    assert tok.convert_ids_to_tokens(chat.stop_token_ids) == ["<|im_end|>", "</tool_call>"]
    prompt = chat.prompt_ids(MESSAGES)
    assert chat.decode(prompt) == tok.apply_chat_template(
        MESSAGES, tools=[CODE_INTERPRETER_TOOL], tokenize=False, add_generation_prompt=True
    )
    assert chat.parse(chat.encode("Let me compute.\n" + CALL)) == ToolCall("print(2 + 2)")
    assert chat.parse(chat.encode("\\boxed{4}<|im_end|>")) is None


@pytest.mark.parametrize("ends_turn", [False, True], ids=["stopped-at-tool-call", "model-wrote-im_end"])
def test_observation_ids_match_a_re_render(tok, ends_turn):
    """prompt + generated turn + observation == the template's rendering of the whole conversation."""
    chat = ChatFormat(tok)
    turn_text = "Let me compute.\n" + CALL
    turn = chat.encode(turn_text + ("<|im_end|>" if ends_turn else ""))
    obs = chat.observation_ids(MESSAGES, "4", turn)
    assert chat.decode(obs).startswith("\n" if ends_turn else "<|im_end|>\n")
    conversation = [*MESSAGES, {"role": "assistant", "content": turn_text}, {"role": "tool", "content": "4"}]
    rendered = tok.apply_chat_template(
        conversation, tools=[CODE_INTERPRETER_TOOL], tokenize=False, add_generation_prompt=True
    )
    assert chat.prompt_ids(MESSAGES) + turn + obs == chat.encode(rendered)
    assert chat.decode(obs).endswith("<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_template_without_tool_support(tok):
    plain = tiny_tokenizer()
    plain.chat_template = PLAIN_TEMPLATE
    chat = ChatFormat(plain)
    assert not chat.supports_tools and chat.tools is None
    assert chat.stop_token_ids == [plain.convert_tokens_to_ids("<|im_end|>")]  # no </tool_call> stop
    turn = chat.encode("Try it:\n```python\nprint(3)\n```<|im_end|>")
    assert chat.parse(turn) == ToolCall("print(3)\n")
    assert chat.parse(chat.encode(CALL)).code == "print(2 + 2)"  # a Hermes call still counts
    obs = chat.observation_ids(MESSAGES, "3", turn)
    assert chat.decode(obs) == "\n<|im_start|>user\n```output\n3\n```<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_without_chat_template_is_an_error(tok):
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        ChatFormat(bare)
