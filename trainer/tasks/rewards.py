"""Outcome rewards for agentic TIR responses: math, multiple choice, code; recipe shaping.

Every built-in reward is on the +1 / -1 scale of the authors' script:

- math: the last ``\\boxed{}`` of the assistant text (tool calls and tool outputs left out) verified against
  the ground truth with ``math-verify``: +1 if equivalent, else -1.
- multiple choice (GPQA): the letter in the last ``\\boxed{}``, else in the last ``Answer: X``: +1 / -1.
- code: the last fenced ```` ```python ```` block after the last tool call, run on every test case in the
  sandbox (stdin -> stdout, compared line by line on whitespace-separated tokens; call-based tests with
  ``fn_name`` compare the JSON value returned). ``code_reward`` is all-or-nothing (+1 if every test passes,
  else -1); ``code_reward_partial`` gives ``2 * passed / total - 1``, so that all tests give +1 and none -1.

:func:`compute_reward` picks the reward function (``reward_fn``, else :data:`REWARD_FNS` by data source
prefix, else :data:`ABILITY_REWARD_FNS` by ability) and then applies, in this order:

- tool-call shaping of a wrong answer (score exactly -1): ``min(-0.6, -1 + (num_turns - 2) / 2 * 0.1)``;
  ``num_turns`` counts turns as verl's agent loop does (prompt + assistant turns + tool turns, so a response
  with k tool calls and a final answer has ``2 + 2k``), which makes the bonus 0.1 per tool call.
  Partial code credit (> -1) is left as is, so shaping never lowers a score.
- the DAPO-style overlong penalty (``overlong_penalty=True``): ``min(0, -(response_tokens -
  (max_response_tokens - overlong_buffer)) / overlong_buffer)``, from 0 at ``max - buffer`` tokens to -1 at
  the limit, added to the score.

``math-verify`` guards parsing and verification with ``signal.alarm`` timeouts, which only work in the main
thread; called from any other thread the verification here runs without that timeout instead of failing.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sodkern.trainer.tasks.data import Problem

logger = logging.getLogger(__name__)

MATH_VERIFY_TIMEOUT_S = 5  # per parse / verify call, main thread only (math-verify uses signal.alarm)
STDERR_TAIL = 400  # characters of a failing test's stderr kept in RewardResult.info
CODE_MAX_OUTPUT_CHARS = 1 << 22  # stdout kept by the default code-reward sandbox (expected outputs can be MBs)


@dataclass
class RewardResult:
    """The reward of one response.

    Attributes:
        score: the reward (the outcome score, then shaping and the overlong penalty in compute_reward).
        correct: whether the final answer is right (every test passes, for code).
        extracted: the answer read from the response (boxed text, option letter, program), or None.
        info: details: ``outcome_score``, ``tool_shaping``, ``overlong_penalty``; for code ``passed``,
            ``total``, ``verdicts`` and ``first_failure``.
    """

    score: float
    correct: bool
    extracted: str | None
    info: dict = field(default_factory=dict)


RewardFn = Callable[..., RewardResult | float | bool]


# ------------------------------------------------------------------------------------------ extraction

_TOOL_BLOCK = re.compile(r"<tool_call>.*?(?:</tool_call>|\Z)|<tool_response>.*?(?:</tool_response>|\Z)", re.S)
_TOOL_END = re.compile(r"</tool_call>|</tool_response>")
_PY_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.S | re.I)
_LETTER = re.compile(r"\(?([A-Z])\)?(?:[\s.:)].*)?", re.S)
_ANSWER_LETTER = re.compile(r"(?i:answer)\s*(?:is\s*)?[:：]\s*\**\s*\(?([A-Z])\b")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


def assistant_text(response: str) -> str:
    """The response without its ``<tool_call>`` and ``<tool_response>`` blocks (an unclosed one is cut)."""
    return _TOOL_BLOCK.sub("\n", response)


def final_text(response: str) -> str:
    """The assistant text after the last tool call or tool response."""
    ends = [m.end() for m in _TOOL_END.finditer(response)]
    return assistant_text(response[ends[-1] :] if ends else response)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces handled; None if absent
    or unclosed. Redundant outer braces (``\\boxed{{12}}``) are removed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if text[i : i + 1] != "{":  # "\boxed 5"
        m = re.match(r"\s+([^\s$]+)", text[i:])
        return m.group(1) if m else None
    end = _closing(text, i)
    if end < 0:
        return None
    inner = text[i + 1 : end].strip()
    while inner.startswith("{") and _closing(inner, 0) == len(inner) - 1:
        inner = inner[1:-1].strip()
    return inner


def _closing(text: str, i: int) -> int:
    """Index of the brace closing the one at ``text[i]``, or -1."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return j
    return -1


