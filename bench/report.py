"""The results table: printed with rich, written as Markdown, JSON and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = (
    "op",
    "impl",
    "shape",
    "mode",
    "status",
    "time",
    "vs base",
    "x floor",
    "floor",
    "peak mem",
    "mem/base",
    "max err",
)


def shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _time(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _mem(b: int | None) -> str:
    return "" if b is None else f"{b / 2**20:,.1f} MiB"


def cells(row: dict) -> list[str]:
    ok = row["status"] == "ok"
    status = "ok" + (f" ({row['note']})" if row.get("note") else "") if ok else row["status"]
    return [
        row["op"],
        row["impl"],
        shape_label(row["shape"]),
        row["mode"],
        status,
        _time(row.get("time_s")),
        _num(row.get("speedup"), ".3g") + ("x" if row.get("speedup") is not None else ""),
        _num(row.get("x_floor"), ".3g"),
        row.get("floor", "") if ok else "",
        _mem(row.get("mem_bytes")),
        _num(row.get("mem_ratio"), ".3f"),
        _num(row.get("max_err"), ".2e"),
    ]


def markdown(meta: dict, rows: list[dict], targets: list[dict]) -> str:
    lines = [
        f"# sodkern benchmarks: preset `{meta['preset']}`",
        "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']}; dtype {meta['dtype']}; torch threads {meta['threads']} of "
        f"{meta['cpu_count']} CPUs; 1-min load average {meta['load_avg']['start']:.1f} at start, "
        f"{meta['load_avg']['end']:.1f} at end",
        f"- torch {meta['torch']}, triton {meta['triton']}, transformers {meta.get('transformers')}, "
        f"trl {meta.get('trl')}, verl {meta.get('verl')}, liger-kernel {meta.get('liger_kernel')}, "
        f"cut-cross-entropy {meta.get('cut_cross_entropy')}, python {meta['python']}",
        f"- date: {meta['date']}" + (f"; env {meta['env']}" if meta["env"] else ""),
        *([f"- note: {meta['note']}"] if meta.get("note") else []),
        "- floors measured in this run (best call): "
        + "; ".join(
            f"{k}: {v / 1e9:.3g} {'GFLOP/s' if k.startswith('matmul') else 'GB/s'}" for k, v in meta["rates"].items()
        ),
        "",
        "`vs base`: baseline time / this time (baseline: the first row of each op, shape and mode). "
        "`x floor`: time / (GEMM FLOPs at the measured matmul rate, or bytes at the measured copy bandwidth). "
        "`peak mem`: peak memory of one call above its inputs (CPU: peak RSS of a fresh process). "
        "`max err`: max abs difference to a float64 reference at a small shape, over the output and, for fwd+bwd, "
        "the gradients of hidden and weight.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in rows]
    lines += versus_peers(rows)
    if targets:
        lines += ["", "## Targets", ""]
        for t in targets:
            val = "not measured" if t["value"] is None else f"{t['value']:.4g}"
            lines.append(f"- {'MET' if t['met'] else 'MISSED'}: {t['target']} -> {val} ({t['status']})")
    return "\n".join(lines) + "\n"


def _strategy(row: dict) -> str:
    """``sodkern linear_logprobs (chunked)`` -> ``chunked``."""
    name = row["impl"]
    return name[name.rfind("(") + 1 : -1] if name.endswith(")") else "default"


def versus_peers(rows: list[dict]) -> list[str]:
    """Markdown lines: per op, shape and mode, sodkern's best time and lowest memory (over its strategies)
    against each other implementation that ran (``x``: how many times the peer's time or memory)."""
    out = ["", "## sodkern's best against each peer", ""]
    cols = ("op", "shape", "mode", "sodkern best time", "peer", "peer time", "x time", "sodkern min mem", "peer mem")
    out += ["| " + " | ".join((*cols, "x mem")) + " |", "|" + "---|" * (len(cols) + 1)]
    groups = dict.fromkeys((r["op"], shape_label(r["shape"]), r["mode"]) for r in rows)
    for op, shape, mode in groups:
        rs = [r for r in rows if (r["op"], shape_label(r["shape"]), r["mode"]) == (op, shape, mode)]
        ok = [r for r in rs if r["status"] == "ok" and r.get("time_s")]
        ours = [r for r in ok if r["impl"].startswith("sodkern")]
        if not ours:
            continue
        fast = min(ours, key=lambda r: r["time_s"])
        mems = [r for r in ours if r.get("mem_bytes") is not None]
        lean = min(mems, key=lambda r: r["mem_bytes"]) if mems else None
        for peer in rs:
            if peer["impl"].startswith("sodkern"):
                continue
            if peer["status"] != "ok":
                out.append(f"| {op} | {shape} | {mode} | | {peer['impl']} | {peer['status'].split(':')[0]} | | | | |")
                continue
            xt = peer["time_s"] / fast["time_s"]
            xm = peer["mem_bytes"] / lean["mem_bytes"] if lean and peer.get("mem_bytes") and lean["mem_bytes"] else None
            lean_cell = f"{_mem(lean['mem_bytes'])} ({_strategy(lean)})" if lean else ""
            out.append(
                f"| {op} | {shape} | {mode} | {_time(fast['time_s'])} ({_strategy(fast)}) "
                f"| {peer['impl']} | {_time(peer['time_s'])} | {xt:.2f} "
                f"| {lean_cell} | {_mem(peer.get('mem_bytes'))} | {_num(xm, '.2f')} |"
            )
    return out


def chart(path: Path, meta: dict, rows: list[dict]) -> None:
    """Horizontal bars per op: median time (log) and peak extra memory (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ops = list(dict.fromkeys(r["op"] for r in rows))
    per_op = {op: [r for r in rows if r["op"] == op] for op in ops}
    heights = [max(1.5, 0.32 * len(per_op[op]) + 0.8) for op in ops]
    fig, axes = plt.subplots(len(ops), 2, figsize=(14, sum(heights)), squeeze=False, height_ratios=heights)
    for (ax_t, ax_m), op in zip(axes, ops):
        rs = per_op[op]
        labels = [f"{r['impl']} {r['mode']} {shape_label(r['shape'])}" for r in rs]
        y = range(len(rs))
        for ax, key, scale, unit in ((ax_t, "time_s", 1e3, "ms"), (ax_m, "mem_bytes", 2**-20, "MiB")):
            vals = [(r.get(key) or 0) * scale for r in rs]
            pos = [v for v in vals if v > 0]
            left = min(pos) / 5 if pos else 1.0  # log bars start well left of the smallest one
            colors = ["tab:orange" if "sodkern" in r["impl"] else "tab:gray" for r in rs]
            ax.barh(list(y), [v - left if v > 0 else float("nan") for v in vals], left=left, color=colors)
            for yi, r, v in zip(y, rs, vals):
                text = (
                    (f" {v:,.0f} {unit}" if v >= 100 else f" {v:.3g} {unit}")
                    if v > 0
                    else " " + r["status"].split(":")[0]
                )
                ax.text(max(v, left), yi, text, va="center", fontsize=7)
            if pos:
                ax.set_xscale("log")
                ax.set_xlim(left, max(pos) * 8)
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(f"{'time' if key == 'time_s' else 'peak extra memory'} ({unit})")
            ax.set_yticks(list(y))
            ax.set_yticklabels(labels if ax is ax_t else [], fontsize=7)
            ax.invert_yaxis()
        ax_t.set_title(op, loc="left", fontsize=9)
    fig.suptitle(f"sodkern bench, preset {meta['preset']}: {meta['device']}, {meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, stem: str, meta: dict, rows: list[dict], targets: list[dict], console) -> None:
    """Write ``<out>/<stem>.{json,md,png}``, then print the table (last)."""
    from rich.markup import escape
    from rich.table import Table

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(meta, rows, targets))
    chart(out / f"{stem}.png", meta, rows)

    table = Table(title=f"sodkern bench ({meta['preset']}): {meta['device']}, {meta['dtype']}, torch {meta['torch']}")
    for c in COLUMNS:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(escape(c) for c in cells(r)))
    console.print(f"results: {out / stem}.{{md,json,png}}")
    for t in targets:
        val = "not measured" if t["value"] is None else f"{t['value']:.4g}"
        console.print(f"{'MET' if t['met'] else 'MISSED'}: {t['target']} -> {val}")
    console.print(table)
