"""The code-interpreter sandbox: hostile snippets are contained, normal ones behave like ``python main.py``.

Everything here runs real processes: the native launcher built by ``pip install -e .``, real sockets, a real
HTTP server for the SandboxFusion client and the real ``sodkern sandbox`` command.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sodkern.trainer.sandbox import (
    CodeInterpreter,
    ExecResult,
    LocalSandbox,
    SandboxFusionClient,
    SandboxUnavailable,
    find_launcher,
    prepare_code,
)
from sodkern.trainer.sandbox import local as sandbox_local
from sodkern.trainer.sandbox.cli import main as cli_main
from sodkern.trainer.sandbox.server import UID_BASE

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib leaves tests/ off sys.path
from _sandbox_procs import snippet_pids  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def sandbox():
    with LocalSandbox(
        timeout=3, cpu_seconds=2, memory_mb=512, max_output_chars=2000, max_processes=16, workers=4
    ) as sb:
        yield sb


# ---- the launcher ------------------------------------------------------------------------------------


def test_native_launcher_is_built_and_used(sandbox):
    assert find_launcher() is not None, "sodkern-sandbox missing: run `pip install --no-build-isolation -e .`"
    assert sandbox.launcher is not None and sandbox.features["seccomp"] == 1
    code = (
        "import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getuid(), os.getpgid(0) == os.getpid(), os.getcwd())"
    )
    first, second = sandbox.run(code), sandbox.run(code)
    assert first.ok and second.ok, (first, second)
    assert sandbox.fork_server, "the fork server did not start (see the warning)"
    uid = int(first.stdout.split()[0])
    assert UID_BASE < uid < UID_BASE + (1 << 22) if IS_ROOT else uid == os.getuid()
    assert first.stdout.split()[1] == "True"
    workdir = first.stdout.split()[2]
    assert not os.path.exists(workdir)  # on the snippet's own tmpfs, never on the host
    assert second.stdout == first.stdout  # the next snippet starts from a fresh, empty work dir


def test_user_namespace_path():
    """The path a non-root trainer takes (forced here): a user namespace instead of a uid of its own."""
    with LocalSandbox(timeout=5, workers=1, user_namespace=True) as userns:
        assert userns.fork_server, "the fork server did not start in a user namespace (see the warning)"
        code = (
            "import os, socket\n"
            # no process but itself and its slot's server (PID 1: not dumpable, not signalable from inside)
            "pids = {p for p in os.listdir('/proc') if p.isdigit()}\n"
            f"print(pids <= {{'1', str(os.getpid())}}, os.path.exists({str(REPO)!r}), os.path.exists(__file__))\n"
            f"try:\n    os.kill({os.getpid()}, 9)\nexcept OSError as e:\n    print(type(e).__name__)\n"
            "try:\n    socket.socket()\nexcept OSError as e:\n    print(type(e).__name__)\n"
        )
        result = userns.run(code)
    assert result.stdout == "True False True\nProcessLookupError\nPermissionError\n", result


def test_numpy_snippets_go_to_servers_that_preloaded_it(sandbox):
    """Snippets naming numpy run on servers that imported it; the others on servers without it (cheaper forks)."""
    lean = sandbox.run("import sys\nprint(any(m.startswith('nump' + 'y') for m in sys.modules))")
    heavy = sandbox.run("import sys\nprint('numpy' in sys.modules)")
    assert (lean.stdout, heavy.stdout) == ("False\n", "True\n"), (lean, heavy)


def test_every_snippet_has_fresh_random_state(sandbox):
    """Forks of one server start from copies of its memory: random and numpy's global generator are reseeded."""
    results = sandbox.run_many(["import random, numpy\nprint(random.random(), numpy.random.rand())"] * 6)
    draws = [r.stdout.split() for r in results]
    assert all(r.ok for r in results) and all(len(d) == 2 for d in draws), results
    assert len({d[0] for d in draws}) == 6 and len({d[1] for d in draws}) == 6, draws


def test_per_process_launcher_still_works():
    with LocalSandbox(timeout=5, fork_server=False, workers=2) as old:
        assert not old.fork_server and old.launcher is not None
        results = old.run_many(["import os\nprint(os.getuid())", "print(input())"], [None, "hi"])
        uid = str(old.ids[0]) if IS_ROOT else str(os.getuid())
        assert [r.stdout for r in results] == [f"{uid}\n", "hi\n"]


# ---- normal snippets -----------------------------------------------------------------------------------


