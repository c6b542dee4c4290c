"""``sodkern plot RUN_DIR``: training curves and the SOD step-weight patterns of a run, as PNG.

- ``RUN_DIR/plots/curves.png``: the per-step scalars of ``metrics.jsonl`` (reward, accuracy, loss, mean w and
  d, response length, tool calls, clip fraction, time per phase, ...), those the run logged.
- ``RUN_DIR/plots/step_patterns.png``: from the step-wise log ``steps.jsonl``, one trajectory of each pattern
  of README: The algorithm (the paper's Figure 5), its step divergences d_k above its step weights w_k:
  stable (w_k stays near 1), erroneous (d_k rises, w_k falls and stays low), recovery (w_k falls, then rises
  back towards 1 + delta). The most pronounced example of each is drawn.
- ``RUN_DIR/plots/premise.png`` and ``premise.json``: the premise check of :mod:`sodkern.trainer.premise` (do
  the weights separate steps after a wrong tool call from clean steps?), its one-line verdict printed too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from sodkern.trainer.metrics import METRICS_FILE, STEPS_FILE, read_jsonl

CURVES = (
    "reward/mean", "accuracy", "loss", "mean_w", "mean_d", "response_length/mean", "tool_calls/mean",
    "pg_clipfrac", "grad_norm", "lr", "perf/tokens_per_s", "time/rollout", "time/scoring", "time/update",
)  # fmt: skip
PATTERNS = ("stable", "erroneous", "recovery")


def classify_pattern(w: list[float], tol: float = 0.2) -> tuple[str | None, float]:
    """The pattern of a trajectory's step weights ``w`` (at least 2 steps) and how pronounced it is.

    Returns:
        ``("stable" | "erroneous" | "recovery" | None, score)``: stable when every ``|w_k - 1| <= tol``
        (score: the number of steps); recovery when some ``w_k < 1 - tol`` is followed by a step at least
        ``tol`` higher (score: that rise); erroneous when the last weight is below ``1 - tol`` and within
        ``tol / 4`` of the lowest (score: ``1 - w_last``); else None.
    """
    if len(w) < 2:
        return None, 0.0
    if all(abs(x - 1.0) <= tol for x in w):
        return "stable", float(len(w))
    rise = max((max(w[k + 1 :]) - w[k] for k in range(len(w) - 1) if w[k] < 1.0 - tol), default=0.0)
    if rise >= tol:
        return "recovery", rise
    if w[-1] < 1.0 - tol and w[-1] <= min(w) + tol / 4:
        return "erroneous", 1.0 - w[-1]
    return None, 0.0


def pattern_counts(records: list[dict], tol: float = 0.2) -> dict[str, int]:
    """How many trajectories (with at least 2 weighted steps) show each pattern, and ``"other"``."""
    counts = dict.fromkeys((*PATTERNS, "other"), 0)
    for r in records:
        w = [s["w"] for s in r.get("steps", []) if s.get("w") is not None]
        if len(w) >= 2:
            counts[classify_pattern(w, tol)[0] or "other"] += 1
    return counts


def pick_examples(records: list[dict], tol: float = 0.2) -> dict[str, dict]:
    """The most pronounced trajectory record of each pattern among the step-wise log ``records``."""
    best: dict[str, tuple[float, dict]] = {}
    for r in records:
        steps = [s for s in r.get("steps", []) if s.get("w") is not None and s.get("d") is not None]
        pattern, score = classify_pattern([s["w"] for s in steps], tol)
        if pattern and (pattern not in best or score > best[pattern][0]):
            best[pattern] = (score, {**r, "steps": steps})
    return {p: rec for p, (_, rec) in best.items()}


def plot_curves(metrics: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CURVES if any(isinstance(m.get(k), (int, float)) for m in metrics)]
    cols = 3
    rows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, lw=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_patterns(records: list[dict], out: Path, *, delta: float = 0.2, tol: float = 0.2, title: str = "") -> Path:
    """d_k (bars) above w_k (line) of the most pronounced trajectory of each pattern in ``records`` (the rows
    of ``steps.jsonl``; a ``seed`` key, where present, is shown); a pattern that did not occur says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    examples, counts = pick_examples(records, tol), pattern_counts(records, tol)
    total = sum(counts.values())
    fig, axes = plt.subplots(2, 3, figsize=(12.6, 5.8), sharex="col", squeeze=False)
    for col, pattern in enumerate(PATTERNS):
        top, bottom = axes[0, col], axes[1, col]
        top.set_title(f"{pattern} ({counts[pattern]} of {total} trajectories)", fontsize=10)
        rec = examples.get(pattern)
        if rec is None:
            top.text(0.5, 0.5, "no trajectory of this\npattern in the step log", ha="center", va="center")
            top.set_axis_off()
            bottom.set_axis_off()
            continue
        k = [s["k"] for s in rec["steps"]]
        top.bar(k, [s["d"] for s in rec["steps"]], color="tab:red", alpha=0.7)
        top.set_ylabel("step divergence d_k")
        where = (f"seed {rec['seed']}, " if "seed" in rec else "") + f"RL step {rec.get('step', '')}"
        outcome = {True: "correct", False: "wrong"}.get(rec.get("correct"), "")
        calls = f", {rec['num_tool_calls']} tool calls" if "num_tool_calls" in rec else ""
        top.text(0.02, 0.97, f"{where}, {rec.get('uid', '')} #{rec.get('sample', '')}\n{outcome} answer{calls}",
                 transform=top.transAxes, fontsize=7, va="top")  # fmt: skip
        bottom.plot(k, [s["w"] for s in rec["steps"]], marker="o", color="tab:blue")
        bottom.axhline(1.0, color="grey", lw=0.8, ls="--")
        bottom.axhline(1.0 + delta, color="grey", lw=0.8, ls=":")
        bottom.set_ylim(0, 1.0 + delta + 0.1)
        bottom.set_ylabel("step weight w_k")
        bottom.set_xlabel("step k (assistant turn)")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sodkern plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder (with metrics.jsonl, and steps.jsonl for RL runs)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/plots)")
    parser.add_argument("--tol", type=float, default=0.2, help="how far from 1 a weight may be and stay 'stable'")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    if not (run / METRICS_FILE).exists():
        parser.error(f"{run / METRICS_FILE} not found: give a run folder written by sodkern train")
    out = Path(args.out) if args.out else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    delta = 0.2
    if (run / "config.yaml").exists():
        delta = float(((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("loss") or {}).get("delta", 0.2))
    written = [plot_curves(read_jsonl(run / METRICS_FILE), out / "curves.png")]
    if (run / STEPS_FILE).exists():
        records = read_jsonl(run / STEPS_FILE)
        written.append(plot_patterns(records, out / "step_patterns.png", delta=delta, tol=args.tol))
        from sodkern.trainer.premise import plot_premise, premise_check

        check = premise_check(records)
        (out / "premise.json").write_text(json.dumps(check, indent=2) + "\n")
        written += [out / "premise.json", plot_premise(check, records, out / "premise.png", title=str(run))]
        print(f"premise check: {check['verdict']}")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
