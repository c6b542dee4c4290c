"""The demo's synthetic tool-integrated reasoning task: one map, applied a few times with the code interpreter.

A problem is ``Start at 553 and apply x*2-63 mod 1001 four times.``: a 3-digit start value (a multiple of 7) and
a count of applications (two to four) of the one map ``x -> (x*2-63) mod 1001``, the same for every problem. A
model of demo size cannot do the arithmetic in its head, but it can copy a number into code, so the scripted
solution makes one tool call per application, every call the same code but for the number it carries::

    assistant: <tool_call>{"name": "code_interpreter", "arguments": {"code": "x=553;assert x%7==0;print(...)"}}
               (the whole code: x=553;assert x%7==0;print((x*2-63)%1001))
    tool:      <tool_response>42</tool_response>
    assistant: <tool_call>{... "x=42;assert x%7==0;print((x*2-63)%1001)"}</tool_call>
    tool:      <tool_response>21</tool_response>
    ...
    assistant: The answer is \\boxed{896} (x*2-63 mod 1001 applied four times).

Each assistant turn is one SOD step, and every call step is the same work: copy one number (from the question at
step 1, from the previous tool output after) into the same checked call. The map keeps multiples of 7 (1001 = 7 *
11 * 13), so a mis-copied value almost always fails its own ``assert`` and the tool answers with an
``AssertionError`` traceback, a tool result the teacher never saw in its SFT data: the error-cascade SOD is
about, made visible in the context (SOD's premise, measured by :mod:`sodkern.trainer.premise`; the designs tried
are in ``bench/results/demo/premise_designs.md``). The final answer is checked by the math reward (math-verify
on the last ``\\boxed{}``). The held-out split has its own start values (every fourth multiple of 7).
"""

from __future__ import annotations

import random

from sodkern.trainer.tasks.data import Problem, SFTExample
from sodkern.trainer.tasks.prompts import CODE_INTERPRETER_TOOL

DATA_SOURCE = "demo_arith"
SYSTEM = "Use the code_interpreter tool for each step, one at a time. Give the final answer in \\boxed{}."
TIMES = {2: "twice", 3: "three times", 4: "four times"}
MOD, CHECK = 1001, 7  # values are kept below 1001 = 7 * 11 * 13 and stay multiples of 7
MUL, SUB = 2, 63  # the one map of every problem: x -> (x*2-63) mod 1001; its only fixed point, 63, is no start
MAP = f"x*{MUL}-{SUB} mod {MOD}"
CODE = "x={x};assert x%" + str(CHECK) + "==0;print((x*" + str(MUL) + "-" + str(SUB) + ")%" + str(MOD) + ")"
STARTS = [x for x in range(105, MOD, CHECK)]  # the 3-digit multiples of 7 (128 values): step 1 copies 3 digits
SPLIT_SEEDS = {"train": 1234, "test": 98765, "sft": 555}

