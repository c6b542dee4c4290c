"""Chat and tool-call format of a rollout: prompts, tool-call parsing and tool observations as token ids.

Qwen3 / Hermes tool calls: an assistant turn ends with
``<tool_call>{"name": "code_interpreter", "arguments": {"code": "..."}}</tool_call>`` and the result comes
back as a ``tool`` message, rendered by the model's own chat template. For a template without tool support
(a template that renders neither the tool schema nor ``tool`` messages), a turn that ends with a fenced
```` ```python ```` block is the tool call, and the result comes back as a user message with an
```` ```output ```` block.

The observation ids appended after a tool call are exactly what the chat template renders after the
assistant turn: the text between the end of an assistant message's content and the next generation prompt
(the turn end, the tool message, the generation prompt), found by rendering the conversation with a
sentinel as the assistant content. The model's own tokens are never re-tokenised.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from sodkern.trainer.tasks.prompts import CODE_INTERPRETER_TOOL

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# The content of an assistant message, to find where the template puts it (a string no text contains).
_SENTINEL = "\x00sodkern-assistant-content\x00"
_FENCE_OPEN = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n", re.I)


@dataclass(frozen=True)
class ToolCall:
    """One tool call read from an assistant turn.

    Attributes:
        code: the code to run, or None when the call is malformed.
        error: for a malformed call, the observation that tells the model what was wrong; else None.
    """

    code: str | None
    error: str | None = None


def _error(message: str, tool_name: str) -> ToolCall:
    usage = f'<tool_call>{{"name": "{tool_name}", "arguments": {{"code": "..."}}}}</tool_call>'
    return ToolCall(None, f"Error: {message}. Call the tool as {usage}.")


def parse_tool_call(text: str, *, tool_name: str = "code_interpreter", fenced: bool = False) -> ToolCall | None:
    """The tool call that ends an assistant turn, if any. Never raises on malformed calls.

    Args:
        text: the decoded assistant turn, without its end-of-turn token.
        tool_name: the one tool the model may call.
        fenced: also take a turn that ends with a fenced ```` ```python ```` block as a call (for chat
            templates without tool support).

    Returns:
        None if the turn does not end with a tool call (a final answer); else a :class:`ToolCall` with the
        code, or with an ``error`` observation for invalid JSON, an unknown tool or missing arguments.
    """
    stripped = text.rstrip()
    if stripped.endswith(TOOL_CALL_END):
        body_end = len(stripped) - len(TOOL_CALL_END)
        start = stripped.rfind(TOOL_CALL_START, 0, body_end)
        if start < 0:
            return _error(f"found {TOOL_CALL_END} without a matching {TOOL_CALL_START}", tool_name)
        body = stripped[start + len(TOOL_CALL_START) : body_end].strip()
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            return _error(f"the tool call is not valid JSON ({e})", tool_name)
        if not isinstance(call, dict):
            return _error(f"the tool call must be a JSON object, got {type(call).__name__}", tool_name)
        if call.get("name") != tool_name:
            return _error(f"unknown tool {call.get('name')!r}; the only tool is {tool_name!r}", tool_name)
        args = call.get("arguments", call.get("parameters"))
        if isinstance(args, str):  # arguments sent as a JSON string, as in the OpenAI wire format
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                return _error(f"the arguments string is not valid JSON ({e})", tool_name)
        if not isinstance(args, dict) or not isinstance(args.get("code"), str):
            return _error("missing argument 'code' (a string of Python code)", tool_name)
        if not args["code"].strip():
            return _error("argument 'code' is empty", tool_name)
        return ToolCall(args["code"])
    if fenced and stripped.endswith("```"):
        opening = None
        for opening in _FENCE_OPEN.finditer(stripped):  # noqa: B007 - the last opening fence is the one
            pass
        code = stripped[opening.end() : -3] if opening is not None else None
        if code is not None and "```" not in code:
            return ToolCall(code) if code.strip() else ToolCall(None, "Error: the ```python block is empty.")
    return None


