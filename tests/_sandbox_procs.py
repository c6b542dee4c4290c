"""Shared by the sandbox tests: which processes run as a snippet's own uid (judged from outside)."""

from __future__ import annotations

import contextlib
import os

from sodkern.trainer.sandbox.server import UID_BASE


def snippet_pids(sandbox=None) -> list[int]:
    """Pids of live processes running as a snippet's own uid (root trainer): those of ``sandbox``'s idle fork
    servers' slots, or, without one, any on the host (another sandbox running meanwhile, e.g. a demo on the
    same machine, shows up then)."""
    if sandbox is None:
        uids = range(UID_BASE, UID_BASE + (1 << 22))
    else:
        uids = {UID_BASE + server.pid for idle in sandbox._servers.values() for server in idle.queue}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid in uids:
                found.append(int(pid))
    return found
