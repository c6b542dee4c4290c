"""Shared by the sandbox tests: which processes run as a snippet's own uid (judged from outside)."""

from __future__ import annotations

import contextlib
import os

from sodkern.trainer.sandbox.server import UID_BASE


def snippet_pids() -> list[int]:
    """Pids of live processes running as a snippet's own uid (root trainer), anywhere on the host."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if UID_BASE <= os.stat(f"/proc/{pid}").st_uid < UID_BASE + (1 << 22):
                found.append(int(pid))
    return found
