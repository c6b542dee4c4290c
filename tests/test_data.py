"""Data loading (parquet / JSONL, verl and raw benchmark layouts, SFT rows), bad rows, prompt construction."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sodkern.trainer.tasks.data import load_problems, load_sft
from sodkern.trainer.tasks.prompts import build_prompt

FIXTURES = Path(__file__).parent / "fixtures"


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def verl_row(**overrides) -> dict:
    row = {
        "data_source": "toy",
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "ability": "math",
        "reward_model": {"ground_truth": "4", "style": "rule"},
        "extra_info": {"split": "test"},
    }
    return {**row, **overrides}


# ------------------------------------------------------------------------------------------ good files


@pytest.mark.parametrize("name", ["verl_mixed.parquet", "verl_mixed.jsonl"])
def test_verl_layout_keeps_prompt(name):
    problems = load_problems(FIXTURES / name)
    assert problems.skipped == 0
    assert [p.ability for p in problems] == ["math", "science", "code"]  # "MATH" is lower-cased
    math, science, code = problems
    assert math.uid == "tir_math/7" and math.data_source == "tir_math"
    assert math.messages == [
        {"role": "system", "content": "You are a careful problem solver."},
        {"role": "user", "content": "What is 1/3 + 1/6? Put the answer in \\boxed{}."},
    ]
    assert math.ground_truth == "\\frac{1}{2}" and math.extra_info == {"index": 7, "split": "train"}
    assert science.ground_truth == "B"
    assert code.ground_truth == {"inputs": ["3\n1 2 3\n", "2\n10 -4\n"], "outputs": ["6\n", "6\n"]}


def test_parquet_and_jsonl_agree():
    assert load_problems(FIXTURES / "verl_mixed.parquet") == load_problems(FIXTURES / "verl_mixed.jsonl")
    assert load_sft(FIXTURES / "sft.parquet") == load_sft(FIXTURES / "sft.jsonl")


def test_aime_layouts():
    a24 = load_problems(FIXTURES / "aime2024.parquet")
    assert [(p.uid, p.data_source, p.ability, p.ground_truth) for p in a24] == [
        ("aime2024/2024-X-1", "aime2024", "math", "9"),  # integer Answer column -> string
        ("aime2024/2024-X-2", "aime2024", "math", "391"),
    ]
    assert a24[0].extra_info == {"ID": "2024-X-1", "Solution": "36 = 2^2 3^2."}
    a25 = load_problems(FIXTURES / "aime2025.parquet")
    assert [(p.uid, p.ground_truth) for p in a25] == [("aime2025/0", "2"), ("aime2025/1", "10")]
    (message,) = a25[0].messages
    assert message["role"] == "user"
    assert message["content"].startswith("What is the remainder when 2^10 is divided by 7?")
    assert "\\boxed{}" in message["content"] and "code_interpreter" in message["content"]


def test_gpqa_layout():
    problems = load_problems(FIXTURES / "gpqa_diamond.parquet")
    assert [(p.uid, p.ability, p.ground_truth, p.extra_info) for p in problems] == [
        ("gpqa_diamond/0", "science", "C", {"domain": "Physics"}),
        ("gpqa_diamond/1", "science", "A", {"domain": "Chemistry"}),
    ]
    content = problems[0].messages[0]["content"]
    assert "(C) neutron" in content and "letter" in content and "\\boxed{A}" in content


def test_livecodebench_layout():
    stdin_problem, call_problem = load_problems(FIXTURES / "livecodebench_v6.parquet")
    assert stdin_problem.uid == "livecodebench/abc001_a" and stdin_problem.ability == "code"
    assert stdin_problem.ground_truth["inputs"] == ["3\n1 2 3\n", "2\n10 -4\n"]
    assert stdin_problem.extra_info["platform"] == "atcoder"
    assert "standard input" in stdin_problem.messages[0]["content"]
    assert call_problem.ground_truth["fn_name"] == "addAll"
    content = call_problem.messages[0]["content"]
    assert "def addAll(self, nums: list[int], k: int)" in content and "```python" in content


def test_data_source_override_and_uid_fallback(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", [verl_row(), verl_row(extra_info={"uid": "q-17"})])
    problems = load_problems(path, data_source="mine")
    assert [p.data_source for p in problems] == ["mine", "mine"]
    assert [p.uid for p in problems] == ["mine/0", "q-17"]


def test_ground_truth_list_and_json_string_columns(tmp_path):
    rows = [
        verl_row(reward_model={"ground_truth": ["4", "4.0"], "style": "rule"}),
        verl_row(reward_model=json.dumps({"ground_truth": 4}), extra_info=json.dumps({"index": 3})),
    ]
    first, second = load_problems(write_jsonl(tmp_path / "x.jsonl", rows))
    assert first.ground_truth == ["4", "4.0"]
    assert second.ground_truth == "4" and second.uid == "toy/3"


def test_sft_rows():
    with_tool, without_tool = load_sft(FIXTURES / "sft.parquet")
    assert with_tool.tools == [
        {
            "type": "function",
            "function": {
                "name": "code_interpreter",
                "description": "Run Python code and return its output.",
                "parameters": {
                    "type": "object",
                    "properties": {"code": {"type": "string"}},
                    "required": ["code"],
                },
            },
        }
    ]
    user, call, result, final = with_tool.messages
    assert user == {"role": "user", "content": "What is 2**20?"}  # parquet's None-filled struct keys dropped
    assert call["tool_calls"] == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "code_interpreter", "arguments": {"code": "2**20"}},
        }
    ]
    assert result == {"role": "tool", "content": "1048576"}
    assert final["content"].endswith("\\boxed{1048576}.")
    assert [m["role"] for m in without_tool.messages] == ["system", "user", "assistant"]


def test_sft_without_tools_column(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (example,) = load_sft(write_jsonl(tmp_path / "s.jsonl", rows))
    assert example.tools == [] and example.messages[1]["content"] == "hello"


# ------------------------------------------------------------------------------------------ bad rows


def test_bad_prompt_names_file_row_field(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [verl_row(), verl_row(), verl_row(), verl_row(prompt="hi")])
    with pytest.raises(ValueError) as e:
        load_problems(path)
    assert str(e.value) == (
        f"{path} row 3 (line 4): field 'prompt': expected a list of {{role, content}} messages, got str 'hi'"
    )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            verl_row(prompt="hi"),
            "field 'prompt': expected a list of {role, content} messages, got str",
        ),
        (
            verl_row(prompt=[{"role": "bot", "content": "x"}]),
            "field 'prompt[0]': expected {role: one of",
        ),
        (verl_row(reward_model={"style": "rule"}), "field 'reward_model': missing 'ground_truth'"),
        (verl_row(ability=None), "field 'ability': expected a non-empty string, got NoneType"),
        (
            verl_row(ability="code", reward_model={"ground_truth": "{not json", "style": "rule"}),
            "field 'reward_model.ground_truth': expected test cases",
        ),
        (
            verl_row(ability="code", reward_model={"ground_truth": '{"inputs": ["1"], "outputs": []}'}),
            "field 'reward_model.ground_truth.outputs': expected a non-empty list of strings",
        ),
        (
            {"problem": "Which?", "solution": "42", "domain": "x"},
            "field 'solution': expected an option letter",
        ),
        ({"Problem": "Compute.", "Answer": None}, "field 'Answer': expected an answer string"),
        ({"question": "Compute."}, "field 'prompt': missing; expected the verl layout"),
        ({"messages": []}, "field 'prompt': this looks like an SFT row"),
    ],
)
def test_bad_row_messages(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [verl_row(), row])
    with pytest.raises(ValueError, match="^" + re.escape(f"{path} row 1 (line 2): {message}")):
        load_problems(path)


def test_bad_parquet_row_and_skip_mode(tmp_path, caplog):
    rows = [verl_row(), verl_row(reward_model={"ground_truth": None, "style": "rule"}), verl_row()]
    path = write_parquet(tmp_path / "x.parquet", rows)
    with pytest.raises(ValueError, match=r"x\.parquet row 1: field 'reward_model\.ground_truth': expected an answer"):
        load_problems(path)
    with caplog.at_level(logging.WARNING, logger="sodkern.trainer.tasks.data"):
        problems = load_problems(path, skip_bad_rows=True)
    assert [p.uid for p in problems] == ["toy/0", "toy/2"]
    assert problems.skipped == 1 and "row 1: field 'reward_model.ground_truth'" in problems.errors[0]
    assert "skipped 1 bad row(s) of 3" in caplog.text


def test_invalid_json_line_is_a_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [verl_row(), "", "{oops", "[1, 2]"])
    with pytest.raises(ValueError, match=r"x\.jsonl row 1 \(line 3\): invalid JSON"):
        load_problems(path)
    problems = load_problems(path, skip_bad_rows=True)
    assert len(problems) == 1 and problems.skipped == 2
    assert "row 2 (line 4): expected a JSON object, got list" in problems.errors[1]


@pytest.mark.parametrize(
    ("messages", "tools", "message"),
    [
        ("not json", None, "field 'messages': expected a list of chat messages or a JSON string"),
        ([{"role": "user", "content": "hi"}], None, "field 'messages': no assistant message"),
        ([{"role": "user", "content": 3}], None, r"field 'messages\[0\]\.content': expected a string"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
            None,
            r"field 'messages\[0\]\.tool_calls\[0\]\.function\.arguments': expected a dict",
        ),
        ([{"role": "assistant", "content": "x"}], [{"name": "f"}], r"field 'tools\[0\]': expected"),
    ],
)
def test_bad_sft_rows(tmp_path, messages, tools, message):
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": messages, "tools": tools}])
    with pytest.raises(ValueError, match=r"s\.jsonl row 0 \(line 1\): " + message):
        load_sft(path)
    assert load_sft(path, skip_bad_rows=True).skipped == 1


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'; expected \.parquet or \.jsonl"):
        (tmp_path / "x.csv").write_text("problem,answer\n")
        load_problems(tmp_path / "x.csv")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet: cannot read as parquet"):
        load_problems(tmp_path / "broken.parquet")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_problems(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize(
    ("ability", "expected"),
    [
        ("math", ["step by step", "`code_interpreter`", "final answer within \\boxed{}"]),
        ("science", ["step by step", "`code_interpreter`", "letter of the correct option", "\\boxed{A}"]),
        ("code", ["step by step", "`code_interpreter`", "```python", "standard input", "standard output"]),
    ],
)
def test_build_prompt_per_ability(ability, expected):
    (message,) = build_prompt("  Problem text.\n", ability)
    assert message["role"] == "user" and message["content"].startswith("Problem text.\n\n")
    for phrase in expected:
        assert phrase in message["content"]


def test_build_prompt_starter_code_and_errors():
    (message,) = build_prompt("Add k.", "code", starter_code="class Solution:\n    def f(self): ")
    assert "```python\nclass Solution:\n    def f(self):" in message["content"]
    assert "standard input" not in message["content"]
    with pytest.raises(ValueError, match="ability: expected 'math', 'science' or 'code', got 'poetry'"):
        build_prompt("x", "poetry")
    with pytest.raises(ValueError, match="problem: expected a non-empty string"):
        build_prompt(" ", "math")
