"""pytest-benchmark of TRL's fused LM head vs sodkern's (``pytest bench/test_bench_trl.py``; small CPU sizes).

Each case first checks log-probs, entropy and both gradients against a float64 reference, then is timed.
The full-size table (T = 8,192, V = 151,936, peak memory) is ``python bench/trl_integration.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("pytest_benchmark")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trl_integration import HEADS, head_error, head_fn, head_inputs, head_step  # noqa: E402

T, H, V = 512, 64, 8191


@pytest.mark.parametrize("impl", HEADS)
def test_fused_head_step(benchmark, impl):
    assert head_error(impl, 64, H, V) < 1e-4
    fn = head_fn(impl)
    hidden, weight, targets = head_inputs(T, H, V)

    def step():
        hidden.grad = weight.grad = None
        head_step(fn, hidden, weight, targets)

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
