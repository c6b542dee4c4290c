"""Measurements: median time, peak extra memory, the matmul rate and copy bandwidth floors, and one job.

Time: on CUDA ``triton.testing.do_bench`` medians; on CPU ``time.perf_counter`` medians after warm-up.
Memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the call (after
``reset_peak_memory_stats``); on CPU the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) above
the RSS once the inputs exist. CPU jobs run in a fresh subprocess each (``bench/run.py --worker``), so one
case's freed memory or caches never lower another's peak.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from cases import OPS, Impl, Inputs, Op, require


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timings(
    fn: Callable[[], object],
    device: str,
    *,
    warmup: int,
    repeat: int,
    grads: list[torch.Tensor] = (),
    min_total: float = 1.0,
    mode: str = "median",
) -> float:
    """Median (or ``mode="min"``) seconds of ``fn()``; the ``.grad`` of ``grads`` is cleared before every call
    (not timed). CPU: at least ``repeat`` timed calls, more (up to 100) until they add up to ``min_total`` s."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, grad_to_none=list(grads) or None, return_mode=mode) / 1e3
    times: list[float] = []
    for _ in range(warmup):
        fn()
    while len(times) < repeat or (sum(times) < min_total and len(times) < 100):
        for t in grads:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if mode == "median" else min(times)


def _proc_status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak memory of one ``fn()`` call above what was allocated before it; None where it cannot be read."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        return None
    gc.collect()
    base = _proc_status_kib("VmRSS")
    clear.write_text("5")  # resets VmHWM to the current RSS
    fn()
    return (_proc_status_kib("VmHWM") - base) * 1024


def matmul_rate(n: int, h: int, v: int, dtype: torch.dtype, device: str, warmup: int, repeat: int) -> float:
    """FLOP/s of a plain ``hidden [n, h] @ W.T [h, v]``, its best call: the floor is the fastest it can run."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(v, h, generator=g).to(device=device, dtype=dtype)
    t = timings(lambda: a @ b.T, device, warmup=warmup, repeat=repeat, mode="min")
    return 2.0 * n * h * v / t


def copy_bandwidth(nbytes: int, device: str, warmup: int, repeat: int) -> float:
    """Bytes/s (read + write) of a plain copy of an ``nbytes`` buffer, its best call."""
    x = torch.ones(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = timings(lambda: y.copy_(x), device, warmup=max(warmup, 2), repeat=max(repeat, 5), mode="min")
    return 2.0 * nbytes / t


def _detached(inp: Inputs, grad_names: tuple[str, ...], dtype: torch.dtype | None = None) -> Inputs:
    out = {}
    for k, v in inp.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.requires_grad_(True) if k in grad_names else v
    return out


def _outputs(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def _call(fn: Callable[[], torch.Tensor], inp: Inputs, backward: bool) -> Callable[[], torch.Tensor]:
    """``fn`` as the timed unit: under no_grad for fwd; forward and ``backward`` for fwd+bwd. A tuple output
    (log-probs and entropy) is back-propagated through its first element."""

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return fn()

    def fwd_bwd() -> torch.Tensor:
        out = fn()
        first = _outputs(out)[0]
        first.backward(None if first.dim() == 0 else inp["grad_out"].to(first.dtype))
        return out

    return fwd_bwd if backward else fwd


def max_error(op: Op, impl: Impl, inp: Inputs, backward: bool) -> float:
    """Max abs difference to the float64 reference, over the output and (fwd+bwd) the input gradients."""
    names = op.grad_names if backward else ()
    run = _detached(inp, names)
    out = _call(impl.build(run), run, backward)()
    ref_in = _detached(inp, names, torch.float64)
    ref_fn = impl.reference or op.reference
    ref = _call(lambda: ref_fn(ref_in), ref_in, backward)()
    outs, refs = _outputs(out), _outputs(ref)
    if len(outs) != len(refs):
        raise ValueError(f"{impl.name}: {len(outs)} outputs, the reference has {len(refs)}")
    err = max((o.double() - r.detach()).abs().max().item() for o, r in zip(outs, refs))
    for k in names:
        err = max(err, (run[k].grad.double() - ref_in[k].grad).abs().max().item())
    return err


def run_job(job: dict) -> dict:
    """Run one (op, impl, shape, mode) job: error at the check shape, peak memory, median time.

    ``job``: op, impl (name), shape, check_shape, backward, device, dtype, warmup, repeat, min_total, seed,
    threads (torch intra-op threads on CPU; 0 = torch's default).
    Returns a dict with status ("ok" or why not) and time_s, mem_bytes, max_err, tokens, note.
    """
    op = OPS[job["op"]]
    impl = next(i for i in op.impls if i.name == job["impl"])
    device, dtype, backward = job["device"], getattr(torch, job["dtype"]), job["backward"]
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    try:
        require(impl)
    except ImportError as e:
        return {"status": f"missing: {e} ({impl.install})"}
    res: dict = {"status": "ok", "note": ""}
    try:
        check = op.make_inputs(job["check_shape"], device, dtype, job["seed"])
        res["max_err"] = max_error(op, impl, check, backward)  # also warms the code paths up
        del check
        shape = dict(job["shape"])
        inp = _detached(op.make_inputs(shape, device, dtype, job["seed"]), op.grad_names if backward else ())
        if "mask" in inp and "hidden" in inp:
            res["tokens"] = int(inp["mask"].sum())
        scale = 1.0
        if impl.max_rows and shape.get("B", 0) > impl.max_rows:
            scale = shape["B"] / impl.max_rows
            inp = {k: v[: impl.max_rows] for k, v in inp.items()}
            res["note"] = f"timed on {impl.max_rows} of {shape['B']} rows, x{scale:g}; memory of those rows"
        grads = [inp[k] for k in (op.grad_names if backward else ())]
        unit = _call(impl.build(inp), inp, backward)
        res["mem_bytes"] = peak_extra_bytes(unit, device)  # the first full-size call, on a fresh process
        for t in grads:
            t.grad = None
        t = timings(unit, device, warmup=job["warmup"], repeat=job["repeat"], grads=grads, min_total=job["min_total"])
        res["time_s"] = scale * t
    except torch.OutOfMemoryError as e:
        return {"status": f"OOM: {str(e).splitlines()[0][:160]}"}
    except Exception as e:  # a peer that rejects this device/dtype is reported, not hidden
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return {"status": f"unsupported: {type(e).__name__}: {msg}"}
    return res