def test_print_stdin_and_exception(sandbox):
    result = sandbox.run("name = input()\nprint('hello', name)", stdin="world\n")
    assert result.ok and result.stdout == "hello world\n" and result.exit_code == 0
    assert result.observation() == "hello world"

    result = sandbox.run("x = 1\nprint('before')\nraise ValueError('bad value')")
    assert result.exit_code == 1 and result.limit is None and not result.ok
    obs = result.observation()
    assert obs.startswith("before\nTraceback (most recent call last):")
    assert 'File "main.py", line 3' in obs and "ValueError: bad value" in obs
    assert "_boot" not in obs  # the bootstrap frame is not shown

    result = sandbox.run("def f(:\n    pass")
    assert result.exit_code == 1 and "SyntaxError" in result.stderr and "Traceback" not in result.stderr


def test_output_truncation(sandbox):
    result = sandbox.run("print('a' * 5000)\nprint('done')")
    assert result.limit == "output" and result.exit_code == 0
    assert result.stdout.startswith("a" * 2000) and "[output truncated: 5,006 bytes written" in result.stdout
    assert "printed more output" in result.observation()


def test_code_interpreter_prepares_and_runs(sandbox):
    tool = CodeInterpreter(sandbox)
    assert tool.name == "code_interpreter"
    schema = tool.schema()
    assert schema["function"]["name"] == "code_interpreter"
    assert schema["function"]["parameters"]["required"] == ["code"]
    assert schema["function"]["parameters"]["properties"]["code"]["type"] == "string"

    result = tool.execute("```python\nimport math\nx = 5\nmath.factorial(x)\n```")
    assert result.ok and result.observation() == "120"
    results = tool.execute_many(["print(1)", None, "'é' * 2", "None"])
    assert [r.observation() for r in results] == ["1", results[1].observation(), "'éé'", ""]
    assert "must be a string" in results[1].observation() and not results[1].ok


def test_prepare_code():
    assert prepare_code("```python\nx = 1\n```") == "x = 1"
    assert prepare_code("```py\na = 1\n```\ntext\n```python\nb = 2\n```") == "a = 1\nb = 2"
    assert prepare_code("```python\nprint(1)\n") == "print(1)\n"  # unclosed fence
    assert prepare_code("x = 1\nprint(x)") == "x = 1\nprint(x)"
    assert prepare_code("for i in range(3):\n    i") == "for i in range(3):\n    i"  # not top level
    assert prepare_code("def f(:") == "def f(:"  # left to the interpreter to report
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model's "print(1if 2 else 3)" must not warn in the trainer's output
        assert prepare_code("x = 1if 2 else 3") == "x = 1if 2 else 3"
    out = prepare_code("a = 'é'; a  # comment\n# trailing\n")
    assert out == "a = 'é'; _ = (a)  # comment\n# trailing\n\nif _ is not None:\n    print(repr(_))\n"
    out = prepare_code("import math\nmath.gcd(\n    12,\n    18)")
    assert out == "import math\n_ = (math.gcd(\n    12,\n    18))\nif _ is not None:\n    print(repr(_))\n"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(out, "main.py", "exec"), {})
    assert printed.getvalue() == "6\n"


# ---- hostile snippets: contained, reported, and the caller survives ----------------------------------------


def test_no_network(sandbox):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    result = sandbox.run(code)
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing connected
    listener.close()
    assert result.limit == "network" and "connected" not in result.stdout
    assert "network access is disabled" in result.observation()
    raw = sandbox.run("import socket\nsocket.socket(socket.AF_UNIX)\n")  # no unix sockets either
    assert raw.exit_code == 1 and "PermissionError" in raw.stderr


def test_fork_bomb(sandbox):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = sandbox.run(code)
    assert time.monotonic() - start < 15
    assert result.limit in ("timeout", "cpu", "nproc", "output", "memory") and not result.ok
    assert snippet_pids(sandbox) == []  # every process of it is gone
    assert sandbox.run("print('still fine')").stdout == "still fine\n"


def test_memory_bomb(sandbox):
    result = sandbox.run("x = bytearray(8 * 1024**3)\nprint(len(x))")
    assert result.limit == "memory" and "MemoryError" in result.stderr and result.stdout == ""
    assert "ran out of memory" in result.observation()


def test_infinite_loop(sandbox):
    start = time.monotonic()
    result = sandbox.run("while True:\n    pass")
    assert time.monotonic() - start < 10
    assert result.limit in ("cpu", "timeout") and result.exit_code is None
    result = sandbox.run("import time\nprint('start', flush=True)\ntime.sleep(60)")
    assert result.limit == "timeout" and result.stdout == "start\n" and 2.9 < result.wall_time < 10


