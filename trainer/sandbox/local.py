"""Run untrusted Python snippets locally, each isolated from the host and from every other snippet.

The default path is a pool of fork servers (forkserver.py, one per worker slot, isolation in jail.c through
ctypes). Each server is PID 1 of its own PID, IPC, mount and network namespaces behind a read-only root holding
only the system directories and the interpreter's install, in the slot's memory + pids cgroup where cgroups can
be created, and imports Python's common modules once (numpy and the larger standard modules only on the
servers that run snippets naming them, PRELOAD_IF_NAMED). Each snippet is a fork of its slot's server on a
fresh size-capped tmpfs work dir (/tmp) and /dev/shm, with a uid of its own (root trainer) or in a user
namespace (otherwise), rlimits, Landlock and its share of the seccomp filter of isolation.c; it sees, signals
and traces no other process, and the server kills and reaps whatever it left before it answers. A wall-clock
timeout is enforced by the server, an output flood is stopped here.

``fork_server=False`` starts a fresh interpreter per snippet through the native launcher ``sodkern-sandbox``
(launcher.c: rlimits, user ``nobody``, Landlock, seccomp; no namespaces): the old path, slower and weaker
between snippets. The pure-Python launcher (_pylaunch.py: rlimits and the user switch only, no network
isolation) runs only when asked for by name: ``allow_weak=True`` or ``SODKERN_SANDBOX_ALLOW_WEAK=1``;
otherwise a missing launcher is an error that says how to build it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
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

from sodkern.trainer.sandbox import cgroups
from sodkern.trainer.sandbox.batch import ThreadedRunner
from sodkern.trainer.sandbox.launch import (
    LAUNCHER_NAME,
    PYLAUNCH,
    find_launcher,
    probe_launcher,
    sandbox_ids,
    server_reads,
    site_dirs,
    snippet_python,
    user_tasks,
    world_reachable,
)
from sodkern.trainer.sandbox.result import ExecResult, classify, truncate
from sodkern.trainer.sandbox.server import JAIL_NAME, UID_BASE, ForkServer, SandboxUnavailable, find_jail

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


ALLOW_WEAK_ENV = "SODKERN_SANDBOX_ALLOW_WEAK"
# imported once per fork server, so that snippets using them start at once (missing ones are skipped)
PRELOAD = (
    "math", "re", "json", "itertools", "collections", "functools", "random", "heapq", "bisect", "string",
    "traceback", "io", "threading",
)  # fmt: skip
# Imported only by the fork servers that run snippets naming one of them (those servers import PRELOAD too).
# A fork copies the server's page tables and a snippet's exit tears its copy down: numpy's pages and mappings
# (as many as all the rest) cost every snippet on a server that has it ~0.5 ms of CPU here, a quarter of a
# trivial snippet, and the larger standard modules another ~0.3 ms, while a snippet that uses numpy on a
# server without it would spend ~100 ms importing it. So there are two kinds of servers.
PRELOAD_IF_NAMED = ("numpy", "fractions", "decimal", "statistics", "datetime", "typing", "dataclasses")


class LocalSandbox(ThreadedRunner):
    """Runs Python snippets in isolated processes on this machine; never raises for what a snippet does.

    timeout: wall-clock seconds per snippet. cpu_seconds: RLIMIT_CPU. memory_mb: the snippet's memory: the slot's
    cgroup limit (all its processes, its tmpfs work dir, /dev/shm and memfds) where cgroups can be made, and
    RLIMIT_AS on top of what the fork server already maps. max_output_chars: kept per stream (stdout, stderr); a
    snippet that writes 64x that much is stopped. max_processes: processes and threads per snippet (its pids
    cgroup and RLIMIT_NPROC of its own uid; without a uid of its own RLIMIT_NPROC counts the user's tasks, so it
    is ``max_processes * workers`` plus those). max_file_mb: RLIMIT_FSIZE. max_workdir_mb, max_shm_mb: sizes of
    the work dir (/tmp) and /dev/shm tmpfs. workers: slots of ``run_many`` (default: twice the CPU count, at most
    64). fork_server: pre-started servers (True) or a new interpreter per snippet (False). native: the native
    launcher (True/None) or the weak Python one (False; SODKERN_SANDBOX_NATIVE=0). allow_weak: permit the weak
    Python launcher (None: the SODKERN_SANDBOX_ALLOW_WEAK=1 environment variable); without it, a missing launcher
    raises SandboxUnavailable. user: who runs snippets on the per-interpreter path when the trainer is root.
    preload: modules each fork server imports once. preload_if_named: modules imported only by the fork servers
    that run snippets whose source names one of them (a second pool of servers). user_namespace: fork servers in a
    user namespace (None: when the trainer is not root; True as root runs the non-root path, e.g. to test it).
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
        max_workdir_mb: int = 64,
        max_shm_mb: int = 16,
        workers: int | None = None,
        fork_server: bool = True,
        native: bool | None = None,
        allow_weak: bool | None = None,
        user: str | int | None = "nobody",
        preload: tuple[str, ...] = PRELOAD,
        preload_if_named: tuple[str, ...] = PRELOAD_IF_NAMED,
        user_namespace: bool | None = None,
    ) -> None:
        self.timeout = float(timeout)
        self.cpu_seconds = int(cpu_seconds)
        self.memory_mb = int(memory_mb)
        self.max_output_chars = int(max_output_chars)
        self.max_processes = int(max_processes)
        self.max_file_mb = int(max_file_mb)
        self.max_workdir_mb = int(max_workdir_mb)
        self.max_shm_mb = int(max_shm_mb)
        self.workers = workers or min(64, 2 * (os.cpu_count() or 1))
        self.preload = tuple(preload)
        self.preload_if_named = tuple(preload_if_named)
        self.user_namespace = os.geteuid() != 0 if user_namespace is None else bool(user_namespace)
        self._init_pool()
        # idle servers by kind: False, the preload modules; True, also preload_if_named
        self._servers: dict[bool, queue.LifoQueue[ForkServer]] = {False: queue.LifoQueue(), True: queue.LifoQueue()}
        self._stop_servers = weakref.finalize(self, _close_servers, self._servers)  # close() or collection
        self._nservers = 0
        self._slots = threading.Semaphore(self.workers)
        self._server_lock = threading.Lock()
        self._serial = 0
        self.ids = sandbox_ids(user) if os.geteuid() == 0 and user is not None else None
        self._nproc = self.max_processes * self.workers + (0 if self.ids is not None else user_tasks())
        if allow_weak is None:
            allow_weak = os.environ.get(ALLOW_WEAK_ENV, "0") == "1"
        if native is None:
            native = os.environ.get("SODKERN_SANDBOX_NATIVE", "1") != "0"
        self.launcher = find_launcher() if native else None
        self.features = probe_launcher(self.launcher) if self.launcher else {}
        if self.launcher and not self.features.get("seccomp"):
            self.launcher = None
        if self.launcher is None and not allow_weak:
            weak = (
                f"set {ALLOW_WEAK_ENV}=1 (LocalSandbox(allow_weak=True)) to run snippets under the weak "
                "pure-Python launcher (no network isolation)"
            )
            if not native:
                fix = "use the native one (native=None, SODKERN_SANDBOX_NATIVE unset) or " + weak
                raise SandboxUnavailable(
                    f"sodkern sandbox: the Python launcher was asked for without allow_weak: {fix}"
                )
            raise SandboxUnavailable(
                f"sodkern sandbox: the native launcher {LAUNCHER_NAME} is not built: build it with a C compiler and "
                f"`pip install --no-build-isolation -e .`, or {weak}"
            )
        self._python_setup()
        self.jail = find_jail() if self.launcher is not None and fork_server else None
        self.fork_server = False
        if self.jail is not None:
            try:
                self._release_server(self._acquire_server())  # fails here, not on the first snippet
                self.fork_server = True
            except SandboxUnavailable as exc:
                _warn_once("forkserver", f"sodkern sandbox: fork server unavailable ({exc}); using one "
                           f"{LAUNCHER_NAME} process per snippet (no namespaces between snippets)")  # fmt: skip
        elif self.launcher is not None and fork_server:
            _warn_once("forkserver", f"sodkern sandbox: {JAIL_NAME} not built; one {LAUNCHER_NAME} process per "
                       "snippet (rebuild with `pip install --no-build-isolation -e .`)")  # fmt: skip
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
            why = "not asked for" if not native_requested else "not built"
            extra = "" if self.ids is not None else "; snippets run as the trainer's user and can act as it"
            _warn_once(
                "fallback",
                f"sodkern sandbox: native launcher {LAUNCHER_NAME} {why}; using the weak pure-Python launcher "
                f"as asked ({ALLOW_WEAK_ENV}=1 / allow_weak=True): NETWORK ISOLATION IS OFF and there is no "
                f"seccomp filter{extra}.",
            )
        elif not self.fork_server and self.ids is None and not self.features.get("landlock"):
            _warn_once(
                "landlock",
                "sodkern sandbox: snippets run as the trainer's user and the kernel has no Landlock: they can "
                "write wherever that user can (run the trainer as root to have them run as nobody).",
            )

    def _server_config(self, heavy: bool) -> dict:
        root = not self.user_namespace
        limits = {
            "uid": -1, "gid": -1,
            "work_bytes": self.max_workdir_mb << 20, "shm_bytes": self.max_shm_mb << 20, "inodes": 1 << 14,
            "cpu": self.cpu_seconds, "as": self.memory_mb << 20, "fsize": self.max_file_mb << 20,
            "nproc": self.max_processes if root else self._nproc, "nofile": _NOFILE,
        }  # fmt: skip
        env = {k: v for k, v in self._environment("/tmp").items() if k not in ("HOME", "TMPDIR", "MPLCONFIGDIR")}
        return {
            "lib": self.jail,
            "site_dirs": site_dirs(),
            "preload": [*self.preload, *(self.preload_if_named if heavy else ())],
            "reads": server_reads(),
            "unprivileged": not root,
            "uid_base": UID_BASE if root else None,
            "limits": limits,
            "env": env,
            "timeout": self.timeout,
        }

    def _start_server(self, heavy: bool) -> ForkServer:
        with self._server_lock:
            self._serial += 1
            name = f"{os.getpid()}-{id(self):x}-{self._serial}"
        # the server itself is in the slot's cgroups (one more task; the pages it copies after joining, and the
        # snippet's tmpfs work dir and /dev/shm, on top of the snippet's memory)
        group = cgroups.create(name, (self.memory_mb + self.max_workdir_mb + self.max_shm_mb + 32) << 20,
                               self.max_processes + 1)  # fmt: skip
        try:
            server = ForkServer(sys.executable, self._server_config(heavy), group)
        except BaseException:
            group.close()
            raise
        server.heavy = heavy
        with self._server_lock:
            self._nservers += 1
        return server

    def _acquire_server(self, heavy: bool = False) -> ForkServer:
        self._slots.acquire()
        try:
            return self._servers[heavy].get_nowait()
        except queue.Empty:
            pass
        try:
            return self._start_server(heavy)
        except BaseException:
            self._slots.release()
            raise

    def _release_server(self, server: ForkServer) -> None:
        if server.alive:
            self._servers[server.heavy].put(server)
        else:
            server.close()
            with self._server_lock:
                self._nservers -= 1
        self._slots.release()

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
            if self.fork_server:
                return self._run_forked(code, stdin)
            return self._run_exec(code, stdin)
        except Exception as exc:  # a sandbox-side failure (disk full, ...): the caller must survive it
            logger.exception("sandbox failure")
            return ExecResult("", f"Sandbox error: {type(exc).__name__}: {exc}", None, 0.0, None)

    def close(self) -> None:
        """Stop the worker threads and the fork servers, release the interpreter descriptors."""
        self._close_pool()
        self._stop_servers()
        self._release()

    def __enter__(self) -> LocalSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _limits(self) -> tuple[int, int]:
        keep = 4 * self.max_output_chars + 4  # bytes kept per stream (UTF-8: at most 4 bytes a character)
        hard_cap = max(1 << 20, 64 * self.max_output_chars)  # total bytes after which the snippet is stopped
        return keep, hard_cap

    def _run_forked(self, code: str, stdin: str | None) -> ExecResult:
        keep, hard_cap = self._limits()
        server = self._acquire_server(any(name in code for name in self.preload_if_named))
        try:
            start = time.monotonic()
            outcome = server.run(code, stdin, keep=keep, hard_cap=hard_cap, deadline=start + self.timeout + 10)
            end = time.monotonic()
        finally:
            self._release_server(server)
        stdout = truncate(outcome.stdout, outcome.totals[0], self.max_output_chars)
        stderr = truncate(outcome.stderr, outcome.totals[1], self.max_output_chars)
        if outcome.error is not None:  # the server failed: what the snippet printed so far, and why
            stderr += f"Sandbox error: {outcome.error}"
            return ExecResult(stdout, stderr, None, end - start, outcome.reason)
        return self._result(stdout, stderr, outcome.status, outcome.cpu, outcome.reason, end - start)

    def _result(self, stdout: str, stderr: str, status: int, cpu: float, reason: str | None, wall: float) -> ExecResult:
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        limit = reason or classify(stderr, signum=signum, cpu_time=cpu, cpu_limit=self.cpu_seconds)
        if limit is None and (len(stdout) > self.max_output_chars or len(stderr) > self.max_output_chars):
            limit = "output"
        exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        return ExecResult(stdout, stderr, exit_code, wall, limit, signum)

    def _run_exec(self, code: str, stdin: str | None) -> ExecResult:
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
            remove_tree(workdir)  # never raises: the result above is returned whatever the snippet left

    def _wait(self, proc: subprocess.Popen, start: float) -> ExecResult:
        keep, hard_cap = self._limits()
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
        return self._result(stdout, stderr, status, usage.ru_utime + usage.ru_stime, reason, end - start)


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


def _close_servers(servers: dict[bool, queue.Queue]) -> None:
    for idle in servers.values():
        while True:
            try:
                idle.get_nowait().close()
            except queue.Empty:
                break


def _close_fds(fds: list[int]) -> None:
    while fds:
        fd = fds.pop()
        with contextlib.suppress(OSError):
            os.close(fd)


def remove_tree(path: str) -> None:
    """Remove a work dir whatever the snippet left in it (read-only directories, a chain thousands of levels
    deep that shutil.rmtree's recursion cannot follow); logs instead of raising."""
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except (OSError, RecursionError):
        pass
    # rm's fts walks any depth with descriptor-relative calls; chmod first: the non-root case (0500 dirs)
    subprocess.run(["chmod", "-R", "u+rwx", path], capture_output=True, check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", path], capture_output=True, check=False)
    if os.path.lexists(path):
        logger.error("sandbox: could not remove the work dir %s", path)
