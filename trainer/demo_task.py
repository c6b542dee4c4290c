"""The demo's synthetic tool-integrated reasoning task: chained arithmetic that needs the code interpreter.

A problem is ``Compute 37*48+519-206.``: a product of two 2-digit numbers followed by one to three additions
or subtractions of 3-digit numbers. A model of demo size cannot multiply in its head, but it can copy
numbers into code, so the scripted solution does one operation per tool call and carries each printed
result into the next call::

    assistant: <tool_call>{"name": "code_interpreter", "arguments": {"code": "print(37*48)"}}</tool_call>
    tool:      1776
    assistant: <tool_call>{... "print(1776+519)"}</tool_call>
    tool:      2295
    assistant: <tool_call>{... "print(2295-206)"}</tool_call>
    tool:      2089
    assistant: The answer is \\boxed{2089}.

Each assistant turn is one SOD step. A wrong tool call (a mis-copied digit) puts a wrong number in the
context, and every later step that carries it forward is derailed: the error-cascade SOD is about. The
final answer is checked by the math reward (math-verify on the last ``\\boxed{}``).
"""

from __future__ import annotations

import random

from sodkern.trainer.data import Problem, SFTExample
from sodkern.trainer.prompts import CODE_INTERPRETER_TOOL

DATA_SOURCE = "demo_arith"
SYSTEM = "Use the code_interpreter tool for each operation, one at a time. Give the final answer in \\boxed{}."
SPLIT_SEEDS = {"train": 1234, "test": 98765, "sft": 555}


def make_problems(n: int, split: str = "train", *, seed: int | None = None) -> list[Problem]:
    """``n`` problems of a split; the same ``(n, split, seed)`` always gives the same problems.

    The test split is disjoint from the others (problems seen in train or sft are skipped).
    """
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    seen: set[str] = set()
    if split == "test":
        seen = {p.extra_info["question"] for s in ("train", "sft") for p in _generate(random.Random(SPLIT_SEEDS[s]), 4096)}
    out: list[Problem] = []
    for p in _generate(rng, 100 * n + 1000):
        if p.extra_info["question"] in seen:
            continue
        seen.add(p.extra_info["question"])
        out.append(Problem(**{**p.__dict__, "uid": f"{DATA_SOURCE}-{split}/{len(out)}"}))
        if len(out) == n:
            break
    return out


def _generate(rng: random.Random, n: int) -> list[Problem]:
    problems = []
    for i in range(n):
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        ops = [(rng.choice("+-"), rng.randint(100, 999)) for _ in range(rng.randint(1, 3))]
        question = f"Compute {a}*{b}" + "".join(f"{op}{x}" for op, x in ops) + "."
        value = a * b
        for op, x in ops:
            value = value + x if op == "+" else value - x
        problems.append(
            Problem(
                uid=f"{DATA_SOURCE}/{i}",
                data_source=DATA_SOURCE,
                ability="math",
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                ground_truth=str(value),
                extra_info={"question": question, "a": a, "b": b, "ops": ops},
            )
        )
    return problems


def _call(code: str) -> dict:
    return {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": code}}}


def solution_steps(problem: Problem) -> list[tuple[str, str]]:
    """The scripted solution: ``(code, printed output)`` for each tool call, in order."""
    info = problem.extra_info
    value = info["a"] * info["b"]
    steps = [(f"print({info['a']}*{info['b']})", str(value))]
    for op, x in info["ops"]:
        code = f"print({value}{op}{x})"
        value = value + x if op == "+" else value - x
        steps.append((code, str(value)))
    return steps


def scripted_trajectory(problem: Problem) -> SFTExample:
    """A correct multi-turn tool-calling trajectory for ``problem`` (the SFT data of teacher and student)."""
    messages = list(problem.messages)
    steps = solution_steps(problem)
    for code, output in steps:
        messages.append({"role": "assistant", "content": "", "tool_calls": [_call(code)]})
        messages.append({"role": "tool", "content": output})
    messages.append({"role": "assistant", "content": f"The answer is \\boxed{{{steps[-1][1]}}}."})
    return SFTExample(messages=messages, tools=[CODE_INTERPRETER_TOOL])


def corpus(n: int = 400) -> list[str]:
    """Text for training the demo tokenizer: questions, tool calls, outputs and answers of the task."""
    texts = []
    for p in make_problems(n, "sft"):
        texts.append(SYSTEM + "\n" + p.extra_info["question"])
        for code, out in solution_steps(p):
            texts.append('{"name": "code_interpreter", "arguments": {"code": "' + code + '"}}\n' + out)
        texts.append(f"The answer is \\boxed{{{p.ground_truth}}}.")
    return texts
