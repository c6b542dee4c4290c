"""The fork server: one per sandbox slot, Python and common modules imported once, one fork per snippet.

Run by server.py as ``python -I -S forkserver.py CONFIG_JSON`` (standard library only: it runs apart from the
sodkern package). It becomes PID 1 of its own mount, network, IPC and PID namespaces (``sbx_split`` in jail.c; the
process that started waits outside), imports the preload modules, locks itself into a new root
(``sbx_server_setup``: read-only binds of the allowed paths only, the slot's cgroups, a seccomp filter) and answers
requests on the socket ``config["fd"]``:

request: ``run`` with descriptors [code, stdout, stderr(, stdin)] (the code as a UTF-8 file); reply:
``{"status": wait status, "cpu": seconds, "reason": "timeout" | "killed" | null}``. A message ``kill``
during a run stops the snippet; end of file on the socket stops the server.

The loop is ``sbx_serve`` in jail.c. Each snippet gets fresh size-capped tmpfs mounts on /tmp and /dev/shm, is
forked, enters its isolation (``sbx_enter``: rlimits, Landlock, its own uid, its share of the seccomp filter),
gets ``main.py`` in its work dir and returns here to run it in a fresh ``__main__``; when it has ended, the
server kills and reaps whatever it left running in the namespace before it replies.
"""

import atexit
import builtins
import contextlib
import ctypes
import gc
import json
import os
import socket
import sys
import traceback
import types

PR_SET_NAME = 15
WORKDIR = "/tmp/sodkern-sbx"  # on the snippet's own tmpfs; HOME and TMPDIR point here (see server.py)


class Limits(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_longlong) for name in ("uid", "gid", "work_bytes", "shm_bytes", "inodes")),
        *((name, ctypes.c_longlong) for name in ("cpu", "as_", "fsize", "nproc", "nofile")),
    ]


def c_strings(items):
    array = (ctypes.c_char_p * len(items))()
    array[:] = [item.encode() for item in items]
    return array


def vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    config = json.loads(sys.argv[1])
    sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != os.path.dirname(os.path.realpath(__file__))]
    sys.path.extend(config["site_dirs"])
    lib = ctypes.PyDLL(config["lib"], use_errno=True)  # keeps the GIL: held across the fork
    # From here on this process is PID 1 of its own namespaces (the one that ran until now waits outside).
    outer_pid = ctypes.c_longlong()
    if lib.sbx_split(int(config["unprivileged"]), ctypes.byref(outer_pid)) != 0:
        sys.exit(2)
    for name in config["preload"]:
        with contextlib.suppress(Exception):  # an optional module that does not import here: the snippet sees
            __import__(name)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, b"sodkern-sbx-srv", 0, 0, 0)  # how ps and perf show it
    sock = socket.socket(fileno=config["fd"])
    reads = config["reads"]
    limits = Limits()
    for key, value in config["limits"].items():
        setattr(limits, "as_" if key == "as" else key, value)
    if config["uid_base"] is not None:  # a uid of its own: no file and no other live snippet has it
        limits.uid = limits.gid = config["uid_base"] + outer_pid.value
    limits.as_ = vm_size() + config["limits"]["as"]  # RLIMIT_AS on top of what the fork already maps
    c_reads = c_strings([*reads, "/proc", "/dev"])
    cgroups = config["cgroup_fds"]
    atexit._clear()  # the server never exits normally: a snippet runs only its own exit functions
    sys.stdout.reconfigure(write_through=True)  # the snippets' streams (see child)
    sys.stderr.reconfigure(write_through=True)
    numpy_state_address()
    setup = lib.sbx_server_setup(c_strings(reads), len(reads), int(config["unprivileged"]),
                                 (ctypes.c_int * 4)(*cgroups), len(cgroups))  # fmt: skip
    if setup != 0:
        sys.exit(2)
    sock.send(json.dumps({"ready": True, "pid": outer_pid.value}).encode())
    serve = lib.sbx_serve
    serve.argtypes = [ctypes.c_int, ctypes.c_double, ctypes.POINTER(Limits), ctypes.POINTER(ctypes.c_char_p)]
    serve.argtypes += [ctypes.c_int]
    args = (sock.fileno(), float(config["timeout"]), ctypes.byref(limits), c_reads, len(reads) + 2)
    # compile() readies the interpreter's ~120 AST node classes the first time it runs (a check whether the
    # source is an AST object): here once, not in every snippet (3 ms of CPU each without it).
    compile("pass", "main.py", "exec")
    gc.collect()
    # Last thing before the loop: no young object left and the allocation count at zero, so that a short
    # snippet never runs a collection, and a long one never walks (and so copies) the server's objects.
    gc.freeze()
    # The loop runs in C (no Python, few pages touched in the server while a fork shares them); it returns
    # 1 in each snippet's child, already isolated, with main.py written, and 0 in the server at end of file.
    # The fork is libc's, not os.fork(): the server is single-threaded, so Python's after-fork work (a
    # copy of every page it touches) has nothing to repair; the one hook that matters, reseeding random,
    # is done by hand (run_snippet).
    if serve(*args) == 1:
        child()


