"""Static Hopper (sm_90) check of every Triton kernel and launch configuration, without a GPU.

    python bench/sm90.py                    # writes bench/results/sm90_compile.{md,json}
    python bench/sm90.py --out DIR          # elsewhere (tests/test_sm90_compile.py)

How: the host launch functions of ``sodkern.kernels`` run on small CPU tensors, once per launch
configuration they can choose on a GPU (dtype, optional outputs, which gradients, block sizes). Each
``kernel[grid](...)`` launch is intercepted: Triton's own binder specialises the arguments exactly as a CUDA
launch would (types, constexprs, 16-byte alignment), then ``triton.compile`` builds the kernel for
``GPUTarget("cuda", 90, 32)`` and the launch itself is skipped (the host code continues on unwritten
outputs, which nothing here reads). The PTX is then assembled by the ptxas that ships in the Triton wheel with
``-v``: registers per thread, spill stores/loads and stack frame; shared memory is what Triton asks for at
launch (``metadata.shared``). Exit code 1 when a kernel spills (beyond ``KNOWN_SPILLS``), needs more shared
memory than a Hopper block may have (227 KiB) or a ``*_kernel`` of ``sodkern.kernels`` was never launched.

Must run WITHOUT ``TRITON_INTERPRET`` (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (H100/H200), opt-in maximum
# Kernels whose spills are known and accepted for now: the "tiled" strategy's kernels (issue 14), which the
# "chunked" strategy replaces as the CUDA default. Their rows still say "spills"; the check fails if one of
# them stops spilling (then drop it from here) or if any other kernel spills.
KNOWN_SPILLS = {
    "kernels.linear_logprobs._logprobs_bwd_kernel": "tiled backward: fp32 dh/dw tiles + atomics exceed 255 registers",
    "kernels.linear_kl._kl_bwd_kernel": "tiled backward: fp32 dh/dw tiles + atomics exceed 255 registers",
    "kernels.linear_kl._kl_fwd_kernel": "tiled KL forward, fp32 tiles (BLOCK_N=32, 4 warps): two logits tiles",
}

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("bench/sm90.py: unset TRITON_INTERPRET (it compiles the kernels, it does not interpret them)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # (backend, compute capability, warp size): an H100/H200
# fp16 takes bf16's launch configuration and the same code path (16-bit tiles, tensor-core dots): bf16 stands for both
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------------------
# Launch interception and compilation
# ----------------------------------------------------------------------------------------------------------


def _describe(value: object) -> object:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


@contextlib.contextmanager
def intercept(records: list[dict]) -> Iterator[None]:
    """Replace ``JITFunction.run``: bind and specialise like a CUDA launch, compile for sm_90, launch nothing."""
    backend = make_backend(TARGET)
    original = JITFunction.run

    def run(self: JITFunction, *args, grid, warmup, **kwargs):  # noqa: ARG001
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        key = (self.fn.__module__, self.fn.__name__, json.dumps(signature, sort_keys=True), repr(constexprs))
        key += (options.num_warps, options.num_stages)
        if any(r["_key"] == key for r in records):
            return None
        t0 = time.perf_counter()
        src = ASTSource(self, signature, constexprs, attrs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints its own ``ptxas -v`` log (not on a cache hit)
            compiled = triton.compile(src, target=TARGET, options=options.__dict__)
        names = [p.name for p in self.params]
        records.append(
            {
                "_key": key,
                "kernel": f"{self.fn.__module__.removeprefix('sodkern.')}.{self.fn.__name__}",
                "constexprs": {names[path[0]]: _describe(v) for path, v in constexprs.items()},
                "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                "num_warps": options.num_warps,
                "num_stages": options.num_stages,
                "shared_bytes": int(compiled.metadata.shared),
                "name": compiled.metadata.name,
                "ptx": compiled.asm["ptx"],
                "ptxas_log": log.getvalue(),
                "compile_s": time.perf_counter() - t0,
            }
        )
        return None

    JITFunction.run = run
    dump, knobs.nvidia.dump_ptxas_log = knobs.nvidia.dump_ptxas_log, True
    try:
        yield
    finally:
        JITFunction.run = original
        knobs.nvidia.dump_ptxas_log = dump


def ptxas_path() -> str:
    """The ptxas Triton itself uses for this target (shipped in the Triton wheel)."""
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(TARGET.arch)
    except TypeError:  # older Triton: get_ptxas() without the arch
        tool = compiler.get_ptxas()
    return tool if isinstance(tool, str) else tool.path


def ptxas_report(ptx: str, name: str, log: str = "") -> dict:
    """Registers, spills and stack of the entry ``name`` from ``ptxas -v`` for sm_90a: Triton's own log when it
    compiled, else (a cache hit) ptxas run here with Triton's flags."""
    if "registers" not in log:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            cmd = [ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src)]
            proc = subprocess.run([*cmd, "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed for {name}: {log.strip()[-400:]}")
    out = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    out["stack_bytes"], out["spill_stores"], out["spill_loads"] = (int(g) for g in m.groups())
    out["registers"] = int(re.search(r"Used (\d+) registers", log).group(1))
    return out


# ----------------------------------------------------------------------------------------------------------
# Launch configurations: every choice the host code makes on a GPU
# ----------------------------------------------------------------------------------------------------------


def _t(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _tiled_logprobs() -> None:
    from sodkern.kernels import linear_logprobs as k

    n, h, v = 70, 40, 300
    for dtype in DTYPES.values():
        hidden, weight = _t((n, h), dtype), _t((v, h), dtype, 1)
        targets = torch.randint(0, v, (n,))
        for entropy in (False, True):
            k.linear_logprobs_fwd(hidden, weight, targets, 1.0, entropy)
        lse, grad = torch.zeros(n), torch.ones(n)
        for dh, dw in ((True, True), (True, False), (False, True)):
            k.linear_logprobs_bwd(hidden, weight, targets, lse, grad, 1.0, dh, dw)
        k.linear_logprobs_bwd(hidden, weight, targets, lse, grad, 1.0, True, True, lse, grad)  # entropy gradient


def _tiled_kl() -> None:
    from sodkern.kernels import linear_kl as k

    n, hs, ht, v = 70, 40, 56, 300
    pairs = [(d, d) for d in DTYPES.values()] + [(torch.bfloat16, torch.float32)]  # a bf16 student, fp32 teacher
    for ds, dt in pairs:
        hs_, ws_ = _t((n, hs), ds), _t((v, hs), ds, 1)
        ht_, wt_ = _t((n, ht), dt, 2), _t((v, ht), dt, 3)
        k.linear_reverse_kl_fwd(hs_, ws_, ht_, wt_, 1.0)
        z = torch.zeros(n)
        for dh, dw in ((True, True), (True, False), (False, True)):
            k.linear_reverse_kl_bwd(hs_, ws_, ht_, wt_, z, z, z, torch.ones(n), 1.0, dh, dw)


def _chunked_folds() -> None:
    from sodkern.kernels import fold as k

    n, cols, v0 = 5, 3000, 1000  # a ragged tile: 3000 columns of 1024-column blocks
    z, z2 = _t((n, cols), torch.float32), _t((n, cols), torch.float32, 1)
    targets = torch.randint(0, 4000, (n,))
    stats = [torch.zeros(n) for _ in range(5)]
    for entropy in (False, True):
        k.fold_lse(z, targets, v0, 1.0, *stats[:3], stats[3] if entropy else None)
    k.fold_kl(z, z2, 1.0, *stats)
    g = torch.ones(n)
    for dtype in DTYPES.values():  # dz is written in the GEMM dtype (fp32 in place into the tile, or bf16)
        out = torch.empty((n, cols), dtype=dtype)
        for grad_logp, grad_ent in ((g, None), (g, g), (None, g)):
            k.logprob_grad(z, out, targets, v0, g, grad_logp, g, grad_ent, 1.0)
        k.kl_grad(z, z2, out, g, g, g, g, 1.0)


def _step_weights() -> None:
    from sodkern.kernels import step_weights as k

    for T in (100, 3000):  # BLOCK_T = next_power_of_2(T) clamped to [128, 2048]: both ends
        mask = torch.ones(2, T, dtype=torch.bool).view(torch.uint8)
        s = torch.zeros(2, T)
        k.count_steps(mask)
        k.step_sums(s, s, mask, 3)  # positional: the two log-prob arrays
        k.token_weights(mask, torch.ones(2, 3))


# Extend this list when a kernel module is added: (label, function launching every configuration).
LAUNCHERS: list[tuple[str, Callable[[], None]]] = [
    ("tiled linear_logprobs", _tiled_logprobs),
    ("tiled linear_reverse_kl", _tiled_kl),
    ("chunked folds", _chunked_folds),
    ("step_weights", _step_weights),
]


def all_kernels() -> list[str]:
    """Every ``*_kernel`` JIT function defined in the modules of ``sodkern.kernels``."""
    import sodkern.kernels as pkg

    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"sodkern.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == mod.__name__:
                found.append(f"kernels.{info.name}.{name}")
    return sorted(found)


def check(threads: int = 0) -> dict:
    """Compile every configuration; returns ``{"meta", "rows", "uncovered", "ok"}``."""
    if threads:
        torch.set_num_threads(threads)
    records: list[dict] = []
    t0 = time.perf_counter()
    with intercept(records):
        for _label, launch in LAUNCHERS:
            launch()
    rows = []
    for r in records:
        rep = ptxas_report(r.pop("ptx"), r["name"], r.pop("ptxas_log"))
        r.pop("_key")
        r.update(rep)
        problems = []
        if r["spill_stores"] or r["spill_loads"]:
            problems.append("spills" + (" (known)" if r["kernel"] in KNOWN_SPILLS else ""))
        if r["shared_bytes"] > SMEM_LIMIT:
            problems.append(f"shared memory > {SMEM_LIMIT} B")
        r["ok"] = not problems
        r["problems"] = problems
        rows.append(r)
    launched = {r["kernel"] for r in rows}
    uncovered = [k for k in all_kernels() if k not in launched]
    unexpected = [r for r in rows if any(not p.endswith("(known)") for p in r["problems"])]
    spilling = {r["kernel"] for r in rows if r["spill_stores"] or r["spill_loads"]}
    stale = sorted(k for k in KNOWN_SPILLS if k in launched and k not in spilling)
    ptxas = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True).stdout.strip()
    meta = {
        "command": "python bench/sm90.py",
        "target": f"cuda sm_{TARGET.arch} (warp {TARGET.warp_size})",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": ptxas.splitlines()[-1],
        "smem_limit_bytes": SMEM_LIMIT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    ok = not unexpected and not uncovered and not stale
    return {"meta": meta, "rows": rows, "uncovered": uncovered, "stale_known_spills": stale, "ok": ok}


def _config(r: dict) -> str:
    parts = [f"{k}={v}" for k, v in r["constexprs"].items() if v is not None]
    dtypes = sorted({v[1:] for v in r["signature"].values() if v.startswith("*") and not v.startswith("*i")})
    return " ".join([f"ptr {'/'.join(dtypes)}", *parts, f"warps={r['num_warps']}", f"stages={r['num_stages']}"])


def to_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        "# sm_90 compile report: every Triton kernel and launch configuration",
        "",
        f"- command: `{m['command']}` (no GPU needed)",
        f"- target: {m['target']}; triton {m['triton']}; {m['ptxas']}; torch {m['torch']}; date {m['date']}",
        f"- limits: no spills; shared memory <= {m['smem_limit_bytes']} B (227 KiB, Hopper's per-block maximum)",
        f"- result: {'PASS' if result['ok'] else 'FAIL'} (no spills beyond `KNOWN_SPILLS`), "
        f"{len(result['rows'])} configurations in {m['seconds']} s; {sum(r['ok'] for r in result['rows'])} "
        "without spills",
        "",
        "| kernel | configuration | regs/thread | spill st/ld (B) | stack (B) | shared (B) | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ok = "yes" if r["ok"] else "NO: " + ", ".join(r["problems"])
        lines.append(
            f"| {r['kernel']} | {_config(r)} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} "
            f"| {r['stack_bytes']} | {r['shared_bytes']:,} | {ok} |"
        )
    known = sorted({r["kernel"] for r in result["rows"] if r["kernel"] in KNOWN_SPILLS and not r["ok"]})
    if known:
        lines += ["", "Known spills, accepted for now (`KNOWN_SPILLS` in bench/sm90.py):"]
        lines += [f"- {k}: {KNOWN_SPILLS[k]}" for k in known]
    if result["stale_known_spills"]:
        lines += ["", "No longer spilling: remove from `KNOWN_SPILLS`:"]
        lines += [f"- {k}" for k in result["stale_known_spills"]]
    if result["uncovered"]:
        lines += ["", "Kernels never launched by the configurations above (add them to LAUNCHERS in bench/sm90.py):"]
        lines += [f"- {k}" for k in result["uncovered"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results", help="directory for sm90_compile.{md,json}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the host code (default 1)")
    args = ap.parse_args(argv)
    result = check(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(result)
    (args.out / "sm90_compile.md").write_text(md)
    (args.out / "sm90_compile.json").write_text(json.dumps(result, indent=1) + "\n")
    print(md, flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
