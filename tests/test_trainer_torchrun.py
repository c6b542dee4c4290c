"""End-to-end trainer runs under ``torchrun --nproc_per_node=2`` on CPU (gloo), tiny random Qwen3 models.

Every algorithm trains a few steps: the loss is finite, the weights change, checkpoints are written, and the
exported HF folder loads with ``from_pretrained``. A SOD run killed with SIGKILL and resumed reproduces the
per-step losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"

# A reward that varies between samples (random tiny models never answer correctly), so GRPO advantages are
# not all zero and every algorithm gets a policy-gradient signal.
REWARD_MODULE = """
def reward(problem, response_text, sandbox=None):
    return 1.0 if len(response_text) % 2 else -1.0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from sodkern.trainer.demo.tiny import save_tiny

    root = tmp_path_factory.mktemp("trainer_e2e")
    save_tiny(root / "student", seed=0)
    save_tiny(root / "teacher", seed=1)
    (root / "tiny_reward.py").write_text(REWARD_MODULE)
    rows = [json.loads(line) for line in (FIXTURES / "verl_mixed.jsonl").read_text().splitlines()]
    for r in rows:
        r["extra_info"]["hint"] = "think about it step by step"
    (root / "hinted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root}


def torchrun(args: list[str], setup: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{setup['root']}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("SODKERN_BACKEND", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "sodkern.trainer.train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_ok(args: list[str], setup: dict, timeout: float = 300) -> str:
    proc = torchrun(args, setup)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def rl_args(algorithm: str, out: Path, setup: dict, *extra: str) -> list[str]:
    root = setup["root"]
    data = root / "hinted.jsonl" if algorithm == "opsd_hint" else FIXTURES / "verl_mixed.jsonl"
    return [
        "--config", str(REPO / "configs" / "tiny_rl.yaml"), f"algorithm={algorithm}", f"output_dir={out}",
        f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}", f"data.train_files=[{data}]",
        "rollout.reward_fn=tiny_reward:reward", *extra,
    ]  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            out += [int(child), *descendants(int(child))]
    return out


def losses(run: Path) -> dict[int, float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if r["step"] > 0}  # step 0: the evaluation before training


def check_run(run: Path, setup: dict, steps: int, rl: bool) -> None:
    """Finite losses, checkpoints written, HF export loadable and different from the initial student."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loss = losses(run)
    assert sorted(loss) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in loss.values()), loss
    metrics = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if m["step"] > 0]
    assert all(m["skipped"] == 0 for m in metrics)
    assert (run / "config.yaml").exists()
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts and all((c / "COMPLETE").exists() for c in ckpts)
    assert {p.name for p in ckpts[-1].iterdir()} >= {"COMPLETE", "trainer_rank0.pt", "trainer_rank1.pt"}
    if rl:
        for key in ("reward/mean", "accuracy", "mean_token_weight", "tool_calls/mean", "response_length/mean"):
            assert key in metrics[0]
        for key in ("time/rollout", "time/scoring", "time/update", "perf/tokens_per_s"):
            assert metrics[0][key] > 0
        records = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
        assert len(records) == 2 * 2 * steps  # 2 prompts x 2 samples per step
        assert all(r["steps"] and r["steps"][0]["tokens"] > 0 for r in records)

    exported = AutoModelForCausalLM.from_pretrained(run / "hf")
    initial = AutoModelForCausalLM.from_pretrained(setup["root"] / "student")
    AutoTokenizer.from_pretrained(run / "hf")
    changed = [n for n, p in exported.state_dict().items() if not torch.equal(p, initial.state_dict()[n])]
    assert len(changed) > len(exported.state_dict()) // 2, changed
    assert all(torch.isfinite(p).all() for p in exported.parameters())


def check_validation(run: Path, metrics: list[dict]) -> None:
    """eval.every=1 + before_train over 2 ranks: val metrics at steps 0, 1, 2 over all problems, equal to what
    the samples in val_samples.jsonl say."""
    problems = [json.loads(line) for line in (FIXTURES / "verl_mixed.jsonl").read_text().splitlines()]
    sources = {p["data_source"] for p in problems}
    samples = [json.loads(line) for line in (run / "val_samples.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val/average@2" in m] == [0, 1, 2]
    for m in (m for m in metrics if "val/average@2" in m):
        at_step = [s for s in samples if s["step"] == m["step"]]
        assert len(at_step) == 2 * len(problems)  # both ranks' shares, 2 samples each
        assert m["val/average@2"] == pytest.approx(sum(s["correct"] for s in at_step) / len(at_step))
        assert 0 <= m["val/average@2"] <= m["val/pass@2"] <= 1 and m["time/eval"] > 0
        if len(sources) > 1:
            assert all(f"val/{src}/average@2" in m for src in sources)


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        (
            "grpo",
            [f"eval.files=[{FIXTURES / 'verl_mixed.jsonl'}]", "eval.every=1", "eval.before_train=true", "eval.n=2"],
        ),  # held-out evaluation on both ranks
        ("opd", ["student.activation_checkpointing=true"]),
        ("opsd_gt", ["loss.distill=full_kl"]),  # dense variant, teacher = the student with the answer
        ("opsd_hint", []),
    ],
)
def test_rl_algorithm_trains(setup, tmp_path, algorithm, extra):
    run = tmp_path / algorithm
    run_ok(rl_args(algorithm, run, setup, *extra), setup)
    check_run(run, setup, steps=2, rl=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if any(a.startswith("eval.files") for a in extra):
        check_validation(run, metrics)
        metrics = [m for m in metrics if m["step"] > 0]
    records = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    if algorithm == "grpo":  # no teacher term: no weights, no divergences
        assert all(m["mean_token_weight"] == 0 for m in metrics)
        assert all(s["d"] is None and s["w"] is None for r in records for s in r["steps"])
    else:
        assert all(s["d"] is not None and s["d"] >= 0 for r in records for s in r["steps"])
    if algorithm == "opd":
        assert all(s["w"] == 1.0 for r in records for s in r["steps"])
    if "loss.distill=full_kl" in extra:
        assert all(math.isfinite(m["distill_loss"]) and m["distill_loss"] >= 0 for m in metrics)


def test_sft_trains(setup, tmp_path):
    run = tmp_path / "sft"
    root = setup["root"]
    run_ok(
        ["--config", str(REPO / "configs" / "tiny_sft.yaml"), f"output_dir={run}", f"student.path={root / 'student'}",
         f"data.train_files=[{FIXTURES / 'sft.jsonl'}]"],
        setup,
    )  # fmt: skip
    check_run(run, setup, steps=2, rl=False)
    loss = losses(run)
    assert loss[2] < loss[1]  # the same two trajectories every step: the NLL goes down


def test_sod_resume_after_sigkill_reproduces_losses(setup, tmp_path):
    steps = ["train.steps=4"]
    ref = tmp_path / "reference"
    run_ok(rl_args("sod", ref, setup, *steps), setup)
    check_run(ref, setup, steps=4, rl=True)
    records = [json.loads(line) for line in (ref / "steps.jsonl").read_text().splitlines()]
    assert all(s["d"] >= 0 and 0 < s["w"] <= 1.2 for r in records for s in r["steps"])

    run = tmp_path / "killed"
    proc = torchrun(rl_args("sod", run, setup, *steps), setup)
    marker = run / "checkpoints" / "step_00000001" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and its workers (in sessions of their own)
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    listing = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert marker.exists() and proc.returncode == -signal.SIGKILL, (proc.returncode, listing, out[-4000:])
    assert not (run / "checkpoints" / "step_00000004").exists(), "the run finished before it was killed"

    run_ok(rl_args("sod", run, setup, *steps), setup)  # checkpoint.resume=auto
    ref_loss, resumed = losses(ref), losses(run)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in ref_loss:
        assert resumed[step] == pytest.approx(ref_loss[step], rel=1e-5, abs=1e-7), (step, ref_loss, resumed)

    from sodkern.trainer.plot import main as plot_main

    assert plot_main([str(run)]) == 0
    assert (run / "plots" / "curves.png").stat().st_size > 0
    assert (run / "plots" / "step_patterns.png").stat().st_size > 0