def test_no_writes_outside_workdir(sandbox):
    shared = tempfile.mkdtemp(prefix="sodkern-test-")
    os.chmod(shared, 0o777)  # writable by anyone: only Landlock keeps the snippet out
    targets = [os.path.join(shared, "escape.txt"), str(REPO / f"sandbox-escape-{uuid.uuid4().hex}.txt")]
    try:
        code = "import os\nprint(os.path.exists('main.py'))\nopen('inside.txt', 'w').write('ok')\n"
        code += "".join(f"try:\n    open({t!r}, 'w').write('x')\nexcept OSError as e:\n    print(e)\n" for t in targets)
        result = sandbox.run(code)
        assert result.ok, result
        assert result.stdout.startswith("True\n") and result.stdout.count("Errno") == 2
        assert not any(os.path.exists(t) for t in targets)
    finally:
        for t in targets:
            if os.path.exists(t):
                os.remove(t)
        os.rmdir(shared)


def test_no_secrets_from_parent(sandbox, monkeypatch):
    monkeypatch.setenv("SODKERN_TEST_SECRET", "s3cr3t-token-42")
    code = (
        "import os\nprint(os.environ.get('SODKERN_TEST_SECRET'))\nprint(sorted(os.environ))\n"
        f"for pid in (os.getppid(), {os.getpid()}):\n"
        "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n        print(type(e).__name__)\n"
    )
    result = sandbox.run(code)
    assert result.ok and "s3cr3t" not in result.stdout + result.stderr
    assert result.stdout.startswith("None\n") and result.stdout.count("Error\n") == 2


def test_cannot_kill_parent(sandbox):
    me = os.getpid()
    code = (
        "import os, signal\n"
        f"for pid in ({me}, os.getppid()):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n        print('sent')\n"
        "    except OSError as e:\n        print(type(e).__name__)\n"
        "os.kill(os.getpid(), 0)\nprint('self ok')\n"
    )
    result = sandbox.run(code)
    assert os.getpid() == me and result.ok  # we are still here
    assert "sent" not in result.stdout.splitlines()[0] and result.stdout.endswith("self ok\n")


def test_contained_without_user_switch():
    """As the trainer's own user (the non-root case), Landlock and seccomp alone must keep the parent safe."""
    with LocalSandbox(timeout=3, cpu_seconds=2, memory_mb=512, user=None, fork_server=False) as same_user:
        if same_user.features.get("landlock", 0) < 6:
            pytest.skip("needs Landlock ABI >= 6 (signal scoping); older kernels use the seccomp kill filter")
        assert same_user.ids is None
        shared = tempfile.mkdtemp(prefix="sodkern-test-")
        target = os.path.join(shared, "escape.txt")
        code = (
            "import os, socket\nfor act in (\n"
            f"    lambda: os.kill({os.getpid()}, 9),\n    lambda: os.kill(os.getppid(), 9),\n"
            f"    lambda: open({target!r}, 'w'),\n    lambda: open('/proc/{os.getpid()}/environ').read(),\n"
            "    lambda: socket.socket(),\n):\n"
            "    try:\n        act()\n        print('allowed')\n"
            "    except OSError as e:\n        print(type(e).__name__)\n"
        )
        try:
            result = same_user.run(code)
            assert not os.path.exists(target)
        finally:
            if os.path.exists(target):
                os.remove(target)
            os.rmdir(shared)
        assert result.ok and result.stdout.split() == ["PermissionError"] * 5


# ---- the pure-Python fallback ------------------------------------------------------------------------------


