"""Client of a running SandboxFusion service (https://github.com/bytedance/SandboxFusion), POST /run_code.

Request: ``{"code", "language": "python", "run_timeout", "memory_limit_MB", "stdin"}``. Response:
``{"status": "Success" | "Failed" | "SandboxError", "message", "run_result": {"status": "Finished" | "Error" |
"TimeLimitExceeded", "execution_time", "return_code", "stdout", "stderr"}, ...}``. The service applies its
own isolation; this client only maps the answer onto ExecResult and never raises for a failed request.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

from sodkern.trainer.sandbox.batch import ThreadedRunner
from sodkern.trainer.sandbox.result import ExecResult, classify, truncate

logger = logging.getLogger(__name__)


class SandboxFusionClient(ThreadedRunner):
    """Runs snippets on a SandboxFusion server at ``url`` (e.g. "http://localhost:8080").

    timeout: the service's run_timeout in seconds. memory_mb: its memory_limit_MB. max_output_chars: kept per
    stream. workers: concurrent requests of ``run_many`` (default 32). retries: extra attempts after a
    connection error or an HTTP 5xx, with a short backoff. The HTTP request itself may take the run timeout
    plus ``request_slack`` seconds.
    """

    _thread_prefix = "sodkern-fusion"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        max_output_chars: int = 8192,
        workers: int | None = None,
        retries: int = 2,
        request_slack: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/") + "/run_code"
        self.timeout = float(timeout)
        self.memory_mb = int(memory_mb)
        self.max_output_chars = int(max_output_chars)
        self.workers = workers or 32
        self.retries = int(retries)
        self.request_slack = float(request_slack)
        self._init_pool()

    def run(self, code: str, stdin: str | None = None) -> ExecResult:
        """Run one snippet on the service; a request that keeps failing comes back as an error result."""
        payload = {
            "code": code,
            "language": "python",
            "run_timeout": self.timeout,
            "memory_limit_MB": self.memory_mb,
            "stdin": stdin if stdin is not None else "",
        }
        body = json.dumps(payload).encode()
        start = time.monotonic()
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2**attempt, 5.0))
            request = urllib.request.Request(
                self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout + self.request_slack) as response:
                    answer = json.loads(response.read().decode("utf-8"))
                return self._result(answer, time.monotonic() - start)
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} {exc.reason}"
                if exc.code < 500:
                    break
            except (urllib.error.URLError, OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        logger.warning("SandboxFusion request to %s failed: %s", self.url, error)
        return ExecResult("", f"Sandbox error: request to {self.url} failed: {error}", None, 0.0, None)

    def close(self) -> None:
        self._close_pool()

    def _result(self, answer: dict, elapsed: float) -> ExecResult:
        run = answer.get("run_result") or {}
        if answer.get("status") == "SandboxError" or not run:
            message = answer.get("message") or "no run_result in the response"
            return ExecResult("", f"Sandbox error: {message}", None, elapsed, None)
        stdout_text, stderr_text = run.get("stdout") or "", run.get("stderr") or ""
        stdout = truncate(stdout_text.encode(), len(stdout_text.encode()), self.max_output_chars)
        stderr = truncate(stderr_text.encode(), len(stderr_text.encode()), self.max_output_chars)
        return_code = run.get("return_code")
        signum = -return_code if return_code is not None and return_code < 0 else None
        if run.get("status") == "TimeLimitExceeded":
            limit = "timeout"
        else:
            limit = classify(stderr, signum=signum)
            if limit is None and (stdout != stdout_text or stderr != stderr_text):
                limit = "output"
        exit_code = return_code if return_code is not None and return_code >= 0 else None
        wall = run.get("execution_time")
        return ExecResult(stdout, stderr, exit_code, float(wall) if wall is not None else elapsed, limit, signum)
