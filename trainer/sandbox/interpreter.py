"""The ``code_interpreter`` tool: turn the model's code argument into a runnable snippet and run it."""

from __future__ import annotations

import ast
import re
import warnings

from sodkern.trainer.sandbox.fusion import SandboxFusionClient
from sodkern.trainer.sandbox.local import LocalSandbox
from sodkern.trainer.sandbox.result import ExecResult

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\r?\n(.*?)(?:\r?\n)?[ \t]*```", re.DOTALL | re.IGNORECASE)
_OPEN_FENCE = re.compile(r"^\s*```[ \t]*(?:python3?|py)?[ \t]*\r?\n", re.IGNORECASE)
_VALUE = "_"  # the REPL's name for the last value


def prepare_code(code: str) -> str:
    """Strip a Markdown code fence and print the value of a trailing bare expression, as a notebook would.

    All fenced blocks are joined when there are several; an unclosed opening fence (a truncated generation)
    is dropped. When the last top-level statement is an expression, it becomes
    ``_ = (<expression>)`` followed by ``if _ is not None: print(repr(_))``; the rest of the source is
    kept byte for byte, so line numbers in tracebacks stay those of the model's code. Code that does not
    parse, and code ending in a ``print(...)`` call, are returned (unfenced) unchanged.
    """
    blocks = _FENCE.findall(code)
    if blocks:
        code = "\n".join(blocks)
    else:
        code = _OPEN_FENCE.sub("", code, count=1)
        if code.rstrip().endswith("```"):
            code = code.rstrip()[:-3]
    code = code.replace("\r\n", "\n").replace("\r", "\n")
    try:
        with warnings.catch_warnings():  # e.g. "invalid decimal literal" for 1if: the run reports the problem
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    node = tree.body[-1]
    call = node.value
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print":
        return code  # prints by itself (and returns None): keep the source as written
    lines = code.split("\n")
    first, last = node.lineno - 1, node.end_lineno - 1
    # col offsets are UTF-8 byte offsets
    before = lines[first].encode()[: node.col_offset].decode()
    after = lines[last].encode()[node.end_col_offset :].decode()
    expression = ast.get_source_segment(code, node)
    head = "\n".join(lines[:first] + [before + f"{_VALUE} = ({expression})" + after])
    tail = "\n".join(lines[last + 1 :])
    show = f"if {_VALUE} is not None:\n    print(repr({_VALUE}))\n"
    return f"{head}\n{tail}\n{show}" if tail.strip() else f"{head}\n{show}"


class CodeInterpreter:
    """The ``code_interpreter`` tool: ``prepare_code`` and a sandbox backend (a LocalSandbox by default)."""

    name = "code_interpreter"

    def __init__(self, backend: LocalSandbox | SandboxFusionClient | None = None) -> None:
        self.backend = backend if backend is not None else LocalSandbox()

    def execute(self, code: str) -> ExecResult:
        """Run one tool call's code; every failure comes back as an ExecResult."""
        if not isinstance(code, str):
            return _bad_argument(code)
        return self.backend.run(prepare_code(code))

    def execute_many(self, codes: list[str]) -> list[ExecResult]:
        """Run many tool calls' code in parallel; results in order."""
        valid = [i for i, code in enumerate(codes) if isinstance(code, str)]
        ran = iter(self.backend.run_many([prepare_code(codes[i]) for i in valid]))
        valid_set = set(valid)
        return [next(ran) if i in valid_set else _bad_argument(code) for i, code in enumerate(codes)]

    def schema(self) -> dict:
        """OpenAI-style function schema of the tool (the one prompts render, so training and eval agree)."""
        from sodkern.trainer.tasks.prompts import CODE_INTERPRETER_TOOL

        return CODE_INTERPRETER_TOOL


def _bad_argument(code: object) -> ExecResult:
    message = f"Error: the 'code' argument must be a string, got {type(code).__name__}."
    return ExecResult("", message, None, 0.0, None)
