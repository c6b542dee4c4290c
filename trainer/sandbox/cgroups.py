"""A memory and a pids cgroup per sandbox slot, so that a snippet's limits count all its processes and its
shared memory (tmpfs work dir, /dev/shm, memfds, SysV segments).

cgroup v1 (``/sys/fs/cgroup/memory``, ``/sys/fs/cgroup/pids``) or v2 (``/sys/fs/cgroup`` with the memory and
pids controllers). Creating them needs root (or a delegated hierarchy); where it is not possible, ``create``
returns an empty ``SlotCgroup`` and the sandbox keeps its per-process bounds (RLIMIT_AS, RLIMIT_NPROC and the
tmpfs sizes) instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

ROOT = "/sys/fs/cgroup"
PARENT = "sodkern"


@dataclass
class SlotCgroup:
    """The cgroup directories of one slot and the opened ``cgroup.procs`` descriptors a snippet joins by."""

    paths: list[str] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        """Close the descriptors and remove the directories (they must be empty: the slot's server is gone)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
        for path in reversed(self.paths):
            for _ in range(50):  # a killed snippet may take a moment to leave
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        self.paths = []


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _make(directory: str, settings: dict[str, str], group: SlotCgroup) -> None:
    os.makedirs(directory, exist_ok=True)
    group.paths.append(directory)
    for name, value in settings.items():
        if os.path.exists(os.path.join(directory, name)):
            _write(os.path.join(directory, name), value)
    group.fds.append(os.open(os.path.join(directory, "cgroup.procs"), os.O_WRONLY))


def create(name: str, memory_bytes: int, max_tasks: int) -> SlotCgroup:
    """A memory + pids cgroup ``sodkern/NAME`` with these limits, or an empty SlotCgroup where not allowed.

    NAME starts with the trainer's pid and a dash: groups left by a trainer that died are removed here."""
    group = SlotCgroup()
    _sweep()
    try:
        if os.path.isdir(f"{ROOT}/memory") and os.path.isdir(f"{ROOT}/pids"):  # v1
            memory = {"memory.limit_in_bytes": str(memory_bytes), "memory.memsw.limit_in_bytes": str(memory_bytes)}
            _make(f"{ROOT}/memory/{PARENT}/{name}", memory, group)
            _make(f"{ROOT}/pids/{PARENT}/{name}", {"pids.max": str(max_tasks)}, group)
        elif "memory" in _read(f"{ROOT}/cgroup.controllers").split():  # v2
            _write(f"{ROOT}/cgroup.subtree_control", "+memory +pids")
            os.makedirs(f"{ROOT}/{PARENT}", exist_ok=True)
            _write(f"{ROOT}/{PARENT}/cgroup.subtree_control", "+memory +pids")
            settings = {"memory.max": str(memory_bytes), "memory.swap.max": "0", "pids.max": str(max_tasks)}
            _make(f"{ROOT}/{PARENT}/{name}", settings, group)
        else:
            return group
    except OSError as exc:
        logger.info("sandbox: no cgroup for %s (%s); per-process bounds only", name, exc)
        group.close()
        return SlotCgroup()
    return group


def _sweep() -> None:
    for parent in (f"{ROOT}/memory/{PARENT}", f"{ROOT}/pids/{PARENT}", f"{ROOT}/{PARENT}"):
        with contextlib.suppress(OSError):
            for name in os.listdir(parent):
                owner = name.split("-", 1)[0]
                if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(parent, name))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
