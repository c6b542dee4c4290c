"""Load RL / eval problems and SFT trajectories from parquet or JSONL files.

Row layouts understood by :func:`load_problems` (detected per row, from its fields):

- verl: ``data_source``, ``prompt`` (list of ``{role, content}``), ``ability``, ``reward_model``
  (``{ground_truth, style}``; for code, ``ground_truth`` is a JSON string
  ``{"inputs": [...], "outputs": [...]}``, optionally with ``"fn_name"`` for call-based problems),
  ``extra_info``. The prompt messages are kept as given.
- AIME 2024: ``Problem``, ``Answer`` (data source ``aime2024``).
- AIME 2025: ``problem``, ``answer`` (data source ``aime2025``).
- GPQA-Diamond: ``problem`` (with the lettered options), ``solution`` (the letter), ``domain``
  (data source ``gpqa_diamond``).
- LiveCodeBench v6: ``problem``, ``reward_model``, ``extra_info``, the last two as JSON strings
  (data source ``livecodebench``).

For the raw benchmark layouts the prompt is built by :func:`sodkern.trainer.tasks.prompts.build_prompt`, and
their other columns go to ``extra_info``. Pass ``data_source=`` to name a raw file that is not the
benchmark its shape suggests.

:func:`load_sft` reads SFT rows: ``messages`` (chat messages; assistant ``tool_calls`` in the OpenAI
format, ``tool`` results) and ``tools`` (OpenAI-style function schemas, a list or a JSON string).

A malformed row raises ``ValueError`` naming the file, the row (0-based; JSONL rows also give the line)
and the field. With ``skip_bad_rows=True`` such rows are skipped instead: the returned :class:`Rows` list
keeps their error messages in ``.errors`` (``.skipped`` is their count) and one warning is logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sodkern.trainer.tasks.prompts import build_prompt

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Problem:
    """One RL / eval problem.

    Attributes:
        uid: stable id: ``extra_info["uid"]`` if present, else ``f"{data_source}/{id}"`` from ``extra_info``'s
            ``id`` / ``ID`` / ``question_id`` / ``index``, else ``f"{data_source}/{row}"``.
        data_source: e.g. ``"aime2024"``, ``"gpqa_diamond"``, ``"livecodebench"``, or the row's
            ``data_source``.
        ability: lower-cased, ``"math"`` | ``"science"`` | ``"code"`` | other.
        messages: the chat prompt (system / user messages), ready for ``apply_chat_template``.
        ground_truth: the answer string (a list of strings if several are accepted), the option letter for
            multiple choice, or ``{"inputs": [str], "outputs": [str], "fn_name"?: str}`` for code.
        extra_info: the row's ``extra_info`` (or the raw layout's other columns).
    """

    uid: str
    data_source: str
    ability: str
    messages: list[dict]
    ground_truth: Any
    extra_info: dict = field(default_factory=dict)


@dataclass
class SFTExample:
    """One SFT trajectory.

    Attributes:
        messages: chat messages; assistant tool calls as
            ``{"type": "function", "function": {"name": str, "arguments": dict}}`` (JSON-string arguments
            are decoded), tool results as ``role="tool"`` messages.
        tools: OpenAI-style function schemas, for ``apply_chat_template(..., tools=tools)``.
    """

    messages: list[dict]
    tools: list[dict] = field(default_factory=list)


class Rows(list):
    """The loaded rows; ``errors`` holds the message of every row skipped with ``skip_bad_rows=True``."""

    def __init__(self, items: list = (), errors: list[str] = ()) -> None:
        super().__init__(items)
        self.errors = list(errors)

    @property
    def skipped(self) -> int:
        return len(self.errors)


class _RowError(ValueError):
    def __init__(self, field_name: str | None, message: str) -> None:
        super().__init__(f"field '{field_name}': {message}" if field_name else message)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, raw row)``: a dict for parquet, the line's text for JSONL."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise ValueError(f"{path}: cannot read as parquet: {e}") from e
        for i, row in enumerate(table.to_pylist()):
            yield f"{path} row {i}", row
    elif suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            i = 0
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path} row {i} (line {lineno})", line
                    i += 1
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .parquet or .jsonl")


def _load(path: str | Path, parse: Callable[[dict, int], Any], skip_bad_rows: bool) -> Rows:
    path = Path(path)
    items, errors = [], []
    for index, (where, raw) in enumerate(_read_rows(path)):
        try:
            if isinstance(raw, str):
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise _RowError(None, f"invalid JSON: {e}") from None
            if not isinstance(raw, dict):
                raise _RowError(None, f"expected a JSON object, got {_describe(raw)}")
            items.append(parse(raw, index))
        except _RowError as e:
            if not skip_bad_rows:
                raise ValueError(f"{where}: {e}") from None
            errors.append(f"{where}: {e}")
    if errors:
        shown = "\n  ".join(errors[:3]) + ("\n  ..." if len(errors) > 3 else "")
        logger.warning("%s: skipped %d bad row(s) of %d:\n  %s", path, len(errors), len(errors) + len(items), shown)
    return Rows(items, errors)


# ------------------------------------------------------------------------------------------ field parsing


def _drop_none(value: Any) -> Any:
    """Remove None-valued keys, recursively (parquet structs fill absent keys with None)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _maybe_json(value: Any, name: str, expected: type, what: str) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _RowError(name, f"expected {what} or a JSON string of one; invalid JSON: {e}") from None
    if not isinstance(value, expected):
        raise _RowError(name, f"expected {what}, got {_describe(value)}")
    return value


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _RowError(name, f"expected a non-empty string, got {_describe(value)}")
    return value


