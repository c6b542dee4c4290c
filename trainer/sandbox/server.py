"""The trainer's side of a fork server (forkserver.py): start it, send it snippets, collect their output.

One ``ForkServer`` per slot of a LocalSandbox. Each snippet gets fresh pipes for stdout and stderr, its code and
stdin in memfds, passed over a SOCK_SEQPACKET socket; the output is read here as it comes (a bounded head is
kept, a flood is stopped), the exit status comes back as the server's reply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sodkern.trainer.sandbox import cgroups

FORKSERVER = str(Path(__file__).with_name("forkserver.py"))
JAIL_NAME = "libsodkern-sandbox-jail.so"
WORKDIR = "/tmp/sodkern-sbx"  # a snippet's work dir, on its own tmpfs (forkserver.WORKDIR)
logger = logging.getLogger(__name__)
UID_BASE = 1_600_000_000  # snippet uid = UID_BASE + the server's pid: owns no file, unique among live servers
_START_TIMEOUT_S = 120.0
_DRAIN_S = 1.0


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here as configured (launcher not built, namespaces refused, ...)."""


@dataclass
class Outcome:
    """What one snippet left: the kept head and total size of each stream, its wait status, CPU seconds and
    why it was stopped ("timeout" | "output" | None), or ``error`` when the server failed."""

    stdout: bytes
    stderr: bytes
    totals: tuple[int, int]
    status: int | None
    cpu: float
    reason: str | None
    error: str | None = None


class ForkServer:
    """One pre-started server. ``config``: forkserver.py's settings (see LocalSandbox._server_config);
    ``cgroup``: the slot's cgroup, joined by every snippet and removed by ``close``."""

    def __init__(self, python: str, config: dict, cgroup: cgroups.SlotCgroup) -> None:
        self.cgroup = cgroup
        self.heavy = False  # which pool of LocalSandbox it belongs to (see PRELOAD_IF_NAMED)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {**config, "fd": theirs.fileno(), "cgroup_fds": cgroup.fds}
        env = {**config.pop("env"), "HOME": WORKDIR, "TMPDIR": WORKDIR, "MPLCONFIGDIR": WORKDIR}  # the snippets'
        self.sock = ours
        try:
            self.proc = subprocess.Popen(
                [python, "-I", "-S", "-B", FORKSERVER, json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=[theirs.fileno(), *cgroup.fds],
                start_new_session=True,
                env=env,
                cwd="/",
            )
        finally:
            theirs.close()
        self.sock.settimeout(_START_TIMEOUT_S)
        try:
            hello = self.sock.recv(1 << 12)
        except OSError:
            hello = b""
        if not hello:
            error = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            self.close()
            raise SandboxUnavailable(error[-1] if error else f"fork server exited with {self.proc.returncode}")
        self.sock.settimeout(None)
        self.pid = json.loads(hello)["pid"]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, code: str, stdin: str | None, *, keep: int, hard_cap: int, deadline: float) -> Outcome:
        """Run one snippet; ``keep`` bytes of each stream are kept, ``hard_cap`` total bytes stop it; the
        server enforces the wall-clock limit, ``deadline`` (monotonic) is the backstop should it hang."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        fds = [_memfd("code", code.encode("utf-8", errors="surrogatepass")), out_w, err_w]
        if stdin is not None:
            fds.append(_memfd("stdin", stdin.encode("utf-8", errors="replace")))
        try:
            socket.send_fds(self.sock, [b"run"], fds)
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            return Outcome(b"", b"", (0, 0), None, 0.0, None, f"fork server gone: {exc}")
        finally:
            for fd in fds:
                os.close(fd)
        return self._collect(out_r, err_r, keep, hard_cap, deadline)

    def _collect(self, out_r: int, err_r: int, keep: int, hard_cap: int, deadline: float) -> Outcome:
        streams = {out_r: bytearray(), err_r: bytearray()}
        totals = dict.fromkeys(streams, 0)
        poller = select.poll()  # no descriptor of its own to make and close per snippet (unlike epoll)
        sock = self.sock.fileno()
        for fd in (out_r, err_r, sock):
            poller.register(fd, select.POLLIN)
        watched = 3
        reply, reason, error = None, None, None
        drain_until = 0.0
        try:
            while reply is None or (watched > 0 and time.monotonic() < drain_until):
                remaining = deadline - time.monotonic()
                if reply is None and remaining <= 0:
                    error = "fork server did not answer in time"
                    break
                wait = remaining if reply is None else max(0.0, drain_until - time.monotonic())
                for fd, _ in poller.poll(wait * 1000):
                    if fd == sock:
                        data = self.sock.recv(1 << 12)
                        poller.unregister(sock)
                        watched -= 1
                        if not data:
                            error = "fork server exited"
                            break
                        reply = json.loads(data)
                        drain_until = time.monotonic() + _DRAIN_S
                        continue
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        poller.unregister(fd)
                        watched -= 1
                        continue
                    totals[fd] += len(chunk)
                    room = keep - len(streams[fd])
                    if room > 0:
                        streams[fd] += chunk[:room]
                    if reason is None and sum(totals.values()) > hard_cap:
                        reason = "output"
                        self.sock.send(b"kill")
                if error is not None:
                    break
        finally:
            os.close(out_r)
            os.close(err_r)
        if error is not None or "error" in (reply or {}):
            error = error or reply["error"]
            logger.warning("sandbox: %s; stopping that fork server (the next snippet starts another)", error)
            self.close()
            return Outcome(bytes(streams[out_r]), bytes(streams[err_r]), (0, 0), None, 0.0, reason, error)
        server_reason = reply["reason"]
        reason = reason or ("timeout" if server_reason == "timeout" else None)
        return Outcome(
            bytes(streams[out_r]),
            bytes(streams[err_r]),
            (totals[out_r], totals[err_r]),
            reply["status"],
            reply["cpu"],
            reason,
        )

    def close(self) -> None:
        """Stop the server (end of file on its socket: it kills what runs and exits), then remove the slot's
        cgroup. A server that does not stop within 10 s is killed; either way this returns once the server,
        PID 1 of its namespace and so the last of its processes to exit, is gone."""
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            server = None
            with contextlib.suppress(OSError, AttributeError):
                server = os.pidfd_open(self.pid)
            self.proc.kill()  # the waiter outside; the server follows it (PR_SET_PDEATHSIG), then the rest
            self.proc.wait()
            if server is not None:
                select.select([server], [], [], 10)
                os.close(server)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.cgroup.close()


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        _write_all(fd, data)
    except OSError:
        os.close(fd)
        raise
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def find_jail() -> str | None:
    """Path of the fork server's isolation library, next to this module or in the installed platlib."""
    import sysconfig

    for path in (
        Path(__file__).with_name(JAIL_NAME),
        Path(sysconfig.get_paths()["platlib"]) / "sodkern" / "trainer" / "sandbox" / JAIL_NAME,
    ):
        if path.is_file():
            return str(path)
    return None