# The demo tokenizer's chat template: the Hermes / Qwen3 layout of :data:`sodkern.trainer.demo.tiny.CHAT_TEMPLATE`
# (tool calls as ``<tool_call>{json}</tool_call>``, results inside ``<tool_response>`` in a user turn) with a
# compact tool list (names only, not the JSON schemas) and no newlines around the markup, so that the
# sequences of the demo stay short.
CHAT_TEMPLATE = """\
{%- set msgs = messages -%}
{%- set system = none -%}
{%- if messages and messages[0].role == 'system' -%}
  {%- set system = messages[0].content -%}
  {%- set msgs = messages[1:] -%}
{%- endif -%}
{%- if system is not none or tools -%}
  {{- '<|im_start|>system\\n' + (system or '') -}}
  {%- if tools -%}
    {{- '\\nTools:' -}}
    {%- for tool in tools -%}{{- ' ' + (tool.function.name if tool.function is defined else tool.name) -}}{%- endfor -%}
  {%- endif -%}
  {{- '<|im_end|>\\n' -}}
{%- endif -%}
{%- for m in msgs -%}
  {%- if m.role == 'tool' -%}
    {%- if loop.first or msgs[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user\\n' -}}{%- endif -%}
    {{- '<tool_response>' + m.content + '</tool_response>' -}}
    {%- if loop.last or msgs[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
  {%- elif m.role == 'assistant' -%}
    {{- '<|im_start|>assistant\\n' + (m.content or '') -}}
    {%- for call in (m.tool_calls or []) -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {{- '<tool_call>{"name": ' + (fn.name | tojson) + ', "arguments": ' -}}
      {%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
      {{- '}</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""


def make_problems(n: int, split: str = "train", *, seed: int | None = None) -> list[Problem]:
    """``n`` problems of a split; the same ``(n, split, seed)`` always gives the same problems.

    A problem is a start value and a count of applications of the one map :data:`MAP`. The test split holds
    out its own start values (every fourth multiple of 7), so no test question is in train or sft; the test
    problems are distinct, the train and sft splits draw with repeats (there are 288 distinct questions).
    """
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    starts = [x for i, x in enumerate(STARTS) if (i % 4 == 0) == (split == "test")]
    out: list[Problem] = []
    if split == "test":
        pairs = [(s, t) for s in starts for t in TIMES]
        rng.shuffle(pairs)
        if n > len(pairs):
            raise ValueError(f"make_problems: the test split has {len(pairs)} problems, asked for n={n}")
    else:
        pairs = [(rng.choice(starts), rng.choice(list(TIMES))) for _ in range(n)]
    for start, times in pairs[:n]:
        out.append(_problem(f"{DATA_SOURCE}-{split}/{len(out)}", start, times))
    return out


def apply_map(x: int) -> int:
    """One application of the map: ``(x*2-63) mod 1001`` (a multiple of 7 stays a multiple of 7)."""
    return (x * MUL - SUB) % MOD


def _problem(uid: str, start: int, times: int) -> Problem:
    question = f"Start at {start} and apply {MAP} {TIMES[times]}."
    value, results = start, []
    for _ in range(times):
        value = apply_map(value)
        results.append(str(value))
    return Problem(
        uid=uid,
        data_source=DATA_SOURCE,
        ability="math",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        ground_truth=str(value),
        extra_info={"question": question, "start": start, "times": times, "tool_results": results},
    )


def problem_row(problem: Problem) -> dict:
    """``problem`` as a row of the verl layout (``load_problems`` reads it back with the same uid)."""
    return {
        "data_source": problem.data_source,
        "prompt": problem.messages,
        "ability": problem.ability,
        "reward_model": {"ground_truth": problem.ground_truth, "style": "rule"},
        "extra_info": {**problem.extra_info, "uid": problem.uid},
    }


def _call(code: str) -> dict:
    return {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": code}}}


def solution_steps(problem: Problem) -> list[tuple[str, str]]:
    """The scripted solution: ``(code, printed output)`` for each tool call, in order."""
    info = problem.extra_info
    value, steps = info["start"], []
    for _ in range(info["times"]):
        code = CODE.format(x=value)
        value = apply_map(value)
        steps.append((code, str(value)))
    return steps


def answer_text(problem: Problem, value: str) -> str:
    """The final turn: the last printed value in ``\\boxed{}``, then the map and the count it answers, so that
    the answer turn has about as many tokens as a call turn around the same one copied number."""
    return f"The answer is \\boxed{{{value}}} ({MAP} applied {TIMES[problem.extra_info['times']]})."


def scripted_trajectory(problem: Problem) -> SFTExample:
    """A correct multi-turn tool-calling trajectory for ``problem`` (the SFT data of teacher and student)."""
    messages = list(problem.messages)
    steps = solution_steps(problem)
    for code, output in steps:
        messages.append({"role": "assistant", "content": "", "tool_calls": [_call(code)]})
        messages.append({"role": "tool", "content": output})
    messages.append({"role": "assistant", "content": answer_text(problem, steps[-1][1])})
    return SFTExample(messages=messages, tools=[CODE_INTERPRETER_TOOL])


def corpus(n: int = 400) -> list[str]:
    """Text for training the demo tokenizer: ``n`` scripted conversations of the sft split, piece by piece as
    :data:`CHAT_TEMPLATE` writes them (system prompt, role names, questions, tool calls, outputs, answers;
    markup tokens left out), so the BPE merges follow the frequencies the models will see."""
    texts = []
    for p in make_problems(n, "sft"):
        texts += ["system\n" + SYSTEM + "\nTools: code_interpreter", "user\n" + p.extra_info["question"]]
        for code, out in solution_steps(p):
            texts += ["assistant\n", '{"name": "code_interpreter", "arguments": {"code": "' + code + '"}}']
            texts += ["user\n", out]
        texts += ["assistant\n", answer_text(p, p.ground_truth)]
    return texts