def child():
    """The snippet's process, isolated, in its work dir: main.py in a fresh __main__; never returns.

    It reuses the server's stream objects (on fds 0-2, write-through) and environment (the snippet's)."""
    status = 1
    try:
        with open("main.py", "rb") as f:
            code = f.read()
        status = run_snippet(code)
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        atexit._run_exitfuncs()  # the snippet's own (the server's were cleared)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    except BaseException as e:  # noqa: BLE001 (a failure around the snippet: say so, never return)
        with contextlib.suppress(OSError):
            os.write(2, f"sodkern-sandbox: {type(e).__name__}: {e}\n".encode(errors="replace"))
    os._exit(status)


_NUMPY_MT = None  # (address of the global RandomState's MT19937 state, its size in bytes), set in the server


def numpy_state_address():
    """Where numpy's global (legacy) RandomState keeps its MT19937 state: ``uint32 key[624]; int pos``."""
    global _NUMPY_MT
    with contextlib.suppress(Exception):
        generator = sys.modules["numpy.random"].mtrand._rand._bit_generator
        if type(generator).__name__ == "MT19937":
            _NUMPY_MT = (generator.ctypes.state_address, 624 * 4)


def reseed_numpy():
    """A fresh random state for numpy's global generator (each fork starts from a copy of the server's).

    Raw random bytes written into the state (any non-zero key is a valid MT19937 state, ``pos = 624`` makes
    the next draw regenerate from it) cost microseconds; ``numpy.random.seed()`` costs a quarter of a
    millisecond here, a tenth of a trivial snippet's whole cost."""
    if _NUMPY_MT is not None:
        address, size = _NUMPY_MT
        ctypes.memmove(address, os.urandom(size), size)
        ctypes.c_int.from_address(address + size).value = 624
    elif "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()


def run_snippet(code):
    """Run main.py's source in a fresh __main__ as ``python main.py`` would; returns the exit status."""
    sys.argv = ["main.py"]
    sys.path.insert(0, WORKDIR)
    builtins.exit = builtins.quit = sys.exit
    if "random" in sys.modules:
        sys.modules["random"].seed()  # os.fork() would have (an after-fork hook); the server's fork is libc's
    reseed_numpy()
    main = types.ModuleType("__main__")
    main.__file__ = "main.py"
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    try:
        compiled = compile(code.decode("utf-8", errors="surrogateescape"), "main.py", "exec")
    except (SyntaxError, ValueError) as e:
        traceback.print_exception(type(e), e, None)
        return 1
    try:
        exec(compiled, vars(main))
        return 0
    except SystemExit as e:
        return _exit_status(e.code)
    except BaseException as e:  # noqa: BLE001 (the snippet's own exception: reported like python main.py)
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        return 1


def _exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        sys.stderr.write(f"{code}\n")
    return 1


if __name__ == "__main__":
    main()