def _chat(value: Any, name: str) -> list[dict]:
    """Validate a prompt: a non-empty list of ``{role, content}`` messages with string content."""
    if not isinstance(value, list) or not value:
        raise _RowError(name, f"expected a list of {{role, content}} messages, got {_describe(value)}")
    messages = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _RowError(
                f"{name}[{j}]",
                f"expected {{role: one of {'/'.join(ROLES)}, content: str}}, got {_describe(m)}",
            )
        messages.append(_drop_none(m))
    return messages


def _answer(value: Any, name: str) -> str | list[str]:
    if isinstance(value, bool) or value is None:
        raise _RowError(name, f"expected an answer string, got {_describe(value)}")
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v).strip() for v in value]
    raise _RowError(name, f"expected an answer string, got {_describe(value)}")


def _letter(value: Any, name: str) -> str:
    letter = value.strip().strip("()").upper() if isinstance(value, str) else None
    if not letter or len(letter) != 1 or not "A" <= letter <= "Z":
        raise _RowError(name, f"expected an option letter A-Z, got {_describe(value)}")
    return letter


def _tests(value: Any, name: str) -> dict:
    """Code ground truth: ``{"inputs": [str], "outputs": [str], "fn_name"?: str}``."""
    tests = _maybe_json(value, name, dict, 'test cases {"inputs": [...], "outputs": [...]}')
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    for key, seq in (("inputs", inputs), ("outputs", outputs)):
        if not isinstance(seq, list) or not seq or not all(isinstance(s, str) for s in seq):
            raise _RowError(f"{name}.{key}", f"expected a non-empty list of strings, got {_describe(seq)}")
    if len(inputs) != len(outputs):
        raise _RowError(name, f"{len(inputs)} inputs but {len(outputs)} outputs")
    result = {"inputs": inputs, "outputs": outputs}
    fn_name = tests.get("fn_name")
    if fn_name:
        if not isinstance(fn_name, str) or not fn_name.isidentifier():
            raise _RowError(f"{name}.fn_name", f"expected a Python identifier, got {_describe(fn_name)}")
        result["fn_name"] = fn_name
    return result


def _extra(value: Any, name: str = "extra_info") -> dict:
    return {} if value is None else _drop_none(_maybe_json(value, name, dict, "a dict"))


def _uid(data_source: str, extra_info: dict, index: int) -> str:
    if extra_info.get("uid") not in (None, ""):
        return str(extra_info["uid"])
    for key in ("id", "ID", "question_id", "index"):
        if extra_info.get(key) not in (None, ""):
            return f"{data_source}/{extra_info[key]}"
    return f"{data_source}/{index}"


# ------------------------------------------------------------------------------------------ RL / eval rows


def _verl_row(row: dict, index: int, data_source: str | None) -> Problem:
    source = data_source or _text(row, "data_source")
    ability = _text(row, "ability").strip().lower()
    messages = _chat(row.get("prompt"), "prompt")
    reward_model = _maybe_json(row.get("reward_model"), "reward_model", dict, "{ground_truth, style}")
    if "ground_truth" not in reward_model:
        raise _RowError("reward_model", f"missing 'ground_truth' (keys: {sorted(reward_model)})")
    name = "reward_model.ground_truth"
    gt = reward_model["ground_truth"]
    ground_truth = _tests(gt, name) if ability == "code" else _answer(gt, name)
    extra_info = _extra(row.get("extra_info"))
    return Problem(_uid(source, extra_info, index), source, ability, messages, ground_truth, extra_info)


