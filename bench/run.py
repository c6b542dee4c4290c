"""sodkern benchmark suite: one script, one table.

    python bench/run.py --preset cpu        # what a CPU box can run (a few minutes)
    python bench/run.py --preset gpu        # N up to 20,480, V = 151,936, bf16, one CUDA device
    python bench/run.py --preset tiny       # seconds; used by tests/test_bench_smoke.py

For every op (per-token log-probs with entropy, per-token reverse KL, the SOD loss, the step weights) and every
implementation (the naive torch baseline or the public reference loop, sodkern's strategies torch / chunked /
tiled, TRL, verl, Liger-Kernel, cut-cross-entropy; see bench/cases.py) it measures forward and forward+backward
time, peak extra memory and the max error to a float64 reference, and relates them to the baseline of the same
run and to the floor: GEMM FLOPs at the matmul rate measured in this run, or bytes at the measured copy
bandwidth. Implementations that are not installed or that reject the
device are rows with their status, never dropped. Results: ``<out>/bench_<preset>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from cases import OPS  # noqa: E402
from measure import copy_bandwidth, matmul_rate, run_job  # noqa: E402
from peers import versions  # noqa: E402
from report import shape_label, write_outputs  # noqa: E402

PRESETS: dict[str, dict] = {
    "tiny": {
        "dtype": "float32",
        "warmup": 1,
        "repeat": 2,
        "min_total": 0.05,
        "shapes": {
            "logprobs": [{"N": 64, "H": 32, "V": 512}],
            "reverse_kl": [{"N": 64, "Hs": 32, "Ht": 48, "V": 512}],
            "sod_loss": [{"B": 2, "T": 64, "H": 32, "V": 512}],
            "step_weights": [{"B": 4, "T": 256}],
        },
        "check": {
            "logprobs": {"N": 32, "H": 16, "V": 256},
            "reverse_kl": {"N": 32, "Hs": 16, "Ht": 24, "V": 256},
            "sod_loss": {"B": 2, "T": 64, "H": 16, "V": 256},
            "step_weights": {"B": 2, "T": 128},
        },
        "targets": [],
    },
    "cpu": {
        "dtype": "float32",
        "warmup": 0,  # the memory call before timing is the warm-up
        "repeat": 2,
        "min_total": 0.0,
        # sized for a shared 2-core box: every peer, both modes, in one run of ~20 minutes
        "shapes": {
            "logprobs": [{"N": 1024, "H": 256, "V": 32768}],
            "reverse_kl": [{"N": 512, "Hs": 256, "Ht": 384, "V": 32768}],
            "sod_loss": [{"B": 2, "T": 1024, "H": 256, "V": 32768}],
            "step_weights": [{"B": 32, "T": 8192}],
        },
        "check": {
            "logprobs": {"N": 256, "H": 64, "V": 4096},
            "reverse_kl": {"N": 128, "Hs": 64, "Ht": 96, "V": 4096},
            "sod_loss": {"B": 2, "T": 256, "H": 64, "V": 4096},
            "step_weights": {"B": 4, "T": 1024},
        },
        "targets": [
            # (op, impl, mode, shape, metric, comparison, limit)
            (
                "logprobs",
                "sodkern linear_logprobs (chunked)",
                "fwd+bwd",
                {"N": 1024, "H": 256, "V": 32768},
                "mem_ratio",
                "<=",
                0.25,
            ),
            ("step_weights", "sodkern stepwise_weights", "fwd", {"B": 32, "T": 8192}, "speedup", ">=", 300.0),
        ],
    },
    # bench/gpu_check.py's bench stage: the recipe's shapes, the training step (fwd+bwd) only, inside ~3.5 minutes
    "gpu_check": {
        "dtype": "bfloat16",
        "warmup": 0,
        "repeat": 0,
        "min_total": 0.0,
        "modes": ["fwd+bwd"],
        "shapes": {
            "logprobs": [{"N": 20480, "H": h, "V": 151936} for h in (1024, 2048, 2560)],
            "reverse_kl": [{"N": 8192, "Hs": 1024, "Ht": 2560, "V": 151936}],
            "sod_loss": [{"B": 1, "T": 20480, "H": 2048, "V": 151936}],
            "step_weights": [{"B": 1024, "T": 20480}],
        },
        "check": {
            "logprobs": {"N": 512, "H": 1024, "V": 151936},
            "reverse_kl": {"N": 256, "Hs": 1024, "Ht": 2560, "V": 151936},
            "sod_loss": {"B": 2, "T": 256, "H": 1024, "V": 151936},
            "step_weights": {"B": 4, "T": 2048},
        },
        "targets": [],
    },
    "gpu": {
        "dtype": "bfloat16",
        "warmup": 0,
        "repeat": 0,  # do_bench picks the repeats
        "min_total": 0.0,
        "shapes": {
            "logprobs": [{"N": n, "H": h, "V": 151936} for n in (4096, 20480) for h in (1024, 2048, 2560)],
            "reverse_kl": [
                {"N": 4096, "Hs": 1024, "Ht": 2560, "V": 151936},
                {"N": 4096, "Hs": 2048, "Ht": 2560, "V": 151936},
            ],
            # packed batches: one 20K-token response, and 8 x 4K responses of a mini-batch
            "sod_loss": [{"B": 1, "T": 20480, "H": 2048, "V": 151936}, {"B": 8, "T": 4096, "H": 1024, "V": 151936}],
            "step_weights": [{"B": 1024, "T": 20480}],
        },
        "check": {
            "logprobs": {"N": 512, "H": 1024, "V": 151936},
            "reverse_kl": {"N": 256, "Hs": 1024, "Ht": 2560, "V": 151936},
            "sod_loss": {"B": 2, "T": 256, "H": 1024, "V": 151936},
            "step_weights": {"B": 4, "T": 2048},
        },
        "targets": [],
    },
}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def jobs_for(preset: dict, device: str, ops: list[str], threads: int) -> list[dict]:
    jobs = []
    for name in ops:
        op = OPS[name]
        modes = [False, True] if op.grad_names else [False]
        if "modes" in preset and op.grad_names:
            modes = [m for m in modes if ("fwd+bwd" if m else "fwd") in preset["modes"]]
        for shape in preset["shapes"][name]:
            for backward in modes:
                for impl in op.impls:
                    jobs.append(
                        {
                            "op": name,
                            "impl": impl.name,
                            "shape": shape,
                            "check_shape": preset["check"][name],
                            "backward": backward,
                            "device": device,
                            "dtype": preset["dtype"],
                            "warmup": preset["warmup"],
                            "repeat": preset["repeat"],
                            "min_total": preset["min_total"],
                            "threads": threads,
                            "seed": 0,
                        }
                    )
    return jobs


def run_in_subprocess(job: dict, timeout: float) -> dict:
    """CPU jobs run in a fresh interpreter so that each peak RSS is its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: worker timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@result "):
            return json.loads(line[len("@@result ") :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return {"status": f"failed: worker exit code {proc.returncode}: {tail}"}


def add_derived(rows: list[dict], preset: dict, device: str) -> dict:
    """Baseline ratios and floors, in place. Returns the measured rates (matmul FLOP/s, copy bytes/s)."""
    dtype = getattr(torch, preset["dtype"])
    w, r = max(preset["warmup"], 1), max(preset["repeat"], 3)
    rates: dict[str, float] = {}
    for row in rows:
        op = OPS[row["op"]]
        base = next(
            (b for b in rows if b["op"] == row["op"] and b["shape"] == row["shape"] and b["mode"] == row["mode"]
             and b["impl"] == op.impls[0].name),
            None,
        )  # fmt: skip
        ok = row["status"] == "ok" and base is not None and base["status"] == "ok"
        row["speedup"] = base["time_s"] / row["time_s"] if ok else None
        mem_ok = ok and row.get("mem_bytes") is not None and base.get("mem_bytes")
        row["mem_ratio"] = row["mem_bytes"] / base["mem_bytes"] if mem_ok else None
        if row["status"] != "ok":
            continue
        shape = dict(row["shape"], **({"tokens": row["tokens"]} if "tokens" in row else {}))
        impl = next(i for i in op.impls if i.name == row["impl"])
        if op.bytes_per_token:
            nbytes = op.bytes_per_token * shape["B"] * shape["T"]
            key = f"copy {nbytes / 2**20:.1f} MiB"
            if key not in rates:
                rates[key] = copy_bandwidth(nbytes, device, w, r)
            row["floor_s"], row["floor"] = nbytes / rates[key], f"{op.bytes_per_token} B/token"
        else:
            backward = row["mode"] == "fwd+bwd"
            for n, h, v in op.gemm(shape)[:1]:
                key = f"matmul {n}x{h}x{v} {preset['dtype']}"
                if key not in rates:
                    rates[key] = matmul_rate(n, h, v, dtype, device, w, r)
            flops = op.floor_flops(shape, backward, impl.recompute)
            passes = "+".join(str(p) for p in op.passes(backward, impl.recompute))
            row["floor_s"], row["floor"] = flops / rates[key], f"{passes} GEMM pass{'es' if passes != '1' else ''}"
        row["x_floor"] = row["time_s"] / row["floor_s"]
    return rates


def check_targets(rows: list[dict], targets: list) -> list[dict]:
    out = []
    for op, impl, mode, shape, metric, cmp, limit in targets:
        row = next((r for r in rows if (r["op"], r["impl"], r["mode"], r["shape"]) == (op, impl, mode, shape)), None)
        value = row.get(metric) if row else None
        met = value is not None and (value <= limit if cmp == "<=" else value >= limit)
        what = f"{impl} {mode} {shape_label(shape)}: {metric} {cmp} {limit:g}"
        out.append({"target": what, "value": value, "met": met, "status": row["status"] if row else "not run"})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="directory for bench_<preset>.{md,json,png}")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (default: torch's)")
    ap.add_argument("--job-timeout", type=float, default=900.0, help="seconds per CPU worker")
    ap.add_argument(
        "--no-isolate",
        action="store_true",
        help="run CPU jobs in this process (faster start; each peak RSS is then not isolated from earlier jobs)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("@@result " + json.dumps(run_job(json.loads(args.worker))), flush=True)
        return 0

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    if args.preset.startswith("gpu") and not device.startswith("cuda"):
        ap.error(f"--preset {args.preset} needs a CUDA device (its shapes need ~40 GB); use --preset cpu here")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        ap.error(f"--ops: unknown {unknown}; choose from {list(OPS)}")
    preset = PRESETS[args.preset]
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = jobs_for(preset, device, ops, args.threads)
    load_start = os.getloadavg()
    # a subset of ops or a thread count gets its own files, so it never overwrites the full run
    stem = f"bench_{args.preset}" + ("" if ops == list(OPS) else "_" + "-".join(ops))
    stem += f"_threads{args.threads}" if args.threads else ""

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    rows = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("bench", total=len(jobs))
        for job in jobs:
            mode = "fwd+bwd" if job["backward"] else "fwd"
            label = f"{job['op']:<12} {job['impl'][:32]:<32} {mode:<7} {shape_label(job['shape'])}"
            progress.update(task, description=label)
            if not console.is_terminal:  # no live bar: one line per job
                print(f"[{len(rows) + 1}/{len(jobs)}] {label}", file=sys.stderr, flush=True)
            isolate = not device.startswith("cuda") and not args.no_isolate
            res = run_in_subprocess(job, args.job_timeout) if isolate else run_job(job)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()  # in-process jobs: hand the last job's blocks back before the next
            rows.append({"op": job["op"], "impl": job["impl"], "shape": job["shape"], "mode": mode, **res})
            progress.advance(task)
            # rows so far, so that a run killed at its timeout (bench/gpu_check.py) still leaves them
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{stem}.partial.json").write_text(json.dumps({"rows": rows}) + "\n")
        progress.update(task, description="floors (matmul rate, copy bandwidth)")
        rates = add_derived(rows, preset, device)

    meta = {
        "command": " ".join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "preset": args.preset,
        "device": device_name(device),
        "dtype": preset["dtype"],
        "torch": torch.__version__,
        "triton": _version("triton"),
        **{k.replace("-", "_"): v for k, v in versions().items() if k != "triton"},
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": {k: os.environ[k] for k in ("SODKERN_BACKEND", "TRITON_INTERPRET") if k in os.environ},
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg": {"start": load_start[0], "end": os.getloadavg()[0]},  # 1-min load: is the box shared?
        "rates": rates,
    }
    targets = check_targets(rows, [t for t in preset["targets"] if t[0] in ops])
    if args.no_isolate and not device.startswith("cuda"):
        meta["note"] = "--no-isolate: CPU peak RSS measured in one process, after earlier jobs"
    out_console = Console() if Console().is_terminal else Console(width=240)
    write_outputs(args.out, stem, meta, rows, targets, out_console)
    (args.out / f"{stem}.partial.json").unlink(missing_ok=True)
    return 0


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
