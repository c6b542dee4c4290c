"""trainer/plot.py: step-weight patterns, example picking and the ``sodkern plot`` command."""

from __future__ import annotations

import json


def test_plot_patterns_and_curves(tmp_path):
    from sodkern.trainer.plot import classify_pattern, main, pick_examples

    assert classify_pattern([1.0, 1.05, 0.95, 1.1])[0] == "stable"
    assert classify_pattern([1.0, 0.6, 0.3, 0.25])[0] == "erroneous"
    assert classify_pattern([1.0, 0.4, 0.5, 1.1])[0] == "recovery"
    assert classify_pattern([1.0])[0] is None
    records = [
        {"step": 1, "uid": u, "sample": 0, "steps": [{"k": k + 1, "d": 0.1 / w, "w": w, "tokens": 5,
                                                      "span": [k * 8, k * 8 + 5]} for k, w in enumerate(ws)]}
        for u, ws in (("s", [1.0, 1.0, 0.9]), ("e", [1.0, 0.5, 0.2]), ("r", [1.0, 0.3, 1.2]))
    ]  # fmt: skip
    assert {p: r["uid"] for p, r in pick_examples(records).items()} == {
        "stable": "s",
        "erroneous": "e",
        "recovery": "r",
    }
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = [{"step": s, "loss": 1.0 / s, "reward/mean": -1 + 0.1 * s, "mean_w": 0.9} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    assert main([str(tmp_path)]) == 0
    for name in ("curves.png", "step_patterns.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
