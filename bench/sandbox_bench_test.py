"""pytest-benchmark version of bench/sandbox_bench.py (``pytest bench/sandbox_bench_test.py``, about a minute).

Times ``run_many`` of 40 trivial snippets on the fork server and on the per-interpreter native launcher; each
round first checks every output.
"""

from __future__ import annotations

import pytest

from sodkern.trainer.sandbox import LocalSandbox

CODES = [f"print({i})" for i in range(40)]
EXPECTED = [f"{i}\n" for i in range(40)]


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "per-interpreter"])
def test_run_many_trivial(benchmark, fork_server):
    with LocalSandbox(timeout=10, fork_server=fork_server) as sandbox:
        assert sandbox.fork_server == fork_server
        sandbox.run_many(CODES[: 2 * sandbox.workers])  # start every slot

        def run() -> list[str]:
            return [r.stdout for r in sandbox.run_many(CODES)]

        assert benchmark.pedantic(run, rounds=3, iterations=1) == EXPECTED
        benchmark.extra_info["snippets_per_s"] = len(CODES) / benchmark.stats.stats.median
