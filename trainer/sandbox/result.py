"""The outcome of one sandboxed snippet, shared by the local sandbox and the SandboxFusion client."""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

# which limit fired -> the error line the model reads
LIMIT_MESSAGES: dict[str, str] = {
    "timeout": "Error: the code ran past the wall-clock time limit and was stopped.",
    "cpu": "Error: the code used up its CPU-time limit and was stopped.",
    "memory": "Error: the code ran out of memory (the sandbox memory limit).",
    "fsize": "Error: the code tried to write a file larger than the sandbox file-size limit.",
    "nproc": "Error: the code started too many processes or threads (the sandbox process limit).",
    "output": "Error: the code printed more output than the sandbox keeps; the output was truncated.",
    "network": "Error: network access is disabled in the sandbox.",
}

# what a terminal would act on: C0 controls but tab and newline (ESC starts title, clipboard and clear-screen
# sequences; CR overwrites the line), DEL, C1 controls, and the bidirectional overrides that reorder text
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit|Interrupt))(?::\s?(.*))?$")


@dataclass
class ExecResult:
    """One snippet run.

    stdout, stderr: the captured streams, already truncated (with a marker line) to the sandbox's limit.
    exit_code: the process exit status; None when it was killed by a signal (see ``signal``) or never ran.
    wall_time: seconds from launch to exit.
    limit: which limit fired: "timeout" | "cpu" | "memory" | "fsize" | "nproc" | "output" | "network" | None.
    signal: the signal number that killed the process, if any.
    """

    stdout: str
    stderr: str
    exit_code: int | None
    wall_time: float
    limit: str | None
    signal: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit is None

    def observation(self) -> str:
        """The tool result shown to the model: stdout, then stderr, then an error line naming the limit."""
        parts = [text.rstrip("\n") for text in (self.stdout, self.stderr) if text.strip()]
        if self.limit is not None:
            parts.append(LIMIT_MESSAGES.get(self.limit, f"Error: sandbox limit '{self.limit}' reached."))
        elif self.signal is not None:
            parts.append(f"Error: the process was killed by {_signal_name(self.signal)}.")
        elif self.exit_code not in (0, None) and not self.stderr.strip():
            parts.append(f"Error: the process exited with status {self.exit_code}.")
        return "\n".join(parts)


def escape_control(text: str) -> str:
    """Text safe to print to a terminal: control characters (but tab and newline) become visible escapes,
    e.g. ESC -> ``\\x1b``, U+202E -> ``\\u202e``. For display only: the model's observation keeps the text."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def truncate(data: bytes, total: int, max_chars: int) -> str:
    """Decode the kept head of a stream (``total`` bytes were written) and cut it to ``max_chars``."""
    text = data.decode("utf-8", errors="replace")
    if len(text) <= max_chars and total <= len(data):
        return text
    return text[:max_chars] + f"\n[output truncated: {total:,} bytes written, first {max_chars:,} characters shown]\n"


def last_exception(stderr: str) -> tuple[str, str] | None:
    """(exception class name, message) of the last ``Name...Error: message`` line of ``stderr``, if any."""
    for line in reversed(stderr.splitlines()):
        match = _EXC_LINE.match(line.strip())
        if match:
            return match.group(1), match.group(2) or ""
    return None


def classify(
    stderr: str, *, signum: int | None, cpu_time: float | None = None, cpu_limit: float | None = None
) -> str | None:
    """Which limit (if any) explains a process that ended by itself with this stderr and signal."""
    if signum == signal.SIGXCPU:
        return "cpu"
    if signum == signal.SIGXFSZ:
        return "fsize"
    if signum == signal.SIGKILL:  # not sent by us: the CPU hard limit, else the kernel's OOM killer
        return "cpu" if cpu_time is not None and cpu_limit is not None and cpu_time >= cpu_limit else "memory"
    if stderr.startswith("sodkern-sandbox:") and "Resource temporarily unavailable" in stderr:
        return "nproc"  # execve after the user switch fails with EAGAIN when the user is at RLIMIT_NPROC
    exc = last_exception(stderr)
    if exc is None:
        return None
    name, message = exc
    if name.endswith("MemoryError"):
        return "memory"
    if "[Errno 27]" in message or "File too large" in message:
        return "fsize"
    if name == "BlockingIOError" and "[Errno 11]" in message:
        return "nproc"
    if name == "PermissionError" and "[Errno 1]" in message and "socket" in stderr:
        return "network"
    return None
