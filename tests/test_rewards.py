"""Rewards: math-verify answers, multiple-choice letters, code in the real sandbox, shaping, selection."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sodkern.trainer.tasks.data import Problem, load_problems
from sodkern.trainer.tasks.rewards import (
    RewardResult,
    code_reward,
    code_reward_partial,
    compute_reward,
    extract_choice,
    extract_program,
    last_boxed,
    math_reward,
    resolve_reward_fn,
    science_reward,
)

FIXTURES = Path(__file__).parent / "fixtures"


def problem(ground_truth, ability: str = "math", data_source: str = "toy") -> Problem:
    return Problem("toy/0", data_source, ability, [{"role": "user", "content": "q"}], ground_truth)


def reward(p: Problem, text: str, num_turns: int = 2, **kwargs) -> RewardResult:
    kwargs = {"response_tokens": 100, "max_response_tokens": 4096, **kwargs}
    return compute_reward(p, text, num_turns=num_turns, **kwargs)


def tool_call(code: str) -> str:
    call = {"name": "code_interpreter", "arguments": {"code": code}}
    return f"<tool_call>{json.dumps(call)}</tool_call>"


# ------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\sqrt{\\frac{3}{4}}}", "\\sqrt{\\frac{3}{4}}"),
        ("\\boxed{{12}}", "12"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("$\\boxed 7$", "7"),
        ("\\fbox{3}", "3"),
        ("\\boxed{12", None),
        ("no box", None),
    ],
)
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(
    ("ground_truth", "text", "correct"),
    [
        ("\\frac{1}{2}", "The answer is \\boxed{0.5}.", True),
        ("0.5", "\\boxed{\\frac{1}{2}}", True),
        ("12", "\\boxed{{12}}", True),
        ("12", "Thus $\\boxed{12}$", True),
        ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\sqrt{3}/2}", True),
        ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", True),
        ("033", "\\boxed{33}", True),
        (["4", "four"], "\\boxed{4}", True),
        ("12", "\\boxed{12} is wrong, so \\boxed{13}", False),
        ("12", "I think it is 12.", False),
        ("\\pi", "\\boxed{3.14}", False),
    ],
)
def test_math_equivalent_forms(ground_truth, text, correct):
    result = math_reward(problem(ground_truth), text)
    assert result.correct is correct and result.score == (1.0 if correct else -1.0)


def test_math_ignores_boxes_in_tool_calls_and_outputs():
    text = "Let me check. " + tool_call("print('\\\\boxed{7}')") + "<tool_response>\\boxed{7}</tool_response>"
    result = math_reward(problem("7"), text)
    assert not result.correct and result.extracted is None
    assert math_reward(problem("7"), text + " So \\boxed{7}.").correct


def test_math_in_worker_threads():
    # math-verify's signal.alarm timeout only works in the main thread; rewards must still work in threads.
    cases = [("\\frac{1}{2}", "\\boxed{0.5}", True), ("3", "\\boxed{4}", False)] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: math_reward(problem(c[0]), c[1]).correct, cases))
    assert results == [c[2] for c in cases]


# ------------------------------------------------------------------------------------------ shaping, overlong


@pytest.mark.parametrize(
    ("num_turns", "score"), [(2, -1.0), (4, -0.9), (6, -0.8), (8, -0.7), (10, -0.6), (16, -0.6), (1, -1.05)]
)
def test_tool_call_shaping_of_wrong_answers(num_turns, score):
    result = reward(problem("5"), "\\boxed{6}", num_turns=num_turns)
    assert result.score == pytest.approx(score)
    assert result.info["outcome_score"] == -1.0 and not result.correct


def test_shaping_leaves_correct_answers_and_can_be_off():
    assert reward(problem("5"), "\\boxed{5}", num_turns=8).score == 1.0
    assert reward(problem("5"), "\\boxed{6}", num_turns=8, tool_shaping=False).score == -1.0


@pytest.mark.parametrize(("tokens", "penalty"), [(1000, 0.0), (3072, 0.0), (3328, -0.25), (3584, -0.5), (4096, -1.0)])
def test_overlong_penalty(tokens, penalty):
    kwargs = {"response_tokens": tokens, "max_response_tokens": 4096, "overlong_penalty": True}
    right = reward(problem("5"), "\\boxed{5}", **kwargs)
    assert right.score == pytest.approx(1.0 + penalty) and right.info["overlong_penalty"] == pytest.approx(penalty)
    wrong = reward(problem("5"), "\\boxed{6}", num_turns=4, **kwargs)  # shaping first, then the penalty
    assert wrong.score == pytest.approx(-0.9 + penalty)
    off = reward(problem("5"), "\\boxed{5}", response_tokens=tokens, max_response_tokens=4096)
    assert off.score == 1.0


def test_overlong_buffer_checked():
    with pytest.raises(ValueError, match="overlong_buffer: expected 0 < overlong_buffer <= max_response_tokens"):
        reward(problem("5"), "\\boxed{5}", max_response_tokens=512, overlong_penalty=True)


# ------------------------------------------------------------------------------------------ multiple choice


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("so \\boxed{C}", "C"),
        ("\\boxed{(C)}", "C"),
        ("\\boxed{\\text{C}}", "C"),
        ("$\\boxed{\\textbf{(C)}}$", "C"),
        ("\\boxed{C. 13.6 eV}", "C"),
        ("Thinking... Answer: C", "C"),
        ("Answer: (B) first. Final answer: **C**", "C"),
        ("\\boxed{13.6}", None),
        ("the answer is c", None),
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_gpqa_reward_by_data_source():
    p = problem("C", ability="science", data_source="gpqa_diamond")
    assert reward(p, "\\boxed{C}").score == 1.0
    result = reward(p, "\\boxed{D}", num_turns=6)
    assert not result.correct and result.extracted == "D" and result.score == pytest.approx(-0.8)


def test_science_reward_free_form_answer_uses_math_verify():
    assert science_reward(problem("6.02\\times10^{23}", "science"), "\\boxed{6.02 \\times 10^{23}}").correct
    assert science_reward(problem("B", "science"), "\\boxed{B}").correct


# ------------------------------------------------------------------------------------------ code


def test_extract_program_takes_last_block_after_last_tool_call():
    draft = "```python\nprint('draft')\n```"
    final = "```python\nprint('final')\n```"
    text = f"{draft}\n{tool_call('print(1)')}<tool_response>1</tool_response>\nOK.\n{final}"
    assert extract_program(text) == "print('final')\n"
    assert extract_program(f"{final}\n{tool_call('print(1)')}<tool_response>1</tool_response> done") is None
    assert extract_program("```py\nx = 1\n```") == "x = 1\n"
    assert extract_program("```python\nprint(1)") is None  # truncated fence


# ------------------------------------------------------------------------------------------ selection


def test_reward_fn_by_data_source_prefix_and_ability():
    assert resolve_reward_fn(problem("5", "math", "aime2025")) is math_reward
    assert resolve_reward_fn(problem("C", "science", "Idavidrein/gpqa_diamond")).__name__ == "choice_reward"
    assert resolve_reward_fn(problem({}, "code", "livecodebench_v6")) is code_reward
    assert resolve_reward_fn(problem("C", "science", "my_science")) is science_reward
    with pytest.raises(ValueError, match="no reward function for data_source 'toy' \\(ability 'poetry'\\)"):
        resolve_reward_fn(problem("x", "poetry"))


CUSTOM_MODULE = """
from sodkern.trainer.tasks.rewards import RewardResult

