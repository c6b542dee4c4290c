"""Chat prompts for agentic tool-integrated reasoning (TIR) problems; the ``code_interpreter`` schema.

Rows that arrive in the verl layout keep their ``prompt`` messages as given; the raw benchmark shapes
(AIME, GPQA-Diamond, LiveCodeBench) get a prompt built here, in the style of the public agentic-TIR
recipes: the problem, an instruction to reason step by step, the hint that a ``code_interpreter`` Python
tool is available, and the answer format that :mod:`sodkern.trainer.tasks.rewards` reads back:

- math: the final answer in ``\\boxed{}``;
- science (multiple choice, options in the problem text): the option letter in ``\\boxed{}``;
- code: a final fenced ```` ```python ```` program that reads standard input and writes standard output
  (or, for call-based problems with starter code, a completion of the starter code).

The prompt is a single user message; the tool schema goes to
``tokenizer.apply_chat_template(..., tools=[CODE_INTERPRETER_TOOL])``, which renders it into the system
turn for Qwen3 / Hermes style templates.
"""

from __future__ import annotations

# OpenAI-style function schema of the one tool the agent can call (Qwen3 / Hermes tool calls).
CODE_INTERPRETER_TOOL: dict = {
    "type": "function",
    "function": {
        "name": "code_interpreter",
        "description": (
            "Run a Python 3 program in a sandbox and return what it prints (stdout, and stderr on an error). "
            "If the last statement is a bare expression, its value is printed."
        ),
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python code to run."}},
            "required": ["code"],
        },
    },
}

TOOL_HINT = (
    "You can call the `code_interpreter` tool to run Python code (for calculations, checking a guess, or "
    "testing an idea); its output is returned to you and you can then continue."
)

MATH_INSTRUCTION = "Solve the problem step by step. " + TOOL_HINT + " Put your final answer within \\boxed{}."

CHOICE_INSTRUCTION = (
    "Reason about the question step by step. "
    + TOOL_HINT
    + " Finish with the letter of the correct option within \\boxed{}, for example \\boxed{A}."
)

CODE_INSTRUCTION = (
    "Work out a solution step by step. "
    + TOOL_HINT
    + " Use it to try your code on the examples. When you are done, write the complete solution as one final "
    "```python code block. The program must read the input from standard input and print the answer to "
    "standard output."
)

CODE_STARTER_INSTRUCTION = (
    "Work out a solution step by step. "
    + TOOL_HINT
    + " Use it to try your code on the examples. When you are done, write the complete solution as one final "
    "```python code block that completes the starter code below (keep its class and function names; "
    "do not read input or print anything yourself).\n\n```python\n{starter_code}\n```"
)


def build_prompt(problem: str, ability: str, *, starter_code: str | None = None) -> list[dict]:
    """The chat prompt for one raw benchmark problem.

    Args:
        problem: the problem statement (for multiple choice, including the lettered options).
        ability: ``"math"``, ``"science"`` (multiple choice, answered with a letter) or ``"code"``.
        starter_code: for call-based code problems (LeetCode style), the starter code to complete.

    Returns:
        ``[{"role": "user", "content": ...}]``, ready for ``apply_chat_template``.
    """
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"problem: expected a non-empty string, got {problem!r:.80}")
    if ability == "math":
        instruction = MATH_INSTRUCTION
    elif ability == "science":
        instruction = CHOICE_INSTRUCTION
    elif ability == "code":
        if starter_code and starter_code.strip():
            instruction = CODE_STARTER_INSTRUCTION.format(starter_code=starter_code.strip("\n"))
        else:
            instruction = CODE_INSTRUCTION
    else:
        raise ValueError(f"ability: expected 'math', 'science' or 'code', got {ability!r}")
    return [{"role": "user", "content": problem.strip() + "\n\n" + instruction}]
