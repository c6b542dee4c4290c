"""Run untrusted Python snippets locally, each in a fresh, locked-down process.

Every snippet gets its own process, started through the native launcher ``sodkern-sandbox`` (launcher.c):
a wall-clock timeout (enforced here), RLIMIT_CPU / AS / FSIZE / NPROC / NOFILE, a private work directory that
is removed afterwards, an environment with none of the trainer's variables, a process group of its own that
is killed as a whole when the snippet ends or times out (the launcher stays as its supervisor and reaps every
process of it), PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, user ``nobody`` when the trainer is root, Landlock
(writes only inside the work directory, reads only in system directories and the interpreter's install; on
ABI >= 6 no signals to processes outside the sandbox) and a seccomp filter (no sockets, no ptrace, no
namespaces, ...: see launcher.c). Output is read as it comes and only a bounded head of each stream is kept.

Without the native launcher, a pure-Python one (_pylaunch.py) applies the limits and the user switch only,
and a warning says once that network isolation is off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

from sodkern.trainer.sandbox.launch import (
    LAUNCHER_NAME,
    PYLAUNCH,
    find_launcher,
    probe_launcher,
    sandbox_ids,
    snippet_python,
    user_tasks,
    world_reachable,
)
from sodkern.trainer.sandbox.result import ExecResult, classify, truncate

logger = logging.getLogger(__name__)

_NOFILE = 512
_DRAIN_S = 1.0  # after the kill: how long to wait for the pipes to reach EOF
_GRACE_S = 2.0  # how long the native launcher gets to clean up after SIGTERM
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        logger.warning(message)


class LocalSandbox:
    """Runs Python snippets in fresh sandboxed processes on this machine; never raises for what a snippet does.

    timeout: wall-clock seconds per snippet. cpu_seconds: RLIMIT_CPU. memory_mb: RLIMIT_AS (address space).
    max_output_chars: kept per stream (stdout, stderr); a snippet that writes 64x that much is stopped.
    max_processes: processes and threads per snippet. The kernel's RLIMIT_NPROC counts every task of a user,
    so it is set to ``max_processes * workers`` (snippets running at once share the user) plus, when the
    trainer is not root, the tasks its user already runs. max_file_mb: RLIMIT_FSIZE. workers: threads of
    ``run_many`` (default: twice the CPU count, at most 64; launching is partly I/O-bound, but CPU-heavy
    snippets then share cores and reach the wall-clock limit sooner). native: use the native launcher
    (True), the Python one (False) or auto (None; SODKERN_SANDBOX_NATIVE=0 forces the Python one). user: who
    runs the snippets when the trainer is root (None: the trainer's user, contained by Landlock and seccomp
    only; RLIMIT_NPROC does not bind root).
    """

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        cpu_seconds: int = 10,
        memory_mb: int = 1024,
        max_output_chars: int = 8192,
        max_processes: int = 64,
        max_file_mb: int = 16,
        workers: int | None = None,
        native: bool | None = None,
        user: str | int | None = "nobody",
    ) -> None:
        self.timeout = float(timeout)
        self.cpu_seconds = int(cpu_seconds)
        self.memory_mb = int(memory_mb)
        self.max_output_chars = int(max_output_chars)
        self.max_processes = int(max_processes)
        self.max_file_mb = int(max_file_mb)
        self.workers = workers or min(64, 2 * (os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.ids = sandbox_ids(user) if os.geteuid() == 0 and user is not None else None
        self._nproc = self.max_processes * self.workers + (0 if self.ids is not None else user_tasks())
        if native is None:
            native = os.environ.get("SODKERN_SANDBOX_NATIVE", "1") != "0"
        self.launcher = find_launcher() if native else None
        self.features = probe_launcher(self.launcher) if self.launcher else {}
        if self.launcher and not self.features.get("seccomp"):
            self.launcher = None
        self._python_setup()
        self._warn_about_isolation(native)

    # ---- setup ---------------------------------------------------------------------------------------

    def _python_setup(self) -> None:
        can_expose = self.launcher is not None and bool(self.features.get("mountns"))
        python = snippet_python(switch_user=self.ids is not None, can_expose=can_expose)
        self._python, self._env, self.read_paths = python.argv, python.env, python.read_paths
        self._expose = python.expose
        self._fds = python.fds
        self._release = weakref.finalize(self, _close_fds, self._fds)  # runs once: close() or collection
        self._tmp_root = tempfile.gettempdir()
        if self.ids is not None and not world_reachable(self._tmp_root):
            self._tmp_root = "/tmp"

    def _warn_about_isolation(self, native_requested: bool) -> None:
        if self.launcher is None:
            why = "forced by native=False / SODKERN_SANDBOX_NATIVE=0" if not native_requested else "not usable"
            extra = "" if self.ids is not None else "; snippets run as the trainer's user and can act as it"
            _warn_once(
                "fallback",
                f"sodkern sandbox: native launcher {LAUNCHER_NAME} {why} (rebuild with `pip install -e .`); "
                f"using the pure-Python launcher: NETWORK ISOLATION IS OFF and there is no seccomp filter{extra}.",
            )
        elif self.ids is None and not self.features.get("landlock"):
            _warn_once(
                "landlock",
                "sodkern sandbox: snippets run as the trainer's user and the kernel has no Landlock: they can "
                "write wherever that user can (run the trainer as root to have them run as nobody).",
            )

    def _argv(self, workdir: str) -> list[str]:
        options = [
            "--cpu", str(self.cpu_seconds),
            "--memory", str(self.memory_mb << 20),
            "--fsize", str(self.max_file_mb << 20),
            "--nproc", str(self._nproc),
            "--nofile", str(_NOFILE),
            "--ppid", str(os.getpid()),
        ]  # fmt: skip
        if self.ids is not None:
            options += ["--uid", str(self.ids[0]), "--gid", str(self.ids[1])]
        if self.launcher is not None:
            options += ["--write", workdir, "--write", "/dev/null"]
            for path in self._expose:
                options += ["--expose", path]
            for path in self.read_paths:
                options += ["--read", path]
            return [self.launcher, *options, "--", *self._python]
        return [sys.executable, "-I", "-S", PYLAUNCH, *options, "--", *self._python]

    def _environment(self, workdir: str) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1",  # BLAS thread pools count against RLIMIT_NPROC and RLIMIT_AS
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "MALLOC_ARENA_MAX": "2",
            "MPLBACKEND": "Agg",
            "MPLCONFIGDIR": workdir,
            **self._env,
        }

    # ---- running -------------------------------------------------------------------------------------

    def run(self, code: str, stdin: str | None = None) -> ExecResult:
        """Run one snippet (Python source) with optional stdin text; failures come back as an ExecResult."""
        try:
            return self._run(code, stdin)
        except Exception as exc:  # a sandbox-side failure (disk full, ...): the caller must survive it
            logger.exception("sandbox failure")
            return ExecResult("", f"Sandbox error: {type(exc).__name__}: {exc}", None, 0.0, None)

    def run_many(self, codes: list[str], stdins: list[str | None] | None = None) -> list[ExecResult]:
        """Run snippets in parallel on ``workers`` threads; results in the order of ``codes``."""
        stdins = [None] * len(codes) if stdins is None else list(stdins)
        if len(stdins) != len(codes):
            raise ValueError(f"run_many: stdins has {len(stdins)} entries for {len(codes)} codes")
        if not codes:
            return []
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sodkern-sandbox")
        return list(self._pool.map(self.run, codes, stdins))

    def close(self) -> None:
        """Stop the worker threads and release the interpreter descriptors."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._release()

    def __enter__(self) -> LocalSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, code: str, stdin: str | None) -> ExecResult:
        workdir = tempfile.mkdtemp(prefix="sodkern-sbx-", dir=self._tmp_root)
        try:
            main = os.path.join(workdir, "main.py")
            with open(main, "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(code)
            if self.ids is not None:
                os.chown(workdir, *self.ids)
                os.chown(main, *self.ids)
            with tempfile.TemporaryFile() as stdin_file:
                if stdin is not None:
                    stdin_file.write(stdin.encode("utf-8", errors="replace"))
                    stdin_file.seek(0)
                start = time.monotonic()
                proc = subprocess.Popen(
                    self._argv(workdir),
                    stdin=stdin_file if stdin is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=workdir,
                    env=self._environment(workdir),
                    start_new_session=True,
                    pass_fds=self._fds,
                )
            return self._wait(proc, start)
        finally:
            _remove_tree(workdir)

    def _wait(self, proc: subprocess.Popen, start: float) -> ExecResult:
        keep = 4 * self.max_output_chars + 4  # bytes kept per stream (UTF-8: at most 4 bytes a character)
        hard_cap = max(1 << 20, 64 * self.max_output_chars)  # total bytes after which the snippet is stopped
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        streams = {out_fd: bytearray(), err_fd: bytearray()}
        totals = dict.fromkeys(streams, 0)
        sel = selectors.DefaultSelector()
        for fd in streams:
            sel.register(fd, selectors.EVENT_READ)
        pidfd = _pidfd_open(proc.pid)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)

        def read(fd: int) -> None:
            data = os.read(fd, 1 << 16)
            if not data:
                sel.unregister(fd)
                return
            totals[fd] += len(data)
            room = keep - len(streams[fd])
            if room > 0:
                streams[fd] += data[:room]

        reason = None
        deadline = start + self.timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reason = "timeout"
                    break
                exited = False
                for key, _ in sel.select(remaining if pidfd is not None else min(remaining, 0.02)):
                    if key.fd == pidfd:
                        exited = True
                    else:
                        read(key.fd)
                if exited or (pidfd is None and _has_exited(proc.pid)):
                    break
                if sum(totals.values()) > hard_cap:
                    reason = "output"
                    break
            end = time.monotonic()
            if reason is not None and self.launcher is not None:
                # the native launcher SIGKILLs the snippet's process group, reaps it and exits
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                _await_exit(proc.pid, pidfd, _GRACE_S)
            # a backstop for the native launcher; with the Python one: the snippet and what it left running
            _kill_group(proc.pid)
            if pidfd is not None:
                sel.unregister(pidfd)
            drain_deadline = time.monotonic() + _DRAIN_S
            while sel.get_map() and time.monotonic() < drain_deadline:
                for key, _ in sel.select(max(0.0, drain_deadline - time.monotonic())):
                    read(key.fd)
        finally:
            sel.close()
            if pidfd is not None:
                os.close(pidfd)
            proc.stdout.close()
            proc.stderr.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)

        stdout = truncate(bytes(streams[out_fd]), totals[out_fd], self.max_output_chars)
        stderr = truncate(bytes(streams[err_fd]), totals[err_fd], self.max_output_chars)
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        limit = reason or classify(
            stderr, signum=signum, cpu_time=usage.ru_utime + usage.ru_stime, cpu_limit=self.cpu_seconds
        )
        if limit is None and (len(stdout) > self.max_output_chars or len(stderr) > self.max_output_chars):
            limit = "output"
        exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        return ExecResult(stdout, stderr, exit_code, end - start, limit, signum)


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3: poll with waitid instead
        return None


def _has_exited(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _await_exit(pid: int, pidfd: int | None, timeout: float) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [], timeout)
        return
    deadline = time.monotonic() + timeout
    while not _has_exited(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _close_fds(fds: list[int]) -> None:
    while fds:
        fd = fds.pop()
        with contextlib.suppress(OSError):
            os.close(fd)


def _remove_tree(path: str) -> None:
    """Remove a work dir; the snippet may have left read-only directories in it (non-root case)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError:
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
        shutil.rmtree(path, ignore_errors=True)
