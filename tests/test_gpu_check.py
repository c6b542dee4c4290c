"""``bench/gpu_check.py --dry-run``: the one-command GPU check runs end to end on CPU at tiny shapes (install via
pip's dry run, the CUDA tests (skipped), the bench per op, two SOD trainer steps, the summary), so it cannot rot
before the next GPU session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1800)  # ~4 minutes on an idle 2-core box; more when it is shared
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SODKERN_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1700,
        cwd=ROOT,
    )
    assert "[gpu_check" in proc.stdout  # progress lines
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == [
        "install", "tests", "bench_logprobs", "bench_reverse_kl", "bench_sod_loss", "bench_step_weights", "trainer",
    ]  # fmt: skip
    for s in stages.values():
        assert s["status"] == "ok", (s["name"], s["status"], s["log"][-2000:])
        assert 0 < s["seconds"] <= s["budget"], s["name"]
    assert proc.returncode == 0 and summary["meta"]["ok"] and summary["meta"]["dry_run"]

    rows = summary["bench_rows"]
    assert {r["op"] for r in rows} == {"logprobs", "reverse_kl", "sod_loss", "step_weights"}
    assert any(r["impl"] == "naive torch" and r["status"] == "ok" for r in rows)
    trainer = summary["trainer"]
    assert trainer["steps"] == 2
    for r in trainer["rows"]:
        assert r["response_length/mean"] > 0 and r["time/step"] > 0
        assert r["loss"] == r["loss"]  # finite, not NaN

    md = (out / "summary.md").read_text()
    assert "result: PASS" in md and "## Bench" in md and "## Trainer smoke (two SOD steps)" in md
    assert (out / "logs" / "trainer.log").exists()


def test_budgets_fit_eight_minutes() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import BUDGETS

    assert sum(BUDGETS.values()) <= 480 - 5  # the summary's reserve
