"""Static Hopper check: every Triton kernel and launch configuration compiles for sm_90 (no GPU needed),
without register spills (beyond ``KNOWN_SPILLS`` in ``bench/sm90.py``) and within 227 KiB of shared memory.

The report (registers, spills, shared memory per kernel and configuration) is printed into the test output;
``python bench/sm90.py`` writes the committed copy, ``bench/results/sm90_compile.{md,json}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton.backends.nvidia", reason="the sm_90 check needs Triton's NVIDIA backend (ptxas)")


def test_every_kernel_compiles_for_sm90(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the kernels must be JIT functions, not the interpreter's (tests/conftest.py sets TRITON_INTERPRET)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sm90.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=ROOT,
    )
    with capsys.disabled():
        print("\n" + proc.stdout)
    assert (tmp_path / "sm90_compile.md").exists(), proc.stderr[-3000:]
    result = json.loads((tmp_path / "sm90_compile.json").read_text())
    rows = result["rows"]
    assert rows and not result["uncovered"], f"kernels never compiled: {result['uncovered']}"
    for r in rows:
        assert r["registers"] > 0 and r["num_warps"] in (1, 2, 4, 8, 16), r
        assert r["shared_bytes"] <= result["meta"]["smem_limit_bytes"], r
        spills = r["spill_stores"] + r["spill_loads"]
        assert spills == 0 or all(p.endswith("(known)") for p in r["problems"]), r
    assert not result["stale_known_spills"], "these kernels no longer spill: drop them from KNOWN_SPILLS"
    assert result["ok"] and proc.returncode == 0, proc.stderr[-3000:]
