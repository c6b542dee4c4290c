"""Hostile snippets against the fork-server sandbox, each judged by an effect outside the sandbox.

The cases are those of a red-team corpus that got through the earlier launcher: reaching other snippets and
host processes (prlimit, renice, affinity, signals), IPC objects outliving a run, metadata changes outside the
work dir, reading /proc and /tmp, filling the disk, memory spread over processes and shared memory, the
per-uid inotify limit, terminal escapes, a deep directory chain and leftover processes. Needs root for the
victim processes run as ``nobody`` (as the trainer runs in CI).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from sodkern.trainer.sandbox import LocalSandbox
from sodkern.trainer.sandbox.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib leaves tests/ off sys.path
from _sandbox_procs import snippet_pids  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="victims run as nobody: needs root, as in CI")

NOBODY = 65534
SLEEP = shutil.which("sleep") or "/bin/sleep"
SYSTEM_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)


@pytest.fixture(scope="module")
def sandbox():
    with LocalSandbox(
        timeout=6, cpu_seconds=4, memory_mb=384, max_processes=32, max_workdir_mb=24, max_shm_mb=8, workers=4
    ) as sb:
        assert sb.fork_server
        yield sb


def wait_for_snippet(timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = snippet_pids()
        if pids:
            return min(pids)
        time.sleep(0.02)
    raise AssertionError("the snippet never started")


@contextlib.contextmanager
def victim(*extra: str):
    """A process as nobody (the uid every snippet shared before), or as root with ``extra`` arguments."""
    if extra:
        proc = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(120)", *extra])
    else:
        proc = subprocess.Popen([SLEEP, "120"], user=NOBODY, group=NOBODY)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def process_state(pid: int) -> tuple:
    with open(f"/proc/{pid}/limits") as f:
        nofile = next(line for line in f if line.startswith("Max open files")).split()[3:5]
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    return nofile, os.getpriority(os.PRIO_PROCESS, pid), os.sched_getaffinity(pid), state in "tT"  # stopped


def spray(pids: list[int]) -> str:
    """Code that tries to limit, renice, pin, stop and kill each pid, and every pid it can see in /proc."""
    return (
        "import os, resource, signal\n"
        f"targets = {pids!r} + [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]\n"
        f"targets += list(range({min(pids) - 300}, {max(pids) + 300}))\n"
        "for pid in targets:\n"
        "    for act in (lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (4, 4)),\n"
        "                lambda: os.setpriority(os.PRIO_PROCESS, pid, 19),\n"
        "                lambda: os.sched_setaffinity(pid, {0}),\n"
        "                lambda: os.kill(pid, signal.SIGSTOP)):\n"
        "        try:\n            act()\n        except OSError:\n            pass\n"
        f"for uid in ({NOBODY}, os.getuid()):\n"
        "    try:\n        os.setpriority(os.PRIO_USER, uid, 19)\n    except OSError:\n        pass\n"
    )


# ---- other processes ---------------------------------------------------------------------------------------


def test_cannot_reach_other_processes(sandbox):
    with victim() as nobody, victim("sodkern-victim") as root_victim:
        time.sleep(0.2)
        pids = [nobody.pid, root_victim.pid, os.getpid()]
        before = [process_state(pid) for pid in pids]
        result = sandbox.run(spray(pids))
        after = [process_state(pid) for pid in pids]
        assert nobody.poll() is None and root_victim.poll() is None
    assert result.exit_code == 0, result
    assert after == before  # RLIMIT_NOFILE, nice, affinity and run state untouched


def test_batch_benign_with_hostile(sandbox):
    """Benign snippets run next to hostile ones return exactly what they return alone."""
    benign = [
        f"import os\nprint(sum(range({i})), len(os.listdir('.')))\nopen('f', 'w').write('x' * {i})" for i in range(24)
    ]
    benign += ["import numpy as np\nprint(np.arange(10).sum())", "print(input()[::-1])"]
    stdins = [None] * (len(benign) - 1) + ["hello"]
    alone = [r.stdout for r in sandbox.run_many(benign, stdins)]
    assert alone[:3] == ["0 1\n", "0 1\n", "1 1\n"] and alone[-1] == "olleh\n"
    hostile = [
        spray([os.getpid()]),
        "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n",
        "x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n",
        "open('/dev/shm/fill', 'wb').write(b'x' * (64 << 20))\n",
        "import os\nfor i in range(1000):\n    open(f'/tmp/f{i}', 'wb').write(os.urandom(1 << 20))\n",
    ]
    mixed_codes, mixed_stdins, where = [], [], []
    for i, (code, stdin) in enumerate(zip(benign, stdins)):
        if i % 5 == 0:
            mixed_codes.append(hostile[(i // 5) % len(hostile)])
            mixed_stdins.append(None)
        where.append(len(mixed_codes))
        mixed_codes.append(code)
        mixed_stdins.append(stdin)
    mixed = sandbox.run_many(mixed_codes, mixed_stdins)
    assert [mixed[i].stdout for i in where] == alone
    assert snippet_pids(sandbox) == []


# ---- IPC ---------------------------------------------------------------------------------------------------


IPC_CREATE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
shm = libc.shmget(0x5EED, 32 << 20, 0o1000 | 0o666)
errors = [ctypes.get_errno()]
if shm >= 0:
    ctypes.memmove(libc.shmat(shm, None, 0), b"SHM-SECRET-" + b"7" * 16, 27)
msq = libc.msgget(0x5EED, 0o1000 | 0o666)
errors.append(ctypes.get_errno())
if msq >= 0:
    msg = ctypes.create_string_buffer(b"\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00MSG-SECRET-99", 32)
    libc.msgsnd(msq, msg, 16, 0)
rt = ctypes.CDLL("librt.so.1", use_errno=True)
mq = rt.mq_open(b"/sodkern-secret", os.O_CREAT | os.O_RDWR, 0o666, None)
errors.append(ctypes.get_errno())
print(shm, msq, mq, errors)
"""
IPC_READ = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
shm = libc.shmget(0x5EED, 0, 0)
if shm >= 0:
    print(ctypes.string_at(libc.shmat(shm, None, 0), 27))
