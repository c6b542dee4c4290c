"""Sandbox throughput: trivial snippets per second through ``run_many``, every launcher in one run.

    python bench/sandbox_bench.py                       # 400 snippets x 5 rounds per launcher
    python bench/sandbox_bench.py --snippets 100 --rounds 2 --out /tmp/sbx

Launchers: the fork server (the default LocalSandbox; a second row runs ``import numpy`` snippets, which go to its
servers that preload numpy), the per-interpreter native launcher (``fork_server=False``,
the path before the fork server), the weak pure-Python launcher (``allow_weak=True``) and, when ``--fusion-url``
(or $SANDBOX_FUSION_URL) points at a running SandboxFusion server, that server. Each round runs ``--snippets``
snippets ``print(i)`` and checks every output; rounds are interleaved across the launchers (a shared host's speed
drifts by a factor of two within minutes: every launcher sees the same drift); the table gives the best and the
median round, the ratio of the median to the per-interpreter launcher's, the peak resident memory of the fork
servers and the load average when the run started (the machine may be shared: say so when quoting). A last row is
the floor of any fork-per-snippet design on this machine: bare fork + exit of a process that imported the same
modules, as many such processes as workers. CPU ms/snippet: user + system time of the caller, its waited children
and the fork servers with their snippets, per snippet (kernel work deferred to kernel threads, e.g. namespace
teardown, is not in it); the CPU ceiling is the CPU count divided by it: the rate the same work would reach on
that many idle CPUs, which a shared, loaded machine cannot show directly. Results:
``<out>/sandbox_bench.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

from sodkern.trainer.sandbox import LocalSandbox, SandboxFusionClient

HERE = Path(__file__).resolve().parent


def _peak_rss_mb(sandbox: LocalSandbox) -> float | None:
    servers = [s for idle in sandbox._servers.values() for s in idle.queue] if sandbox.fork_server else []
    total = 0
    for server in servers:
        try:
            with open(f"/proc/{server.pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return None
    return total / 1024 if servers else None


def _cpu_seconds(runner) -> float:
    """CPU time of this process, its waited children (per-interpreter launchers) and the fork servers with
    their snippets (as of now): user + system."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
    servers = runner._servers.values() if getattr(runner, "fork_server", False) else []
    for server in [s for idle in servers for s in idle.queue]:
        with open(f"/proc/{server.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    return total


def measure(launchers: dict, snippets: int, rounds: int) -> list[dict]:
    """Rounds of ``snippets`` trivial snippets through ``run_many`` on every launcher, interleaved (round 1 of
    each, then round 2 of each, ...) so that a machine whose speed drifts (a shared host) drifts for all of
    them alike; snippets/s per round and the checks."""
    rows, runners, codes = [], {}, {}
    for name, (make, template) in launchers.items():
        codes[name] = [template.format(i=i) for i in range(snippets)]
        try:
            runners[name] = make()
            rows.append({"launcher": name, "rates": [], "cpu": [], "wrong": 0})
        except Exception as exc:  # noqa: BLE001 (a launcher not usable here is a row with its reason)
            rows.append({"launcher": name, "status": f"{type(exc).__name__}: {exc}"})
    try:
        for name, runner in runners.items():
            runner.run_many(codes[name][: 2 * runner.workers])  # start every slot
        for _ in range(rounds):
            for row in rows:
                if row["launcher"] not in runners:
                    continue
                runner = runners[row["launcher"]]
                gc.collect()  # the caller's garbage of the last round is not this round's cost
                cpu, start = _cpu_seconds(runner), time.perf_counter()
                results = runner.run_many(codes[row["launcher"]])
                row["rates"].append(snippets / (time.perf_counter() - start))
                row["cpu"].append((_cpu_seconds(runner) - cpu) * 1000 / snippets)
                row["wrong"] += sum(r.stdout != f"{i}\n" for i, r in enumerate(results))
        for row in rows:
            if row["launcher"] not in runners:
                continue
            runner, rates, cpu_ms, wrong = runners[row["launcher"]], row.pop("rates"), row.pop("cpu"), row.pop("wrong")
            row.update(
                status="ok" if wrong == 0 else f"{wrong} wrong outputs",
                workers=runner.workers,
                best=max(rates),
                median=statistics.median(rates),
                rounds=[round(r, 1) for r in rates],
                cpu_ms=statistics.median(cpu_ms),
                ceiling=(os.cpu_count() or 1) * 1000 / statistics.median(cpu_ms),
                peak_rss_mb=_peak_rss_mb(runner) if isinstance(runner, LocalSandbox) else None,
            )
    finally:
        for runner in runners.values():
            runner.close()
    return rows


FORK_FLOOR = """
import ctypes, gc, os, resource, sys, time
fork = ctypes.PyDLL(None).fork  # libc's fork, as the fork server's loop uses (no Python after-fork hooks)
for name in sys.argv[2:]:
    try:
        __import__(name)
    except ImportError:
        pass
gc.collect(); gc.freeze()
def cpu():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
n = int(sys.argv[1]); start, used = time.perf_counter(), cpu()
for _ in range(n):
    pid = fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print(n / (time.perf_counter() - start), (cpu() - used) * 1000 / n)
"""


def fork_floor(snippets: int, rounds: int, workers: int) -> dict:
    """The ceiling of any fork-per-snippet design here: bare fork + exit of a process that imported what a
    fork server preloads, one such process per worker, nothing else done per fork."""
    import subprocess
    import sys

    from sodkern.trainer.sandbox.local import PRELOAD

    rates, cpu_ms = [], []
    for _ in range(rounds):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", FORK_FLOOR, str(snippets // workers), *PRELOAD],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            for _ in range(workers)
        ]
        answers = [p.communicate()[0].split() for p in procs]
        rates.append(sum(float(a[0]) for a in answers))
        cpu_ms.append(statistics.mean(float(a[1]) for a in answers))
    return {
        "launcher": "fork+exit floor",
        "status": "ok (no snippet: the fork alone)",
        "workers": workers,
        "best": max(rates),
        "median": statistics.median(rates),
        "rounds": [round(r, 1) for r in rates],
        "cpu_ms": statistics.median(cpu_ms),
        "ceiling": (os.cpu_count() or 1) * 1000 / statistics.median(cpu_ms),
    }