def extract_choice(response: str) -> str | None:
    """The option letter: from the last ``\\boxed{}`` (``C``, ``(C)``, ``\\text{C}``, ``C. ...``), else from
    the last ``Answer: X``; None if neither holds a capital letter."""
    text = assistant_text(response)
    boxed = last_boxed(text)
    if boxed is not None:
        m = _LETTER.fullmatch(_TEXT_CMD.sub(r"\1", boxed).replace("$", "").strip())
        if m:
            return m.group(1)
    matches = _ANSWER_LETTER.findall(text)
    return matches[-1] if matches else None


def extract_program(response: str) -> str | None:
    """The last fenced ```` ```python ```` block after the last tool call, or None."""
    blocks = _PY_FENCE.findall(final_text(response))
    return blocks[-1] if blocks and blocks[-1].strip() else None


# ------------------------------------------------------------------------------------------ reward functions


def _verify_math(ground_truth: str | list[str], answer: str) -> bool:
    from math_verify import parse, verify

    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)
    if not pred:
        return False
    for gt in [ground_truth] if isinstance(ground_truth, str) else ground_truth:
        gt = gt.strip().strip("$")
        gold = parse(gt if "\\boxed" in gt else f"\\boxed{{{gt}}}", parsing_timeout=timeout)
        if gold and verify(gold, pred, timeout_seconds=timeout):
            return True
    return False


def math_reward(problem: Problem, response_text: str, *, sandbox: Any = None) -> RewardResult:
    """+1 if the last ``\\boxed{}`` answer equals ``problem.ground_truth`` (math-verify), else -1."""
    answer = last_boxed(assistant_text(response_text))
    correct = bool(answer) and _verify_math(problem.ground_truth, answer)
    return RewardResult(1.0 if correct else -1.0, correct, answer)


def choice_reward(problem: Problem, response_text: str, *, sandbox: Any = None) -> RewardResult:
    """+1 if the extracted option letter equals ``problem.ground_truth`` (a letter), else -1."""
    letter = extract_choice(response_text)
    correct = letter is not None and letter == str(problem.ground_truth).strip().upper()
    return RewardResult(1.0 if correct else -1.0, correct, letter)


def science_reward(problem: Problem, response_text: str, *, sandbox: Any = None) -> RewardResult:
    """Multiple choice when the ground truth is one letter, else a math-verify answer check."""
    gt = problem.ground_truth
    if isinstance(gt, str) and len(gt.strip()) == 1 and gt.strip().isalpha():
        return choice_reward(problem, response_text)
    return math_reward(problem, response_text)


_CALL_HARNESS = """

import json as _sod_json, sys as _sod_sys
_sod_args = [_sod_json.loads(_l) for _l in _sod_sys.stdin.read().splitlines() if _l.strip()]
_sod_fn = getattr(Solution(), {name!r}) if "Solution" in globals() else globals()[{name!r}]
_sod_sys.stdout.write(_sod_json.dumps(_sod_fn(*_sod_args)) + "\\n")
"""


def _same_output(actual: str, expected: str, call_based: bool) -> bool:
    if call_based:
        try:
            return json.loads(actual) == json.loads(expected)
        except json.JSONDecodeError:
            pass
    lines = lambda s: [line.split() for line in s.strip().splitlines() if line.strip()]
    return lines(actual) == lines(expected)


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


@functools.lru_cache(maxsize=1)
def _default_sandbox() -> Any:
    from sodkern.trainer.sandbox import LocalSandbox

    return LocalSandbox(max_output_chars=CODE_MAX_OUTPUT_CHARS)