msq = libc.msgget(0x5EED, 0)
buf = ctypes.create_string_buffer(64)
if msq >= 0 and libc.msgrcv(msq, buf, 48, 0, 0o4000) > 0:
    print(buf.raw[8:24])
"""


def test_ipc_objects_do_not_outlive_the_snippet(sandbox):
    created = sandbox.run(IPC_CREATE)
    # System V and POSIX message-queue IPC are refused with EPERM (the slot's server has its own IPC namespace too)
    assert created.stdout == f"-1 -1 -1 {[errno.EPERM] * 3}\n", created
    for table in ("/proc/sysvipc/shm", "/proc/sysvipc/msg"):
        with open(table) as f:
            keys = [line.split()[0] for line in f.readlines()[1:]]
        assert str(0x5EED) not in keys  # nothing left on the host
    rt = ctypes.CDLL("librt.so.1", use_errno=True)
    assert rt.mq_open(b"/sodkern-secret", os.O_RDONLY) == -1 and ctypes.get_errno() == 2
    later = sandbox.run_many([IPC_READ] * 4)  # a later snippet, on any slot, finds nothing
    assert all(r.ok and "SECRET" not in r.stdout for r in later), later


# ---- the file system ---------------------------------------------------------------------------------------


def test_no_metadata_changes_or_reads_outside(sandbox, tmp_path):
    shared = tempfile.mkdtemp(prefix="sodkern-test-", dir="/tmp")
    os.chmod(shared, 0o777)
    owned = os.path.join(shared, "owned-by-nobody")
    open_file = os.path.join(shared, "world-writable")
    secret = f"file-secret-{uuid.uuid4().hex}"
    for path in (owned, open_file):
        with open(path, "w") as f:
            f.write(secret)
        os.chmod(path, 0o666)
    os.chown(owned, NOBODY, NOBODY)
    before = {p: os.stat(p) for p in (owned, open_file, shared)}
    code = (
        "import os\n"
        f"for path in ({owned!r}, {open_file!r}, {shared!r}, '/root', '/tmp', {os.getcwd()!r}):\n"
        "    for act in (lambda: os.chmod(path, 0o4777), lambda: os.utime(path, (0, 0)), lambda: os.utime(path),\n"
        "                lambda: os.setxattr(path, 'user.mark', b'1'), lambda: print(open(path).read()),\n"
        "                lambda: print(os.listdir(path))):\n"
        "        try:\n            act()\n        except OSError:\n            pass\n"
    )
    try:
        result = sandbox.run(code)
        for path, st in before.items():
            now = os.stat(path)
            assert (now.st_mode, now.st_mtime_ns, now.st_uid) == (st.st_mode, st.st_mtime_ns, st.st_uid), path
            assert os.listxattr(path) == []
        assert secret not in result.stdout + result.stderr
        assert shared.rsplit("/", 1)[1] not in result.stdout  # /tmp of the host is not listed either
    finally:
        shutil.rmtree(shared)


def test_proc_cmdline_and_tmp_names_invisible(sandbox):
    secret = f"argv-secret-{uuid.uuid4().hex}"
    name = f"inotify-secret-{uuid.uuid4().hex}"
    code = (
        "import ctypes, os, struct, select, time\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n        print(open(f'/proc/{pid}/cmdline', 'rb').read())\n    except OSError:\n        pass\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.inotify_init1(os.O_NONBLOCK)\n"
        "print('watch', libc.inotify_add_watch(fd, b'/tmp', 0x100 | 0x20))\n"
        "end = time.time() + 2\n"
        "while time.time() < end:\n"
        "    if select.select([fd], [], [], 0.1)[0]:\n"
        "        print(os.read(fd, 4096))\n"
    )
    with victim(secret):
        created = []

        def create_files() -> None:
            wait_for_snippet()
            for _ in range(10):
                path = os.path.join("/tmp", f"{name}-{len(created)}")
                open(path, "w").close()
                created.append(path)
                time.sleep(0.1)

        thread = threading.Thread(target=create_files)
        thread.start()
        try:
            result = sandbox.run(code)
        finally:
            thread.join()
            for path in created:
                os.remove(path)
    assert created and "watch " in result.stdout, result
    assert secret not in result.stdout and name not in result.stdout


def _tmpfs_used(pid: int, path: str) -> int:
    return shutil.disk_usage(f"/proc/{pid}/root{path}").used


def test_workdir_and_shm_size_capped(sandbox):
    code = (
        "import os, time\n"
        "for target in ('/tmp/f', '/dev/shm/f'):\n"
        "    for i in range(200):\n"
        "        try:\n"
        "            with open(f'{target}{i}', 'wb') as f:\n                f.write(b'x' * (4 << 20))\n"
        "        except OSError:\n            break\n"
        "print('full', flush=True)\ntime.sleep(2)\n"
    )
    used = {}

    def measure() -> None:
        pid = wait_for_snippet()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                used["tmp"] = max(used.get("tmp", 0), _tmpfs_used(pid, "/tmp"))
                used["shm"] = max(used.get("shm", 0), _tmpfs_used(pid, "/dev/shm"))
            time.sleep(0.05)

    thread = threading.Thread(target=measure)
    thread.start()
    result = sandbox.run(code)
    thread.join()
    assert result.stdout == "full\n", result
    assert 0 < used["tmp"] <= (sandbox.max_workdir_mb << 20) and 0 < used["shm"] <= (sandbox.max_shm_mb << 20)


def test_deep_directory_chain(sandbox):
    code = "import os\nprint('before', flush=True)\nfor _ in range(2500):\n    os.mkdir('d')\n    os.chdir('d')\n"
    assert sandbox.run(code).stdout == "before\n"
    tmp_root = tempfile.gettempdir()
    left = set(os.listdir(tmp_root))
    with LocalSandbox(timeout=20, fork_server=False, workers=1) as old:  # a work dir on the host: removed
        result = old.run(code)
    assert result.stdout == "before\n" and "Sandbox error" not in result.stderr, result
    assert {n for n in os.listdir(tmp_root) if n.startswith("sodkern-sbx-")} <= left


# ---- memory, processes, per-uid limits ----------------------------------------------------------------------


def test_memory_counts_all_processes_and_shared_memory():
    with LocalSandbox(timeout=8, cpu_seconds=6, memory_mb=256, max_shm_mb=8, max_workdir_mb=8, workers=1) as sb:
        server = sb._servers[False].queue[0]
        memory_dir = next((p for p in server.cgroup.paths if "/memory" in p), None)
        if memory_dir is None:
            pytest.skip("no memory cgroup here")
        code = (
            "import os, mmap, time\n"
            "for _ in range(3):\n"
            "    if os.fork() == 0:\n"
            "        fd = os.memfd_create('m')\n        os.ftruncate(fd, 150 << 20)\n"
            "        m = mmap.mmap(fd, 150 << 20)\n"
            "        for i in range(0, 150 << 20, 4096):\n            m[i] = 1\n"
            "        x = bytearray(100 << 20)\n        time.sleep(5)\n        os._exit(0)\n"
            "time.sleep(4)\nprint('done')\n"
        )
        result = sb.run(code)
        usage_file = os.path.join(memory_dir, "memory.max_usage_in_bytes")
        if os.path.exists(usage_file):
            with open(usage_file) as f:
                peak = int(f.read())
            with open(os.path.join(memory_dir, "memory.limit_in_bytes")) as f:
                limit = int(f.read())
            assert peak <= limit < 3 * (250 << 20), (peak, limit)  # 750 MiB asked for, the cap held
        assert snippet_pids(sb) == []
        assert result.stdout in ("", "done\n")


def test_inotify_exhaustion_stays_with_the_snippet(sandbox):
    code = (
        "import ctypes, time\nlibc = ctypes.CDLL(None)\nn = 0\n"
        "while libc.inotify_init() >= 0:\n    n += 1\n"
        "print(n, flush=True)\ntime.sleep(2)\n"
    )
    if SYSTEM_PYTHON is None:
        pytest.skip("no system python3 that nobody can run")
    probe = [SYSTEM_PYTHON, "-S", "-c", "import ctypes, sys; sys.exit(ctypes.CDLL(None).inotify_init() < 0)"]
    outcome = {}

    def probe_while_running() -> None:
        wait_for_snippet()
        time.sleep(0.7)
        outcome["nobody"] = subprocess.run(probe, user=NOBODY, group=NOBODY).returncode
        outcome["root"] = subprocess.run(probe).returncode

    thread = threading.Thread(target=probe_while_running)
    thread.start()
    result = sandbox.run(code)
    thread.join()
    assert result.ok and int(result.stdout.split()[0]) > 0, result
    assert outcome == {"nobody": 0, "root": 0}


def test_daemons_do_not_survive(sandbox):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\n"
        "print('parent done')\n"
    )
    assert sandbox.run(code).stdout == "parent done\n"
    time.sleep(0.2)
    assert snippet_pids(sandbox) == []


# ---- display ------------------------------------------------------------------------------------------------


def test_terminal_escapes_are_escaped_for_display(sandbox, tmp_path, capsys):
    hostile = "print('\\x1b]0;pwned\\x07\\x1b]52;c;ZWNobyBo\\x07\\x1b[2J\\x1b[H\\u202eabc\\r')"
    assert "\x1b]0;pwned\x07" in sandbox.run(hostile).stdout  # the model sees what it printed
    script = tmp_path / "escapes.py"
    script.write_text(hostile)
    assert cli_main([str(script), "--timeout", "10"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\r" not in out
    assert "\\x1b]0;pwned\\x07" in out and "\\u202e" in out
