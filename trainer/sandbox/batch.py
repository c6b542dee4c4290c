"""Running many snippets at once on a thread pool: shared by the local sandbox and the SandboxFusion client."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

from sodkern.trainer.sandbox.result import ExecResult


class ThreadedRunner:
    """``run_many`` over ``self.run`` on ``self.workers`` threads (created on first use, stopped by close)."""

    workers: int
    _thread_prefix = "sodkern-sandbox"

    def _init_pool(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def run(self, code: str, stdin: str | None = None) -> ExecResult:
        raise NotImplementedError

    def run_many(self, codes: list[str], stdins: list[str | None] | None = None) -> list[ExecResult]:
        """Run snippets in parallel on ``workers`` threads; results in the order of ``codes``."""
        stdins = [None] * len(codes) if stdins is None else list(stdins)
        if len(stdins) != len(codes):
            raise ValueError(f"run_many: stdins has {len(stdins)} entries for {len(codes)} codes")
        if not codes:
            return []
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self._thread_prefix)
        results: list[ExecResult | None] = [None] * len(codes)
        order = itertools.count()  # next() on it is atomic: each snippet is taken by exactly one worker

        def work() -> None:  # one task per worker for the whole batch, not one future per snippet
            while (i := next(order)) < len(codes):
                results[i] = self.run(codes[i], stdins[i])

        for task in [self._pool.submit(work) for _ in range(min(self.workers, len(codes)))]:
            task.result()
        return results  # type: ignore[return-value]

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