class ChatFormat:
    """How one tokenizer's chat template frames the prompt, the tool calls and the tool observations.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        tool_schema: the OpenAI-style schema of the tool (``tools=[tool_schema]``).
        template_kwargs: extra chat-template variables, e.g. ``{"enable_thinking": False}`` for Qwen3.

    Attributes:
        supports_tools: whether the template renders the tool schema and ``tool`` messages; if not, the
            fenced ```` ```python ```` fallback is used.
        tools: ``[tool_schema]`` when the template supports tools, else None (what ``tools=`` gets).
        stop_token_ids: the ids that end an assistant turn: the end-of-turn token of the template, the
            tokenizer's eos, and ``</tool_call>`` when it is one token.
        eos_token_ids: ``stop_token_ids`` without ``</tool_call>``: the ids that close a turn by themselves.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        tool_schema: dict = CODE_INTERPRETER_TOOL,
        *,
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                "rollouts need a chat model's tokenizer (tokenizer_config.json 'chat_template')"
            )
        self.tokenizer = tokenizer
        self.tool_schema = tool_schema
        self.tool_name: str = tool_schema["function"]["name"]
        self.template_kwargs = dict(template_kwargs or {})
        self.supports_tools = self._detect_tool_support()
        self.tools: list[dict] | None = [tool_schema] if self.supports_tools else None

        stop = []
        turn_end = self._render([{"role": "user", "content": "x"}, _assistant(_SENTINEL)], False, self.tools)
        turn_end_ids = self.encode(turn_end.split(_SENTINEL, 1)[1])
        if turn_end_ids and turn_end_ids[0] in self._added_ids():
            stop.append(turn_end_ids[0])
        if tokenizer.eos_token_id is not None:
            stop.append(tokenizer.eos_token_id)
        tool_end = self.encode(TOOL_CALL_END)
        if self.supports_tools and len(tool_end) == 1:
            stop.append(tool_end[0])
        self.stop_token_ids: list[int] = list(dict.fromkeys(stop))
        self.eos_token_ids = [i for i in self.stop_token_ids if tool_end != [i]]

    # ---------------------------------------------------------------------------------------- rendering

    def _added_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )

    def _detect_tool_support(self) -> bool:
        probe = "\x00sodkern-tool-output\x00"
        try:
            tools = [self.tool_schema]
            with_tools = self._render([{"role": "user", "content": "x"}], False, tools)
            chat = [{"role": "user", "content": "x"}, _assistant("y"), {"role": "tool", "content": probe}]
            with_tool_message = self._render(chat, True, tools)
        except Exception:  # templates raise (raise_exception) on roles they do not know
            return False
        return self.tool_name in with_tools and probe in with_tool_message

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens kept."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt: ``messages`` rendered with the tool schema and the generation prompt, as ids."""
        return self.encode(self._render(messages, True, self.tools))

    # ---------------------------------------------------------------------------------------- tool calls

    def parse(self, turn_ids: list[int]) -> ToolCall | None:
        """The tool call that ends the assistant turn ``turn_ids`` (see :func:`parse_tool_call`)."""
        if turn_ids and turn_ids[-1] in self.eos_token_ids:
            turn_ids = turn_ids[:-1]
        return parse_tool_call(self.decode(turn_ids), tool_name=self.tool_name, fenced=not self.supports_tools)

    def observation_message(self, observation: str) -> dict:
        """The message that carries a tool result back to the model."""
        if self.supports_tools:
            return {"role": "tool", "content": observation}
        return {"role": "user", "content": f"```output\n{observation}\n```"}

    def observation_ids(self, messages: list[dict], observation: str, turn_ids: list[int]) -> list[int]:
        """Ids to append after an assistant turn that ended in a tool call, up to the next generation prompt.

        Exactly what the template renders between the assistant content and the next
        ``add_generation_prompt``: the turn end (unless the model generated it itself), the tool message with
        ``observation``, the generation prompt.

        Args:
            messages: the prompt messages of the conversation.
            observation: the tool output (or the error message of a malformed call).
            turn_ids: the assistant turn as generated (its last id tells whether it ended the turn itself).
        """
        chat = [*messages, _assistant(_SENTINEL), self.observation_message(observation)]
        text = self._render(chat, True, self.tools)
        ids = self.encode(text[text.index(_SENTINEL) + len(_SENTINEL) :])
        if turn_ids and ids and turn_ids[-1] == ids[0] and ids[0] in self.eos_token_ids:
            ids = ids[1:]
        return ids


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}