def write_outputs(rows: list[dict], meta: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    baseline = next((r["median"] for r in rows if r["launcher"] == "per-interpreter" and "median" in r), None)
    lines = [
        f"# Sandbox throughput ({meta['snippets']} trivial snippets x {meta['rounds']} rounds, run_many)",
        "",
        f"{meta['date']}, {meta['cpus']} CPUs, load average at start {meta['load']}, {meta['platform']}",
        "",
        *([meta["note"], ""] if meta.get("note") else []),
        "| launcher | workers | best snippets/s | median snippets/s | x per-interpreter | CPU ms/snippet "
        f"| CPU ceiling on {meta['cpus']} idle CPUs, snippets/s | servers RSS MiB | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "median" not in r:
            lines.append(f"| {r['launcher']} | | | | | | | | {r['status']} |")
            continue
        ratio = f"{r['median'] / baseline:.2f}" if baseline else ""
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else ""
        r["ratio"] = float(ratio) if ratio else None
        lines.append(
            f"| {r['launcher']} | {r['workers']} | {r['best']:.0f} | {r['median']:.0f} | {ratio} | "
            f"{r['cpu_ms']:.2f} | {r['ceiling']:.0f} | {rss} | {r['status']} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "sandbox_bench.md").write_text(table)
    (out / "sandbox_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        measured = [r for r in rows if "median" in r]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh([r["launcher"] for r in measured], [r["median"] for r in measured], color="tab:blue", label="median")
        ax.scatter([r["best"] for r in measured], [r["launcher"] for r in measured], color="k", s=12, label="best")
        ax.axvline(500, color="tab:red", ls="--", lw=1, label="500/s")
        ax.set_xlabel("trivial snippets / s")
        ax.set_title(f"sandbox throughput ({meta['cpus']} CPUs, load {meta['load']})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "sandbox_bench.png", dpi=120)
        plt.close(fig)
    except ImportError:
        pass
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snippets", type=int, default=400, help="snippets per round (default 400)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per launcher (default 5)")
    parser.add_argument("--workers", type=int, default=None, help="run_many slots (default: the sandbox's)")
    parser.add_argument("--fusion-url", default=os.environ.get("SANDBOX_FUSION_URL"), help="SandboxFusion URL")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sandbox", help="output folder")
    parser.add_argument("--note", default="", help="a line about the machine, printed under the table's title")
    args = parser.parse_args(argv)

    common = {"timeout": 10, "workers": args.workers}
    trivial, numpy = "print({i})", "import numpy\nprint({i})"
    launchers = {
        "fork server": (lambda: LocalSandbox(**common), trivial),
        "fork server, numpy snippets": (lambda: LocalSandbox(**common), numpy),
        "per-interpreter": (lambda: LocalSandbox(fork_server=False, **common), trivial),
        "python fallback": (lambda: LocalSandbox(native=False, allow_weak=True, **common), trivial),
    }
    if args.fusion_url:
        launchers["SandboxFusion"] = (lambda: SandboxFusionClient(args.fusion_url, workers=args.workers), trivial)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "platform": platform.platform(),
        "snippets": args.snippets,
        "rounds": args.rounds,
        "note": args.note,
    }
    rows = measure(launchers, args.snippets, args.rounds)
    rows.append(fork_floor(args.snippets, args.rounds, next((r["workers"] for r in rows if "workers" in r), 4)))
    if not args.fusion_url:
        rows.append({"launcher": "SandboxFusion", "status": "not measured: no server (--fusion-url)"})
    print(write_outputs(rows, meta, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
