"""Pure-Python stand-in for the native ``sodkern-sandbox`` launcher, used when that is not built or usable.

Run as ``python -I -S _pylaunch.py [OPTIONS] -- PROGRAM [ARG...]`` with the launcher's options. It applies the
rlimits, switches user, arms PR_SET_PDEATHSIG and PR_SET_NO_NEW_PRIVS, then execs PROGRAM. It has no seccomp
filter and no Landlock (``--read``/``--write`` are accepted and ignored): the snippet can use the network and,
when the trainer is not root, write, signal and read wherever the trainer's user can. local.py warns about it.
It imports only the standard library, so it runs before and apart from the sodkern package.
"""

import ctypes
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
LIMITS = {
    "--cpu": resource.RLIMIT_CPU,
    "--memory": resource.RLIMIT_AS,
    "--fsize": resource.RLIMIT_FSIZE,
    "--nproc": resource.RLIMIT_NPROC,
    "--nofile": resource.RLIMIT_NOFILE,
}


def fail(message: str) -> None:
    sys.stderr.write(f"sodkern-sandbox: {message}\n")
    sys.stderr.flush()
    os._exit(126)


def main(argv: list[str]) -> None:
    try:
        launch(argv)
    except OSError as exc:
        fail(f"{exc.strerror or exc} ({exc.filename or 'setup'})")


def launch(argv: list[str]) -> None:
    if "--" not in argv:
        fail("usage: _pylaunch.py [OPTIONS] -- PROGRAM [ARG...]")
    split = argv.index("--")
    options, program = argv[:split], argv[split + 1 :]
    if len(options) % 2 or not program:
        fail("every option takes one value, and a PROGRAM must follow --")
    values: dict[str, int] = {}
    for name, value in zip(options[::2], options[1::2]):
        if name in ("--read", "--write"):
            continue
        if name not in (*LIMITS, "--uid", "--gid", "--ppid") or not value.isdigit():
            fail(f"bad option {name} {value!r}")
        values[name] = int(value)
    ppid = values.get("--ppid")
    if ppid is not None and os.getppid() != ppid:
        os._exit(126)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for name, which in LIMITS.items():
        if name in values:
            soft = values[name]
            resource.setrlimit(which, (soft, soft + 1 if name == "--cpu" else soft))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        fail(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    if "--uid" in values:
        uid, gid = values["--uid"], values["--gid"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    # after the user switch: any credential change clears the parent-death signal
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        fail(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
    if ppid is not None and os.getppid() != ppid:
        os._exit(126)
    try:
        os.execv(program[0], program)
    except OSError as exc:
        fail(f"exec {program[0]}: {exc.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])