def length_reward(problem, response_text, *, sandbox=None):
    return RewardResult(0.5, True, response_text[:3], {"seen": problem.uid})

def always_wrong(problem, response_text, **kwargs):
    return False

def as_float(problem, response_text, **kwargs):
    return 0.25

not_callable = 3
"""


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards_mod"
    sys.modules.pop("my_rewards_mod", None)


def test_custom_reward_by_import_path(custom_module):
    result = reward(problem("5"), "\\boxed{6}", reward_fn=f"{custom_module}:length_reward", num_turns=8)
    assert result.score == 0.5 and result.correct and result.extracted == "\\bo"
    assert result.info == {"seen": "toy/0", "outcome_score": 0.5}
    wrong = reward(problem("5"), "\\boxed{5}", reward_fn=f"{custom_module}:always_wrong", num_turns=6)
    assert wrong.score == pytest.approx(-0.8) and not wrong.correct  # bool -> -1, then shaping
    assert reward(problem("5"), "", reward_fn=f"{custom_module}:as_float").score == 0.25


def test_custom_reward_table_per_data_source(custom_module):
    table = {"toy_a": f"{custom_module}:as_float", "code": code_reward_partial}
    assert reward(problem("5", data_source="toy_a/v2"), "\\boxed{6}", reward_fn=table).score == 0.25
    assert reward(problem("5", data_source="toy_b"), "\\boxed{5}", reward_fn=table).score == 1.0  # built-in
    assert resolve_reward_fn(problem({}, "code", "toy_c"), table) is code_reward_partial  # by ability


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_colon", "expected an import path 'package.module:function'"),
        ("no_such_module_xyz:f", "cannot import it"),
        ("{mod}:missing", "cannot import it"),
        ("{mod}:not_callable", "int is not callable"),
    ],
)
def test_bad_reward_import_paths(custom_module, path, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward_fn(problem("5"), path.format(mod=custom_module))


@pytest.fixture(scope="module")
def sandbox():
    from sodkern.trainer.sandbox import LocalSandbox

    with LocalSandbox(timeout=1.0, cpu_seconds=2, workers=2) as sb:
        yield sb


SUM_TESTS = {"inputs": ["3\n1 2 3\n", "2\n10 -4\n", "1\n5\n"], "outputs": ["6\n", "6", "5\n"]}
SUM_OK = "import sys\nn, *xs = map(int, sys.stdin.read().split())\nprint(sum(xs[:n]))\n"


def answer(program: str) -> str:
    """A response with a tool call, then the final fenced program."""
    return f"Try it.{tool_call('print(1 + 1)')}<tool_response>2</tool_response>\nFinal:\n```python\n{program}```"


@pytest.mark.parametrize(
    ("program", "verdicts"),
    [
        (SUM_OK, ["passed"] * 3),
        ("import sys\nprint(' 6 ')\nprint()\n", ["passed", "passed", "wrong answer"]),  # whitespace-normalised
        ("print(0)\n", ["wrong answer"] * 3),
        (SUM_OK.replace("print", "1 // (n - 1)\nprint"), ["passed", "passed", "runtime error"]),
        (
            "import sys\nif sys.stdin.read().startswith('1'):\n    while True: pass\nprint(6)\n",
            ["passed"] * 2 + ["timeout limit"],
        ),
    ],
    ids=["pass", "partial", "fail", "crash", "timeout"],
)
def test_code_reward_in_sandbox(sandbox, program, verdicts):
    p = problem(SUM_TESTS, "code", "livecodebench")
    passed = verdicts.count("passed")
    result = reward(p, answer(program), num_turns=4, sandbox=sandbox)
    assert result.info["verdicts"] == verdicts and result.info["passed"] == passed and result.info["total"] == 3
    assert result.correct is (passed == 3) and result.extracted == program
    assert result.score == pytest.approx(1.0 if passed == 3 else -0.9)  # all-or-nothing, then shaping
    partial = reward(p, answer(program), num_turns=4, sandbox=sandbox, reward_fn={"livecodebench": code_reward_partial})
    assert partial.score == pytest.approx(2 * passed / 3 - 1 if passed else -0.9)
    if "runtime error" in verdicts:
        assert "ZeroDivisionError" in result.info["first_failure"]["stderr"]


def test_code_reward_without_final_program(sandbox):
    p = problem(SUM_TESTS, "code", "livecodebench")
    text = f"```python\n{SUM_OK}```\nLet me test it.{tool_call(SUM_OK)}<tool_response>6</tool_response> Done."
    result = code_reward(p, text, sandbox=sandbox)
    assert result.score == -1.0 and result.extracted is None and result.info["passed"] == 0


def test_call_based_code_reward(sandbox):
    (p,) = [q for q in load_problems(FIXTURES / "livecodebench_v6.parquet") if "fn_name" in q.ground_truth]
    good = "class Solution:\n    def addAll(self, nums, k):\n        return [x + k for x in nums]\n"
    assert reward(p, answer(good), sandbox=sandbox).correct
    bad = "class Solution:\n    def addAll(self, nums, k):\n        return nums\n"
    assert reward(p, answer(bad), sandbox=sandbox).info["verdicts"] == ["wrong answer", "passed"]


def test_code_reward_needs_tests(sandbox):
    with pytest.raises(ValueError, match="problem toy/0: code_reward needs ground_truth"):
        code_reward(problem("5", "code"), answer(SUM_OK), sandbox=sandbox)
