"""``sodkern demo --quick`` end to end (the CI run of the demo), and the demo's report logic."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sodkern.trainer.demo.demo import MARKER, METHODS, prepare_output_dir
from sodkern.trainer.demo.plots import LABELS, summarize_results
from sodkern.trainer.plot import pattern_counts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    env = {**os.environ}
    env.pop("SODKERN_BACKEND", None)
    script = Path(sys.executable).with_name("sodkern")  # the console script `pip install -e .` put beside python
    assert script.exists(), f"{script} missing: install the project (pip install -e .) in this environment"
    cmd = [str(script), "demo", "--quick", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return out, proc.stdout


def _finite_stats(s: dict) -> bool:
    return all(math.isfinite(v) for v in s["per_seed"]) and math.isfinite(s["mean"])


def test_quick_demo_writes_table_json_and_figures(quick_run):
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    k = results["k"]
    assert set(results["models"]) == {"teacher", "cold-start", *METHODS}
    for name, metrics in results["models"].items():
        for key in (f"average@{k}", f"pass@{k}", "mean_tool_calls", "mean_response_tokens"):
            assert _finite_stats(metrics[key]), (name, key, metrics[key])
            assert len(metrics[key]["per_seed"]) == 1
        assert 0.0 <= metrics[f"average@{k}"]["mean"] <= metrics[f"pass@{k}"]["mean"] <= 1.0
    assert "OPD" in results["verdict"] and "SOD" in results["verdict"]
    assert sum(results["patterns"].values()) > 0  # the sod run logged multi-step trajectories

    markdown = (out / "results.md").read_text()
    for label in LABELS.values():
        assert label in markdown
    assert results["verdict"] in markdown
    # the table is printed too, and the verdict (rich may wrap it, so compare words)
    assert "held-out accuracy" in stdout and " ".join(results["verdict"].split()[:4]) in " ".join(stdout.split())

    import matplotlib.image

    for name in ("accuracy.png", "step_weights.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 400, name
        assert image.std() > 0.01, f"{name} is blank"


def test_quick_demo_logs_progress_when_stdout_is_not_a_terminal(quick_run):
    """``sodkern demo > demo.log``: one line per phase and progress lines of each training run (issue 13)."""
    _, stdout = quick_run
    for phase in ("data and models", "teacher SFT", "student cold-start SFT", "premise check of the cold start",
                  *(f"RL {m} (seed 0)" for m in METHODS)):  # fmt: skip
        assert f"sodkern INFO phase: {phase}" in stdout, phase
    assert "sodkern INFO phase done: RL sod (seed 0)" in stdout
    assert "sodkern INFO RL opd (seed 0): step 4/4" in stdout  # a training run's progress line
    assert "sodkern INFO premise check of the cold start: " in stdout


def test_quick_demo_reports_the_premise_check(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    cold = results["premise"]["cold_start"]
    assert cold["labeled"] and cold["trajectories"] > 0 and cold["verdict"]
    assert results["premise"]["sod_runs"]["labeled"] is False
    records = [json.loads(line) for line in (out / "premise_steps.jsonl").read_text().splitlines()]
    assert any(s["tool_ok"] is True for r in records for s in r["steps"])
    assert cold["verdict"] in (out / "results.md").read_text()
    assert (out / "premise.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_demo_used_the_trainer_runs(quick_run):
    out, _ = quick_run
    for run in ("teacher_sft", "student_sft", *(f"seed0/{m}" for m in METHODS)):
        run_dir = out / "runs" / run
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(math.isfinite(r["loss"]) for r in rows), run
        assert (run_dir / "hf" / "config.json").exists() and (run_dir / "config.yaml").exists(), run
    steps = [json.loads(line) for line in (out / "runs" / "seed0" / "sod" / "steps.jsonl").read_text().splitlines()]
    weights = [s["w"] for r in steps for s in r["steps"]]
    assert weights and all(0.0 <= w <= 1.2 + 1e-6 for w in weights)
    samples = (out / "eval" / "seed0" / "teacher" / "samples.jsonl").read_text().splitlines()
    assert samples and all("text" in json.loads(line) for line in samples)


def test_quick_demo_table_is_the_runs_held_out_evaluations(quick_run):
    """The RL rows of the table are the held-out evaluations the runs logged after their last step, the
    held-out curves have one point per evaluation, and every sample behind them is on disk."""
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    k, preset = results["k"], results["preset"]
    for method in METHODS:
        run = out / "runs" / "seed0" / method
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in rows if f"val/average@{k}" in r]
        expected = list(range(preset["eval_every"], preset["rl_steps"] + 1, preset["eval_every"]))
        assert [r["step"] for r in val] == expected
        assert results["models"][method][f"average@{k}"]["per_seed"] == [val[-1][f"val/average@{k}"]]
        samples = [json.loads(line) for line in (run / "val_samples.jsonl").read_text().splitlines()]
        last = [x for x in samples if x["step"] == val[-1]["step"]]
        assert len(last) == preset["eval_problems"] * k
        assert sum(x["correct"] for x in last) / len(last) == pytest.approx(val[-1][f"val/average@{k}"])


def test_output_dir_is_refused_unless_it_is_a_demo_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(SystemExit, match="not a sodkern demo folder"):
        prepare_output_dir(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "user data"

    demo_dir = tmp_path / "demo"
    prepare_output_dir(demo_dir)
    (demo_dir / "runs").mkdir()
    (demo_dir / "results.md").write_text("old")
    prepare_output_dir(demo_dir)  # a previous demo's folder is emptied
    assert sorted(p.name for p in demo_dir.iterdir()) == [MARKER]


def _evals(sod: list[float], opd: list[float]) -> dict:
    def row(v: float) -> dict:
        return {"average@4": v, "pass@4": min(1.0, 2 * v), "mean_tool_calls": 2.0, "mean_response_tokens": 50.0}

    others = {name: {s: row(0.5) for s in range(len(sod))} for name in ("teacher", "cold-start", "grpo")}
    return {**others, "sod": {s: row(v) for s, v in enumerate(sod)}, "opd": {s: row(v) for s, v in enumerate(opd)}}


@pytest.mark.parametrize(
    ("sod", "opd", "expected"),
    [
        ([0.30], [0.40], "SOD did not beat OPD"),
        ([0.40], [0.40], "SOD did not beat OPD"),
        ([0.50], [0.40], "SOD beat OPD"),
        ([0.50, 0.30, 0.45], [0.40, 0.40, 0.40], "within the seed-to-seed spread"),
        ([0.50, 0.52, 0.55], [0.40, 0.41, 0.40], "SOD beat OPD"),
    ],
)
def test_verdict_reports_what_was_measured(sod, opd, expected):
    seeds = list(range(len(sod)))
    results = summarize_results(_evals(sod, opd), k=4, timings={}, wall_s=1.0, preset={}, seeds=seeds)
    assert expected in results["verdict"]
    diff = results["sod_minus_opd"]
    assert diff["per_seed"] == pytest.approx([a - b for a, b in zip(sod, opd)])


def test_pattern_counts():
    def rec(ws: list[float]) -> dict:
        return {"steps": [{"k": i + 1, "d": 0.1, "w": w} for i, w in enumerate(ws)]}

    records = [rec([1.0, 1.05, 0.95]), rec([1.0, 0.5, 0.3]), rec([1.0, 0.3, 1.1]), rec([1.0]), rec([1.0, 0.6, 0.75])]
    assert pattern_counts(records) == {"stable": 1, "erroneous": 1, "recovery": 1, "other": 1}