def _raw_row(row: dict, index: int, data_source: str | None) -> Problem:
    """The raw benchmark layouts; the shape is told apart by its columns."""
    if "Problem" in row:  # AIME 2024
        source, ability, text = "aime2024", "math", _text(row, "Problem")
        ground_truth, used = _answer(row.get("Answer"), "Answer"), {"Problem", "Answer"}
    elif "answer" in row:  # AIME 2025
        source, ability, text = "aime2025", "math", _text(row, "problem")
        ground_truth, used = _answer(row.get("answer"), "answer"), {"problem", "answer"}
    elif "solution" in row:  # GPQA-Diamond
        source, ability, text = "gpqa_diamond", "science", _text(row, "problem")
        ground_truth, used = _letter(row.get("solution"), "solution"), {"problem", "solution"}
    else:  # LiveCodeBench v6
        source, ability, text = "livecodebench", "code", _text(row, "problem")
        reward_model = _maybe_json(row.get("reward_model"), "reward_model", dict, "a dict")
        tests = reward_model.get("ground_truth", reward_model)
        ground_truth = _tests(tests, "reward_model.ground_truth" if "ground_truth" in reward_model else "reward_model")
        used = {"problem", "reward_model", "extra_info"}
    source = data_source or row.get("data_source") or source
    extra_info = _extra(row.get("extra_info")) if ability == "code" else {}
    extra_info.update({k: v for k, v in row.items() if k not in used and k != "data_source" and v is not None})
    starter = extra_info.get("starter_code") if ability == "code" else None
    messages = build_prompt(text, ability, starter_code=starter if isinstance(starter, str) else None)
    return Problem(_uid(source, extra_info, index), source, ability, messages, ground_truth, extra_info)


def _problem_row(row: dict, index: int, data_source: str | None) -> Problem:
    if "prompt" in row:
        return _verl_row(row, index, data_source)
    if "Problem" in row or ("problem" in row and any(k in row for k in ("answer", "solution", "reward_model"))):
        return _raw_row(row, index, data_source)
    if "messages" in row:
        raise _RowError("prompt", "this looks like an SFT row ('messages'); load it with load_sft")
    raise _RowError(
        "prompt",
        f"missing; expected the verl layout (prompt, reward_model, ...) or a raw benchmark layout "
        f"(Problem/Answer, problem/answer, problem/solution, problem/reward_model); found {sorted(row)}",
    )


def load_problems(path: str | Path, *, skip_bad_rows: bool = False, data_source: str | None = None) -> Rows[Problem]:
    """Load RL / eval problems from a ``.parquet`` or ``.jsonl`` file (layouts in the module docstring).

    Args:
        path: the file.
        skip_bad_rows: skip malformed rows (counted in the result's ``.skipped``) instead of raising.
        data_source: overrides every row's data source (which selects its reward function).

    Returns:
        a :class:`Rows` list of :class:`Problem`, in file order.
    """
    return _load(path, lambda row, i: _problem_row(row, i, data_source), skip_bad_rows)


# ------------------------------------------------------------------------------------------ SFT rows


def _tool_call(call: Any, name: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _RowError(name, f"expected {{type: 'function', function: {{name, arguments}}}}, got {_describe(call)}")
    arguments = _maybe_json(fn.get("arguments", {}), f"{name}.function.arguments", dict, "a dict")
    return {**_drop_none(call), "type": "function", "function": {"name": fn["name"], "arguments": arguments}}


def _sft_messages(value: Any) -> list[dict]:
    value = _maybe_json(value, "messages", list, "a list of chat messages")
    messages = []
    for j, m in enumerate(value):
        name = f"messages[{j}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _RowError(name, f"expected a message with role one of {'/'.join(ROLES)}, got {_describe(m)}")
        m = _drop_none(m)
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise _RowError(
                    f"{name}.tool_calls", f"expected a list on an assistant message, got {_describe(calls)}"
                )
            m["tool_calls"] = [_tool_call(c, f"{name}.tool_calls[{k}]") for k, c in enumerate(calls)]
        if not isinstance(m.get("content"), str) and not (m["role"] == "assistant" and calls):
            raise _RowError(f"{name}.content", f"expected a string, got {_describe(m.get('content'))}")
        messages.append(m)
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowError("messages", "no assistant message to train on")
    return messages


def _sft_tools(value: Any) -> list[dict]:
    if value is None:
        return []
    tools = _drop_none(_maybe_json(value, "tools", list, "a list of function schemas"))
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _RowError(
                f"tools[{k}]",
                f"expected {{type: 'function', function: {{name, ...}}}}, got {_describe(tool)}",
            )
    return tools


def load_sft(path: str | Path, *, skip_bad_rows: bool = False) -> Rows[SFTExample]:
    """Load SFT trajectories (``messages``, optional ``tools``) from a ``.parquet`` or ``.jsonl`` file.

    Args:
        path: the file.
        skip_bad_rows: skip malformed rows (counted in the result's ``.skipped``) instead of raising.

    Returns:
        a :class:`Rows` list of :class:`SFTExample`, in file order.
    """

    def parse(row: dict, index: int) -> SFTExample:
        if "messages" not in row:
            raise _RowError("messages", f"missing; found {sorted(row)}")
        return SFTExample(_sft_messages(row["messages"]), _sft_tools(row.get("tools")))

    return _load(path, parse, skip_bad_rows)
