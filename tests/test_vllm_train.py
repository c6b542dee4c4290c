"""A tiny CPU SOD training run with ``rollout.engine: vllm`` (real vLLM), next to the same run on the HF engine.

The vLLM run must complete with finite losses, push the updated weights into the engine before every rollout
(the logged engine-vs-trainer log-prob gap stays at kernel-noise level, which it would not with stale weights),
and log rollout tokens/s for comparison with the HF engine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[1]
REWARD_MODULE = """
def reward(problem, response_text, sandbox=None):
    return 1.0 if len(response_text) % 2 else -1.0
"""


def train(root: Path, engine: str) -> list[dict]:
    out = root / f"run_{engine}"
    args = [
        "--config", str(REPO / "configs" / "tiny_rl.yaml"), "algorithm=sod", f"output_dir={out}",
        f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
        f"data.train_files=[{REPO / 'tests' / 'fixtures' / 'verl_mixed.jsonl'}]",
        "rollout.reward_fn=tiny_reward:reward",
        f"rollout.engine={engine}", "rollout.max_response_tokens=48", "data.batch_size=2", "train.steps=3",
        "checkpoint.every=0", "checkpoint.export_hf=false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("SODKERN_BACKEND", None)
    cmd = [sys.executable, "-m", "sodkern.trainer.cli", "train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sod_training_with_vllm_rollouts(tmp_path):
    from sodkern.trainer.demo.tiny import save_tiny

    save_tiny(tmp_path / "student", seed=0)
    save_tiny(tmp_path / "teacher", seed=1)
    (tmp_path / "tiny_reward.py").write_text(REWARD_MODULE)
    runs = {engine: train(tmp_path, engine) for engine in ("vllm", "hf")}
    for engine, metrics in runs.items():
        assert [m["step"] for m in metrics] == [1, 2, 3], engine
        assert all(math.isfinite(m["loss"]) and m["skipped"] == 0 for m in metrics), engine
    for m in runs["vllm"]:
        # the trainer's recomputed old log-probs agree with vLLM's rollout log-probs at every step, so the
        # engine generated with the current (updated) weights
        assert m["rollout/logprob_diff_abs_mean"] < 1e-3, m
    speed = {e: sum(m["rollout/tokens_per_s"] for m in ms[1:]) / (len(ms) - 1) for e, ms in runs.items()}
    print(f"rollout tokens/s (steps 2-3): vllm {speed['vllm']:.1f}, hf {speed['hf']:.1f}")