def test_python_fallback_warns_and_limits(monkeypatch):
    monkeypatch.setattr(sandbox_local, "_warned", set())
    with pytest.raises(SandboxUnavailable, match="without allow_weak.*SODKERN_SANDBOX_ALLOW_WEAK=1") as error:
        LocalSandbox(native=False)  # fails closed: the weak launcher only when asked for by name
    assert "\n" not in str(error.value)
    monkeypatch.setattr(sandbox_local, "find_launcher", lambda: None)  # as on a machine without a C compiler
    with pytest.raises(SandboxUnavailable, match="is not built") as error:
        LocalSandbox()
    assert "\n" not in str(error.value) and "pip install" in str(error.value)
    monkeypatch.undo()
    monkeypatch.setattr(sandbox_local, "_warned", set())
    with pytest.warns(RuntimeWarning, match="NETWORK ISOLATION IS OFF"):
        fallback = LocalSandbox(timeout=2, cpu_seconds=1, memory_mb=512, native=False, allow_weak=True)
    with fallback:
        assert fallback.launcher is None
        result = fallback.run("import os\nprint(os.getuid())\n6 * 7", stdin=None)
        assert result.ok and result.stdout.split()[0] == (str(fallback.ids[0]) if IS_ROOT else str(os.getuid()))
        result = fallback.run("while True:\n    pass")
        assert result.limit in ("cpu", "timeout") and result.exit_code is None
        assert fallback.run("x = bytearray(8 * 1024**3)").limit == "memory"
        if IS_ROOT:  # the user switch alone keeps the parent out of reach
            result = fallback.run(f"import os\nos.kill({os.getpid()}, 9)")
            assert "PermissionError" in result.stderr
    monkeypatch.setenv("SODKERN_SANDBOX_NATIVE", "0")
    monkeypatch.setenv("SODKERN_SANDBOX_ALLOW_WEAK", "1")
    assert LocalSandbox().launcher is None


# ---- SandboxFusion client over real HTTP -------------------------------------------------------------------


class _FusionHandler(BaseHTTPRequestHandler):
    """The /run_code endpoint of SandboxFusion, answered by running the snippet in a LocalSandbox."""

    def do_POST(self):  # noqa: N802 (http.server API)
        if self.path != "/run_code":
            self.send_error(500, "boom")
            return
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert request["language"] == "python"
        with LocalSandbox(timeout=request["run_timeout"], memory_mb=request["memory_limit_MB"]) as sb:
            result = sb.run(request["code"], request["stdin"] or None)
        run_result = {
            "status": "TimeLimitExceeded" if result.limit == "timeout" else "Finished",
            "execution_time": result.wall_time,
            "return_code": result.exit_code,
            "stdout": result.stdout,
            "stderr": result.stderr,
        }
        answer = {"status": "Success" if result.ok else "Failed", "message": "", "run_result": run_result}
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_sandbox_fusion_client_over_http():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FusionHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        client = SandboxFusionClient(url, timeout=1.5, retries=0)
        ok = client.run("print(input()[::-1])", stdin="abc\n")
        assert ok.ok and ok.stdout == "cba\n"
        results = client.run_many(["print(1)", "1/0", "import time\ntime.sleep(30)"])
        assert results[0].stdout == "1\n"
        assert results[1].exit_code == 1 and "ZeroDivisionError" in results[1].observation()
        assert results[2].limit == "timeout" and not results[2].ok
        tool = CodeInterpreter(client)
        assert tool.execute("```python\n2 ** 10\n```").observation() == "1024"
        broken = SandboxFusionClient(url + "/broken", retries=1).run("print(1)")  # HTTP 500, retried, reported
        assert broken.exit_code is None and "HTTP 500" in broken.stderr
    finally:
        server.shutdown()
        server.server_close()
    refused = SandboxFusionClient(url, retries=0).run("print(1)")  # nobody listens any more
    assert refused.exit_code is None and "Sandbox error" in refused.observation()


# ---- the CLI ------------------------------------------------------------------------------------------------


def test_cli(tmp_path, capsys):
    script = tmp_path / "snippet.py"
    script.write_text("```python\nprint('hi')\n6 * 7\n```\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sodkern.trainer.cli", "sandbox", str(script), "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hi\n42\n" in proc.stdout and "exit status: 0" in proc.stdout and "limit: none" in proc.stdout

    script.write_text("import time\ntime.sleep(30)\n")
    assert cli_main([str(script), "--timeout", "1", "--memory-mb", "256"]) == 1
    out = capsys.readouterr().out
    assert "limit: timeout" in out and "exit status: killed" in out


# ---- throughput ---------------------------------------------------------------------------------------------


def test_run_many_throughput(sandbox):
    codes = [f"print({i} * {i})" for i in range(40)]
    sandbox.run_many(codes[:4])  # warm the worker threads
    start = time.perf_counter()
    results = sandbox.run_many(codes)
    elapsed = time.perf_counter() - start
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(40)]
    assert all(isinstance(r, ExecResult) and r.ok for r in results)
    rate = len(codes) / elapsed
    print(f"\nsandbox throughput: {rate:.1f} snippets/s with {sandbox.workers} workers")
    assert rate > 2  # a floor that only catches launches being serialised or stuck