def code_reward(
    problem: Problem, response_text: str, *, sandbox: Any = None, partial_credit: bool = False
) -> RewardResult:
    """Run the final program on ``problem.ground_truth`` = ``{"inputs", "outputs", "fn_name"?}``.

    Args:
        problem: a code problem.
        response_text: the decoded response.
        sandbox: a ``sodkern.trainer.sandbox.LocalSandbox`` (or anything with its ``run_many``); a shared
            default one if None. Its ``max_output_chars`` must hold the longest expected output (a test
            cut at that limit fails as "output limit", with a warning).
        partial_credit: score ``2 * passed / total - 1`` instead of +1 (all pass) / -1.
    """
    tests = problem.ground_truth
    if not isinstance(tests, dict) or "inputs" not in tests or "outputs" not in tests:
        raise ValueError(
            f"problem {problem.uid}: code_reward needs ground_truth {{'inputs': [...], 'outputs': [...]}}, "
            f"got {type(tests).__name__}"
        )
    program = extract_program(response_text)
    if program is None:
        info = {"passed": 0, "total": len(tests["inputs"]), "verdicts": [], "first_failure": None}
        return RewardResult(-1.0, False, None, info)
    fn_name = tests.get("fn_name")
    code = program + _CALL_HARNESS.format(name=fn_name) if fn_name else program
    sandbox = sandbox if sandbox is not None else _default_sandbox()
    results = sandbox.run_many([code] * len(tests["inputs"]), stdins=list(tests["inputs"]))
    verdicts, first_failure = [], None
    for i, (r, expected) in enumerate(zip(results, tests["outputs"])):
        if r.limit:
            verdict = f"{r.limit} limit"
            kept = getattr(sandbox, "max_output_chars", None)
            if r.limit == "output" and kept is not None and len(expected) >= kept:
                _warn_once(
                    f"code_reward: an expected output ({len(expected):,} chars) is longer than the sandbox "
                    f"keeps (max_output_chars={kept:,}); pass a sandbox with a larger max_output_chars, "
                    "e.g. LocalSandbox(max_output_chars=1 << 22), for code rewards"
                )
        elif r.exit_code != 0:
            verdict = "runtime error"
        else:
            verdict = "passed" if _same_output(r.stdout, expected, bool(fn_name)) else "wrong answer"
        verdicts.append(verdict)
        if verdict != "passed" and first_failure is None:
            first_failure = {"test": i, "verdict": verdict, "stderr": r.stderr[-STDERR_TAIL:]}
    passed, total = verdicts.count("passed"), len(verdicts)
    correct = passed == total
    score = 2.0 * passed / total - 1.0 if partial_credit else (1.0 if correct else -1.0)
    info = {"passed": passed, "total": total, "verdicts": verdicts, "first_failure": first_failure}
    return RewardResult(score, correct, program, info)


def code_reward_partial(problem: Problem, response_text: str, *, sandbox: Any = None) -> RewardResult:
    """:func:`code_reward` with partial credit: ``2 * passed / total - 1``."""
    return code_reward(problem, response_text, sandbox=sandbox, partial_credit=True)


# ------------------------------------------------------------------------------------------ selection

# data_source prefix -> reward; matched against the data source and its last "/" component, lower-cased,
# the longest prefix first. Add entries here (or pass reward_fn=) for other data sets.
REWARD_FNS: dict[str, RewardFn | str] = {
    "aime": math_reward,
    "gpqa": choice_reward,
    "livecodebench": code_reward,
}
# ability -> reward, when no data_source prefix matches.
ABILITY_REWARD_FNS: dict[str, RewardFn | str] = {
    "math": math_reward,
    "science": science_reward,
    "code": code_reward,
}


@functools.cache
def import_reward_fn(path: str) -> RewardFn:
    """The function named by ``"package.module:function"``."""
    module_name, sep, name = path.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"reward_fn {path!r}: expected an import path 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward_fn {path!r}: cannot import it: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward_fn {path!r}: {type(fn).__name__} is not callable")
    return fn


def _by_prefix(table: Mapping[str, RewardFn | str], data_source: str) -> RewardFn | str | None:
    source = data_source.lower()
    names = (source, source.rsplit("/", 1)[-1])
    for key in sorted(table, key=len, reverse=True):
        if any(name.startswith(key.lower()) for name in names):
            return table[key]
    return None


