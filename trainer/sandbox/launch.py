"""What a sandboxed snippet is started with: the launcher, the interpreter command, what it may read.

The native launcher ``sodkern-sandbox`` (launcher.c) is looked up next to this module, then in the installed
platlib (where an editable install puts it), then at $SODKERN_SANDBOX_LAUNCHER. Its ``--probe`` tells which
kernel features work here.

The snippet runs under ``python -S`` from the trainer's own interpreter, with the trainer's site-packages
appended to sys.path by a small bootstrap (so no .pth hook of the trainer's environment runs in the sandbox).
When that install is not reachable by the sandbox user (e.g. pyenv under a 0700 /root while the snippet runs
as nobody), the native launcher ``--expose``s it: in a private mount namespace the blocking directory is
covered by an empty tmpfs and the install is bind-mounted back at its own path (needs CAP_SYS_ADMIN). Where
mount namespaces are not allowed (e.g. Docker's default profile) or with the Python launcher, its prefix is
opened here and handed down as a file descriptor instead: the interpreter then runs from
``/proc/self/fd/N/...`` with PYTHONHOME and LD_LIBRARY_PATH pointing there. Only that tree becomes reachable
(lookups above it still need the search permission the user lacks), but code that resolves its own path
(``os.path.realpath``, e.g. matplotlib's fonts) gets the unreachable original back and fails.
"""

from __future__ import annotations

import logging
import os
import pwd
import site
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

LAUNCHER_NAME = "sodkern-sandbox"
PYLAUNCH = str(Path(__file__).with_name("_pylaunch.py"))
# readable by the snippet besides the interpreter's install and its work directory (Landlock)
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys")

# The snippet's __main__: runs main.py from the work dir with the site dirs given as arguments appended to
# sys.path; tracebacks start at the snippet's own frame, as with ``python main.py``.
BOOT = """\
def _boot():
    import builtins, sys
    sys.path.extend(sys.argv[1:])
    sys.argv = ["main.py"]
    builtins.exit = builtins.quit = sys.exit
    try:
        with open("main.py", encoding="utf-8") as f:
            code = compile(f.read(), "main.py", "exec")
    except (SyntaxError, ValueError) as e:
        import traceback
        traceback.print_exception(type(e), e, None)
        sys.exit(1)
    main = sys.modules["__main__"]
    del main._boot
    main.__file__ = "main.py"
    try:
        exec(code, vars(main))
    except SystemExit:
        raise
    except BaseException as e:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.exit(1)
_boot()
"""

_probes: dict[str, dict[str, int]] = {}


def find_launcher() -> str | None:
    """Path of the native launcher: next to this module, the installed platlib, $SODKERN_SANDBOX_LAUNCHER."""
    candidates = [
        Path(__file__).with_name(LAUNCHER_NAME),
        Path(sysconfig.get_paths()["platlib"]) / "sodkern" / "trainer" / "sandbox" / LAUNCHER_NAME,
    ]
    if os.environ.get("SODKERN_SANDBOX_LAUNCHER"):
        candidates.append(Path(os.environ["SODKERN_SANDBOX_LAUNCHER"]))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def probe_launcher(path: str) -> dict[str, int]:
    """Kernel features the launcher can use here, e.g. {"seccomp": 1, "landlock": 7}; {} if it does not run."""
    if path not in _probes:
        try:
            out = subprocess.run([path, "--probe"], capture_output=True, text=True, timeout=30, check=True).stdout
            _probes[path] = {k: int(v) for k, v in (item.split("=") for item in out.split())}
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            logger.warning("sandbox launcher %s does not run: %s", path, exc)
            _probes[path] = {}
    return _probes[path]


def world_reachable(path: str) -> bool:
    """Whether a user that is neither owner nor group (e.g. nobody) can reach ``path`` (mode bits only)."""
    real = Path(os.path.realpath(path))
    try:
        for part in (*reversed(real.parents), real):
            mode = os.stat(part).st_mode
            if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
                return False
        return bool(mode & (stat.S_IROTH | stat.S_IXOTH))
    except OSError:
        return False


def user_tasks() -> int:
    """Tasks (processes and threads) the current real user runs now: they count against RLIMIT_NPROC."""
    uid, count = str(os.getuid()), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if fields.get("Uid", "").split()[:1] == [uid]:
            count += int(fields.get("Threads", "1"))
    return count


def sandbox_ids(user: str | int) -> tuple[int, int]:
    """(uid, gid) of the user snippets run as when the trainer is root."""
    if isinstance(user, int):
        return user, user
    try:
        entry = pwd.getpwnam(user)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534  # nobody / nogroup on every common distribution


def site_dirs() -> list[str]:
    """The interpreter's site-packages directories (real paths), appended to a snippet's sys.path."""
    return [os.path.realpath(d) for d in site.getsitepackages() if os.path.isdir(d)]


def server_reads() -> list[str]:
    """What a fork server's new root holds (read-only): the system directories and the interpreter's install;
    a path inside another one of the list is left out (the outer bind shows it)."""
    roots = [os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix)]
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    system = [p for p in SYSTEM_READ if p not in ("/proc", "/sys", "/dev")]
    paths = list(dict.fromkeys([*system, *roots, *site_dirs(), exe_dir]))
    return [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]


@dataclass
class SnippetPython:
    """The snippet's interpreter: ``argv`` (ends with the bootstrap and site dirs), extra ``env``, the
    descriptors ``fds`` to pass down (held prefixes), ``read_paths`` for Landlock and the directories the
    launcher must ``expose``."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    fds: list[int] = field(default_factory=list)
    read_paths: list[str] = field(default_factory=list)
    expose: list[str] = field(default_factory=list)


def snippet_python(switch_user: bool, can_expose: bool) -> SnippetPython:
    """Build the interpreter command. ``switch_user``: the snippet will run as another (unprivileged) user;
    ``can_expose``: the launcher can use ``--expose`` (native, mount namespaces allowed).

    The caller owns the returned ``fds`` and closes them when done.
    """
    exe = os.path.realpath(sys.executable)
    site_dirs = [os.path.realpath(d) for d in site.getsitepackages() if os.path.isdir(d)]
    roots = list(dict.fromkeys(os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix)))
    result = SnippetPython([], read_paths=[*SYSTEM_READ, *roots, *site_dirs, os.path.dirname(exe)])
    if switch_user and not all(map(world_reachable, [exe, *roots, *site_dirs])) and can_expose:
        result.expose = roots
    elif switch_user and not all(map(world_reachable, [exe, *roots, *site_dirs])):
        held = {root: os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for root in roots}
        result.fds = list(held.values())

        def rewrite(path: str) -> str:
            for root, fd in held.items():
                if path == root or path.startswith(root + os.sep):
                    return f"/proc/self/fd/{fd}{path[len(root) :]}"
            return path

        base, base_exec = (rewrite(os.path.realpath(p)) for p in (sys.base_prefix, sys.base_exec_prefix))
        result.env["PYTHONHOME"] = base if base == base_exec else f"{base}:{base_exec}"
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED"):
            result.env["LD_LIBRARY_PATH"] = rewrite(os.path.realpath(libdir))
        exe, site_dirs = rewrite(exe), [rewrite(d) for d in site_dirs]
    result.argv = [exe, "-S", "-u", "-B", "-c", BOOT, *site_dirs]
    return result
