"""Smoke test of the benchmark script: ``bench/run.py --preset tiny`` in a subprocess writes its JSON, Markdown
and PNG, with a row for every op x implementation x mode, peers that are not installed reported as missing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run.py"
PEERS = {"cut-cross-entropy": "cut_cross_entropy", "liger": "liger_kernel", "trl": "trl", "verl": "verl"}


def _has_backend_arg() -> bool:
    import inspect

    from sodkern.ops.linear_logprobs import linear_logprobs

    return "backend" in inspect.signature(linear_logprobs).parameters


def _run(args: list[str], out: Path, stem: str = "bench_tiny") -> dict:
    # the bench runs what a user runs: no forced backend, no Triton interpreter on CPU
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SODKERN_BACKEND")}
    proc = subprocess.run(
        [sys.executable, str(RUN), "--preset", "tiny", "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sodkern bench (tiny)" in proc.stdout  # the table is printed
    return json.loads((out / f"{stem}.json").read_text())


def test_tiny_preset_writes_all_rows(tmp_path: Path) -> None:
    result = _run(["--no-isolate"], tmp_path)
    rows, meta = result["rows"], result["meta"]
    assert meta["preset"] == "tiny" and meta["torch"] and meta["device"] and meta["date"]
    assert any(k.startswith("matmul") for k in meta["rates"]) and any(k.startswith("copy") for k in meta["rates"])

    seen = {(r["op"], r["impl"], r["mode"]) for r in rows}
    # 2 modes x (logprobs 8 impls + reverse_kl 6 + sod_loss 5) + 2 step-weight impls: every peer is a row
    assert len(seen) == len(rows) == 40
    for op, n in (("logprobs", 16), ("reverse_kl", 12), ("sod_loss", 10), ("step_weights", 2)):
        assert sum(r["op"] == op for r in rows) == n, op
    has_backend = _has_backend_arg()
    for r in rows:
        assert r["status"] == "ok" or r["status"].split(":")[0] in ("missing", "unsupported"), r
        peer = next((m for p, m in PEERS.items() if r["impl"].startswith(p)), None)
        if peer is not None and importlib.util.find_spec(peer) is None:
            assert r["status"].startswith("missing") and "pip install" in r["status"], r
        if r["impl"].startswith("verl linear_cross_entropy") and peer is not None:
            assert "CUDA only" in r["status"] or r["status"].startswith("missing"), r  # CPU
        must_run = r["impl"] in ("naive torch", "reference loop", "sodkern stepwise_weights")
        if r["impl"].startswith("sodkern") and r["impl"].endswith("(torch)"):
            must_run = has_backend
            if not has_backend:
                assert "no backend= argument" in r["status"], r
        if must_run:
            assert r["status"] == "ok", r
            assert r["time_s"] > 0 and r["max_err"] < 1e-4 and r["x_floor"] > 0, r
        if r["status"] == "ok":
            base = r["impl"] in ("naive torch", "reference loop")
            assert r["speedup"] is not None and (not base or r["speedup"] == 1.0), r

    md = (tmp_path / "bench_tiny.md").read_text()
    assert "| op | impl | shape | mode | status |" in md and "## sodkern's best against each peer" in md
    for r in rows:
        assert r["impl"] in md
    png = (tmp_path / "bench_tiny.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_isolated_workers_measure_peak_rss(tmp_path: Path) -> None:
    """The default CPU path: each job in a fresh worker process, peak RSS read from /proc."""
    rows = _run(["--ops", "step_weights"], tmp_path, "bench_tiny_step_weights")["rows"]
    assert [r["impl"] for r in rows] == ["reference loop", "sodkern stepwise_weights"]
    for r in rows:
        assert r["status"] == "ok", r
        if Path("/proc/self/clear_refs").exists():
            assert r["mem_bytes"] is not None and r["mem_bytes"] >= 0
    # ratios are reported, not asserted: timings on a shared CI machine are not a test
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0
