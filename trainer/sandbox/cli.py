"""``sodkern sandbox FILE.py``: run a file in the code-interpreter sandbox and report what happened."""

from __future__ import annotations

import argparse
import os
import sys

from sodkern.trainer.sandbox.interpreter import prepare_code
from sodkern.trainer.sandbox.local import LocalSandbox
from sodkern.trainer.sandbox.result import escape_control
from sodkern.trainer.sandbox.server import SandboxUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sodkern sandbox",
        description="Run a Python file in the code-interpreter sandbox; print stdout, stderr, exit status, "
        "time and which limit fired. Exit status: 0 when the snippet succeeded, 1 otherwise.",
    )
    parser.add_argument("file", help="Python file to run (- reads it from standard input)")
    parser.add_argument("--stdin", metavar="FILE", help="file whose contents become the snippet's stdin")
    parser.add_argument("--timeout", type=float, default=10.0, help="wall-clock limit, seconds (default 10)")
    parser.add_argument("--cpu-seconds", type=int, default=10, help="CPU-time limit, seconds (default 10)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space limit, MiB (default 1024)")
    parser.add_argument("--max-output-chars", type=int, default=8192, help="kept per stream (default 8192)")
    parser.add_argument("--max-processes", type=int, default=64, help="process/thread limit (default 64)")
    parser.add_argument("--max-file-mb", type=int, default=16, help="largest file it may write, MiB (default 16)")
    parser.add_argument(
        "--python-launcher",
        action="store_true",
        help="use the weak pure-Python launcher (no network isolation; for machines without the native one)",
    )
    parser.add_argument(
        "--per-process", action="store_true", help="one native launcher process per snippet, not a fork server"
    )
    parser.add_argument("--raw", action="store_true", help="run the file as is (no fence strip / last-value print)")
    args = parser.parse_args(argv)

    try:
        if args.file == "-":
            code = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as f:
                code = f.read()
        stdin = None
        if args.stdin is not None:
            with open(args.stdin, encoding="utf-8") as f:
                stdin = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"cannot read {exc.filename if isinstance(exc, OSError) else args.file}: {exc}")

    try:
        sandbox = LocalSandbox(
            timeout=args.timeout,
            cpu_seconds=args.cpu_seconds,
            memory_mb=args.memory_mb,
            max_output_chars=args.max_output_chars,
            max_processes=args.max_processes,
            max_file_mb=args.max_file_mb,
            workers=1,
            fork_server=not args.per_process,
            native=False if args.python_launcher else None,
            allow_weak=True if args.python_launcher else None,
        )
    except SandboxUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    with sandbox:
        result = sandbox.run(code if args.raw else prepare_code(code), stdin)
    # the snippet's bytes must not drive the terminal (title, clipboard, clear screen): escaped for display
    stdout, stderr = escape_control(result.stdout), escape_control(result.stderr)
    print("----- stdout -----")
    print(stdout, end="" if stdout.endswith("\n") or not stdout else "\n")
    print("----- stderr -----")
    print(stderr, end="" if stderr.endswith("\n") or not stderr else "\n")
    print("------------------")
    status = "killed" if result.exit_code is None else str(result.exit_code)
    if result.signal is not None:
        status += f" (signal {result.signal})"
    if sandbox.fork_server:
        launcher = f"native fork server (namespaces, seccomp, Landlock ABI {sandbox.features.get('landlock', 0)})"
    elif sandbox.launcher:
        launcher = f"native (seccomp, Landlock ABI {sandbox.features.get('landlock', 0)})"
    else:
        launcher = "python (no network isolation)"
    if sandbox.fork_server:
        user = "a uid of its own" if os.geteuid() == 0 else "the current user (user namespace)"
    else:
        user = f"uid {sandbox.ids[0]}" if sandbox.ids else "the current user"
    print(f"exit status: {status}")
    print(f"time: {result.wall_time:.3f} s")
    print(f"limit: {result.limit or 'none'}")
    print(f"launcher: {launcher}, running as {user}")
    return 0 if result.ok else 1
