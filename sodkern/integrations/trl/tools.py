"""sodkern's sandboxed code interpreter as a TRL tool, and its math reward as a TRL reward function.

``GRPOTrainer(tools=[...])`` reads a tool's name, signature and docstring (``transformers.utils.get_json_schema``)
and calls it with the arguments the model wrote; a TRL reward function is called as
``fn(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` and returns one float per completion.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("sodkern.integrations.trl")


def code_interpreter_tool(sandbox: Any = None) -> Callable[[str], str]:
    """The ``code_interpreter`` tool (Qwen3 / Hermes calls) as a typed callable for ``GRPOTrainer(tools=[...])``.

    Args:
        sandbox: a ``sodkern.trainer.sandbox.LocalSandbox`` or ``SandboxFusionClient`` (default: a
            ``LocalSandbox()`` made on the first call).

    Returns:
        ``code_interpreter(code: str) -> str``: runs the code in the sandbox (a Markdown fence is stripped and
        a trailing bare expression is printed) and returns its stdout, stderr and limit messages.
    """
    from sodkern.trainer.sandbox import CodeInterpreter

    interpreter: list[CodeInterpreter] = []

    def code_interpreter(code: str) -> str:
        """Run a Python 3 program in a sandbox and return what it prints (stdout, and stderr on an error).

        If the last statement is a bare expression, its value is printed.

        Args:
            code: The Python code to run.
        """
        if not interpreter:
            interpreter.append(CodeInterpreter(sandbox))
        return interpreter[0].execute(code).observation()

    return code_interpreter


def _completion_text(completion: Any) -> tuple[str, int]:
    """The response as text with ``<tool_call>`` / ``<tool_response>`` blocks, and its number of tool calls.

    ``completion`` is a string (standard format) or the list of messages TRL builds for a conversational
    prompt: assistant messages (``content``, ``tool_calls``) and ``tool`` messages. Only tool calls TRL parsed
    (and so ran) count; ``<tool_call>`` text it could not parse does not.
    """
    if isinstance(completion, str):
        return completion, completion.count("<tool_call>")
    parts, calls = [], 0
    for message in completion:
        role, content = message.get("role"), message.get("content") or ""
        if isinstance(content, list):  # multimodal content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if role == "tool":
            parts.append(f"<tool_response>\n{content}\n</tool_response>")
            continue
        parts.append(content)
        for call in message.get("tool_calls") or []:
            fn = call.get("function", call)
            args = fn.get("arguments")
            args = args if isinstance(args, str) else json.dumps(args)
            parts.append(f'<tool_call>\n{{"name": {json.dumps(fn.get("name"))}, "arguments": {args}}}\n</tool_call>')
            calls += 1
    return "\n".join(parts), calls


def math_reward_func(*, tool_shaping: bool = True, answer_column: str = "ground_truth") -> Callable[..., list[float]]:
    """sodkern's math reward (the recipe, README) as a TRL reward function.

    +1 when the last ``\\boxed{}`` of the assistant text (tool calls and tool outputs left out) equals the
    ground truth under ``math-verify``, else -1; a wrong answer is shaped to
    ``min(-0.6, -1 + 0.1 * tool_calls)`` (the authors' ``(num_turns - 2) / 2 * 0.1`` bonus).

    Args:
        tool_shaping: apply the tool-call shaping to wrong answers.
        answer_column: the dataset column holding the ground truth (a string, or a list of accepted strings).

    Returns:
        ``math_reward(prompts, completions, **kwargs) -> list[float]``.
    """
    from sodkern.trainer.tasks.data import Problem
    from sodkern.trainer.tasks.rewards import compute_reward, math_reward

    def math_reward_fn(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        if answer_column not in kwargs:
            raise ValueError(
                f"math reward: the dataset has no {answer_column!r} column (columns: {sorted(kwargs)}); "
                f"add it or pass math_reward_func(answer_column=...)"
            )
        scores = []
        for completion, truth in zip(completions, kwargs[answer_column]):
            text, calls = _completion_text(completion)
            problem = Problem(uid="", data_source="math", ability="math", messages=[], ground_truth=truth)
            result = compute_reward(
                problem,
                text,
                num_turns=2 + 2 * calls,
                response_tokens=0,
                max_response_tokens=1,
                tool_shaping=tool_shaping,
                reward_fn=math_reward,
            )
            scores.append(result.score)
        return scores

    math_reward_fn.__name__ = "math_reward"
    return math_reward_fn
