"""Eval metrics (pass@k estimator, maj@k, per-source summary) and ``sodkern eval`` end to end."""

import itertools
import json
import math
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sodkern.trainer.demo.tiny import save_tiny
from sodkern.trainer.eval import majority_correct, pass_at_k, summarize
from sodkern.trainer.rollout.loop import Trajectory
from sodkern.trainer.tasks.data import Problem
from sodkern.trainer.tasks.rewards import RewardResult


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n, c, k", [(4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 0, 2), (6, 6, 1), (7, 3, 7), (8, 2, 5)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    expected = brute_force_pass_at_k([True] * c + [False] * (n - c), k)
    assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_values_and_errors():
    assert pass_at_k(4, 1, 1) == 0.25 and pass_at_k(4, 1, 2) == 0.5 and pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(32, 0, 32) == 0.0 and pass_at_k(32, 1, 32) == 1.0
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)


def test_majority_vote():
    assert majority_correct(["3", "4", "4", None], [False, True, True, False])
    assert not majority_correct(["3", "3", "4"], [False, False, True])
    assert not majority_correct(["3", "4"], [False, True])  # a tie goes to the answer seen first
    assert majority_correct([None, None, "4"], [False, False, True])  # no answer, no vote
    assert not majority_correct([None, None], [False, False])


def traj(uid: str, i: int, correct: bool, extracted: str | None, tools: int = 0, length: int = 10) -> Trajectory:
    t = Trajectory(uid, i, [1], [5] * length, [1] * length, [0.0] * length, num_tool_calls=tools)
    t.finish_reason = "eos"
    t.reward = RewardResult(1.0 if correct else -1.0, correct, extracted)
    return t


def test_summarize_per_source():
    problems = [Problem("a", "aime", "math", [], "1"), Problem("b", "aime", "math", [], "2")]
    problems.append(Problem("c", "gpqa", "science", [], "A"))
    trajectories = [
        # a: 1 of 4 correct, majority wrong
        traj("a", 0, False, "7", tools=2),
        traj("a", 1, True, "1"),
        traj("a", 2, False, "7"),
        traj("a", 3, False, None),
        # b: 3 of 4 correct, majority right
        *[traj("b", i, i != 0, "2" if i else "5") for i in range(4)],
        # c: none correct, no answers
        *[traj("c", i, False, None, length=30) for i in range(4)],
    ]
    m = summarize(problems, trajectories[::-1], ks=[4, 2])  # order of the samples does not matter
    assert set(m) == {"aime", "gpqa", "all"}
    aime = m["aime"]
    assert aime["problems"] == 2
    assert aime["average@4"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert aime["pass@4"] == 1.0 and aime["maj@4"] == 0.5
    assert aime["pass@2"] == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 3, 2)) / 2)
    assert aime["average@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # first 2 samples
    assert aime["maj@2"] == 0.0  # a: "7" first in a tie; b: "5" first in a tie
    assert aime["mean_tool_calls"] == pytest.approx(2 / 8) and aime["mean_response_tokens"] == 10
    assert m["gpqa"]["pass@4"] == 0.0 and m["gpqa"]["mean_response_tokens"] == 30
    assert m["all"]["problems"] == 3 and m["all"]["average@4"] == pytest.approx(1 / 3)
    assert m["all"]["finish_reasons"] == {"eos": 12}
    with pytest.raises(ValueError, match="k=5"):
        summarize(problems, trajectories, ks=[5])


def test_sodkern_eval_end_to_end(tmp_path):
    model = save_tiny(tmp_path / "model")
    rows = [
        {
            "data_source": source,
            "prompt": [{"role": "user", "content": f"What is {i} + {i}? Put the answer in \\boxed{{}}."}],
            "ability": "math",
            "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
            "extra_info": {"index": i},
        }
        for i, source in enumerate(["math_a", "math_a", "math_b"])
    ]
    data = tmp_path / "eval.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    out = tmp_path / "out"
    argv = ["--model", str(model), "--data", str(data), "--n", "3", "--k", "1", "3", "--max-turns", "2"]
    argv += ["--max-response-tokens", "12", "--output-dir", str(out), "--seed", "1", "--no-progress"]
    code = "import sys; from sodkern.trainer.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "eval", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pass@3" in proc.stdout and "math_b" in proc.stdout  # the printed table
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["top_p"] == 0.6 and metrics["config"]["k"] == [1, 3]
    assert set(metrics["metrics"]) == {"math_a", "math_b", "all"}
    assert metrics["metrics"]["math_a"]["problems"] == 2
    for key in ("average@1", "pass@1", "maj@1", "average@3", "pass@3", "maj@3", "mean_tool_calls"):
        assert 0.0 <= metrics["metrics"]["all"][key] <= 1.0 or key == "mean_tool_calls"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 9
    assert {(s["uid"], s["sample_index"]) for s in samples} == {
        (f"{src}/{i}", j) for i, src in enumerate(["math_a", "math_a", "math_b"]) for j in range(3)
    }
    assert all(1 <= s["response_tokens"] <= 12 for s in samples)
    assert {s["finish_reason"] for s in samples} <= {"eos", "length", "max_turns"}
    mean = sum(s["response_tokens"] for s in samples) / 9
    assert metrics["metrics"]["all"]["mean_response_tokens"] == pytest.approx(mean)