def resolve_reward_fn(
    problem: Problem, reward_fn: RewardFn | str | Mapping[str, RewardFn | str] | None = None
) -> RewardFn:
    """The reward function for ``problem``.

    Args:
        problem: the problem (its ``data_source`` and ``ability`` select the function).
        reward_fn: a callable or ``"module:function"`` used for every problem; or a dict from data_source
            prefix (or ability name) to callable / import path, consulted before :data:`REWARD_FNS` and
            :data:`ABILITY_REWARD_FNS`; or None for the built-in tables.
    """
    if isinstance(reward_fn, str):
        return import_reward_fn(reward_fn)
    if callable(reward_fn):
        return reward_fn
    user = dict(reward_fn or {})
    fn = (
        _by_prefix(user, problem.data_source)
        or user.get(problem.ability)
        or _by_prefix(REWARD_FNS, problem.data_source)
        or ABILITY_REWARD_FNS.get(problem.ability)
    )
    if fn is None:
        raise ValueError(
            f"no reward function for data_source {problem.data_source!r} (ability {problem.ability!r}); "
            "pass reward_fn= (a callable, 'module:function', or a {data_source prefix: function} dict) "
            "or add an entry to sodkern.trainer.tasks.rewards.REWARD_FNS"
        )
    return import_reward_fn(fn) if isinstance(fn, str) else fn


def compute_reward(
    problem: Problem,
    response_text: str,
    *,
    num_turns: int,
    response_tokens: int,
    max_response_tokens: int,
    overlong_penalty: bool = False,
    overlong_buffer: int = 1024,
    tool_shaping: bool = True,
    sandbox: Any = None,
    reward_fn: RewardFn | str | Mapping[str, RewardFn | str] | None = None,
) -> RewardResult:
    """The reward of one response, as in the authors' training script (module docstring for the formulas).

    Args:
        problem: the problem answered.
        response_text: the decoded response (assistant turns, ``<tool_call>`` blocks and tool outputs).
        num_turns: turns as verl's agent loop counts them (2 + 2 per tool call for a finished response).
        response_tokens: number of response tokens (for the overlong penalty).
        max_response_tokens: the response token limit (20,480 in the recipe).
        overlong_penalty: add the DAPO soft overlong penalty over the last ``overlong_buffer`` tokens.
        overlong_buffer: length of the penalty ramp, in tokens.
        tool_shaping: apply ``min(-0.6, score + (num_turns - 2) / 2 * 0.1)`` to a -1 outcome.
        sandbox: the code sandbox passed to the reward function (code rewards make a default one if None).
        reward_fn: see :func:`resolve_reward_fn`. A custom function is called as
            ``fn(problem, response_text, sandbox=sandbox)`` and returns a :class:`RewardResult`, a float
            score (correct if > 0) or a bool (+1 / -1).
    """
    fn = resolve_reward_fn(problem, reward_fn)
    out = fn(problem, response_text, sandbox=sandbox)
    if isinstance(out, bool):
        out = RewardResult(1.0 if out else -1.0, out, None)
    elif isinstance(out, (int, float)):
        out = RewardResult(float(out), out > 0, None)
    elif not isinstance(out, RewardResult):
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(f"reward function {name} returned {type(out).__name__}; expected RewardResult or float")
    score = float(out.score)
    info = {**out.info, "outcome_score": score}
    if tool_shaping and score == -1.0:
        score = min(-0.6, score + (num_turns - 2) / 2 * 0.1)
        info["tool_shaping"] = score - info["outcome_score"]
    if overlong_penalty:
        if not 0 < overlong_buffer <= max_response_tokens:
            raise ValueError(
                f"overlong_buffer: expected 0 < overlong_buffer <= max_response_tokens "
                f"({max_response_tokens}), got {overlong_buffer}"
            )
        exceed = response_tokens - (max_response_tokens - overlong_buffer)
        penalty = min(-exceed / overlong_buffer, 0.0)
        score += penalty
        info["overlong_penalty"] = penalty
    return RewardResult(score, out.correct, out.extracted, info)
