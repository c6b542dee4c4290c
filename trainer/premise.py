"""The premise check of SOD: do the step weights w_k separate steps after an error from clean steps?

SOD down-weights the later steps of a trajectory whose step divergence ``d_k`` grows (``w_k = (d_1 + eps) /
(d_k + eps)``, capped at ``1 + delta``), on the premise that d_k grows *because of* an erroneous tool call.
:func:`premise_check` measures that premise on the step-wise log of a run (the rows of ``steps.jsonl``).

Per-step labels (optional). A step entry of a row may carry ``"tool_ok"``: True when the tool call the step made
returned what a correct solution's call returns, False when it did not (a wrong or malformed call), None or
absent when the step made no call or nobody knows. :func:`label_steps` computes it from the observations of a
trajectory and the expected results of a problem row (``extra_info["tool_results"]``: the expected output of
each tool call of a correct solution, in order). A step is *after an error* when an earlier step of its
trajectory has ``tool_ok`` False, *clean* when every earlier call was correct. Step 1 has w_1 = 1 by definition
and is in neither group.

With labels: median and quartiles of w_k on clean steps and on steps after an error, the AUC of w_k as a
detector of "after an error" (a lower weight flags an error), and d_k / d_1 on fully correct trajectories
(every call right, correct answer; SOD assumes about 1). Without labels: the median d_k / d_1 by step index on
trajectories with a correct final answer against those with a wrong one. Always: how much of w_k's variance the
step index alone explains (R^2 of w_k against the median w at its step index), which tells when SOD reduces to
weighting by step position.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

# Thresholds of "the premise holds" (issue 16): medians on clean steps / after an error, and the AUC.
CLEAN_MEDIAN_MIN, AFTER_MEDIAN_MAX, AUC_MIN = 0.8, 0.5, 0.8
POSITION_R2 = 0.5  # above this, w_k is mostly a function of the step index


def label_steps(observations: Sequence[str | None], expected: Sequence[str]) -> list[bool | None]:
    """``tool_ok`` of each step from its tool observation (None: the step made no call) and the expected
    tool results of a correct solution: the i-th call is right when its output (stripped) equals
    ``expected[i]``; a call beyond the expected count is wrong."""
    labels, i = [], 0
    for obs in observations:
        if obs is None:
            labels.append(None)
            continue
        labels.append(i < len(expected) and obs.strip() == str(expected[i]).strip())
        i += 1
    return labels


def auc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """P(score of a positive < score of a negative) + P(equal) / 2: the AUC of a *low* score as a detector
    of the positives (here: low w_k flags a step after an error). NaN when either group is empty."""
    if not negatives or not positives:
        return float("nan")
    pairs = [(x, 0) for x in negatives] + [(x, 1) for x in positives]
    pairs.sort(key=lambda p: p[0])
    # Mann-Whitney with midranks for ties
    ranks, i = [0.0] * len(pairs), 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        for t in range(i, j + 1):
            ranks[t] = (i + j) / 2 + 1
        i = j + 1
    rank_neg = sum(r for r, (_, y) in zip(ranks, pairs) if y == 0)
    n_neg, n_pos = len(negatives), len(positives)
    return (rank_neg - n_neg * (n_neg + 1) / 2) / (n_neg * n_pos)


def _quartiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0, "median": None, "q1": None, "q3": None}
    if len(xs) == 1:
        return {"n": 1, "median": xs[0], "q1": xs[0], "q3": xs[0]}
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"n": len(xs), "median": med, "q1": q1, "q3": q3}


def _steps(record: dict) -> list[dict]:
    return [s for s in record.get("steps", []) if s.get("w") is not None and s.get("d") is not None]


def _ratios_by_k(records: list[dict]) -> dict[int, float]:
    """Median d_k / d_1 per step index k >= 2 over ``records``."""
    by_k: dict[int, list[float]] = {}
    for r in records:
        steps = _steps(r)
        if len(steps) < 2 or steps[0]["d"] <= 0:
            continue
        for s in steps[1:]:
            by_k.setdefault(int(s["k"]), []).append(s["d"] / steps[0]["d"])
    return {k: statistics.median(v) for k, v in sorted(by_k.items())}


def position_r2(records: list[dict]) -> float:
    """Share of the variance of w_k (every weighted step, step 1 included) explained by the step index alone
    (each w_k predicted by the median w at its k); NaN when w does not vary."""
    by_k: dict[int, list[float]] = {}
    for r in records:
        for s in _steps(r):
            by_k.setdefault(int(s["k"]), []).append(float(s["w"]))
    ws = [w for v in by_k.values() for w in v]
    if len(ws) < 2:
        return float("nan")
    mean = sum(ws) / len(ws)
    total = sum((w - mean) ** 2 for w in ws)
    if total <= 1e-12:
        return float("nan")
    resid = sum((w - statistics.median(v)) ** 2 for v in by_k.values() for w in v)
    return max(0.0, 1.0 - resid / total)


def premise_check(records: list[dict]) -> dict:
    """The premise check of the step-wise log ``records`` (see the module docstring); JSON-ready.

    Returns:
        ``{"labeled", "trajectories", "clean": quartiles, "after_error": quartiles, "auc",
        "d_ratio_correct": {"median", "n", "by_k"}, "d_ratio_by_k": {"correct_final", "wrong_final"},
        "position_r2", "holds", "verdict"}``; the labeled fields are None without labels.
    """
    multi = [r for r in records if len(_steps(r)) >= 2]
    labeled = any("tool_ok" in s for r in multi for s in r.get("steps", []))
    clean: list[float] = []
    after: list[float] = []
    fully_correct: list[dict] = []
    for r in multi:
        if labeled:
            error_seen = False
            for s in r["steps"]:
                if s.get("w") is not None and s["k"] > 1:
                    (after if error_seen else clean).append(float(s["w"]))
                error_seen = error_seen or s.get("tool_ok") is False
            if r.get("correct") and all(s.get("tool_ok") is not False for s in r["steps"]):
                fully_correct.append(r)
    out: dict = {"labeled": labeled, "trajectories": len(multi), "clean": None, "after_error": None, "auc": None,
                 "d_ratio_correct": None, "holds": None}  # fmt: skip
    if labeled:
        ratios = [s["d"] / _steps(r)[0]["d"] for r in fully_correct for s in _steps(r)[1:] if _steps(r)[0]["d"] > 0]
        out.update(
            clean=_quartiles(clean),
            after_error=_quartiles(after),
            auc=auc(clean, after),
            d_ratio_correct={
                "n": len(ratios),
                "median": statistics.median(ratios) if ratios else None,
                "by_k": _ratios_by_k(fully_correct),
            },  # fmt: skip
        )
        out["holds"] = bool(
            clean and after and out["clean"]["median"] >= CLEAN_MEDIAN_MIN
            and out["after_error"]["median"] <= AFTER_MEDIAN_MAX and out["auc"] >= AUC_MIN
        )  # fmt: skip
    out["d_ratio_by_k"] = {
        "correct_final": _ratios_by_k([r for r in multi if r.get("correct")]),
        "wrong_final": _ratios_by_k([r for r in multi if r.get("correct") is False]),
    }
    out["position_r2"] = position_r2(multi)
    for key in ("auc", "position_r2"):  # strict JSON: no NaN
        if out[key] is not None and out[key] != out[key]:
            out[key] = None
    out["verdict"] = verdict(out)
    return out


def _f(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.2f}"


def verdict(check: dict) -> str:
    """One plain line: whether the weights separate steps after an error from clean steps."""
    r2 = check["position_r2"]
    position = r2 is not None and r2 == r2 and r2 >= POSITION_R2
    pos_text = (
        f"SOD reduces to weighting by step position here (step index explains {100 * r2:.0f}% of w_k's variance)"
        if position
        else ""
    )
    if check["trajectories"] == 0:
        return "no trajectory with two or more weighted steps: nothing to check"
    if not check["labeled"]:
        ratios = check["d_ratio_by_k"]
        text = (f"no per-step labels; median d_k/d_1 at k=2: {_f(ratios['correct_final'].get(2))} on correct-final "
                f"vs {_f(ratios['wrong_final'].get(2))} on wrong-final trajectories")  # fmt: skip
        return text + ("; " + pos_text if position else "")
    c, a, area = check["clean"]["median"], check["after_error"]["median"], check["auc"]
    if check["after_error"]["n"] == 0:
        return f"no step after a wrong tool call in this log (median w_k on clean steps {_f(c)}): nothing to separate"
    medians = f"median w_k {_f(c)} on clean steps vs {_f(a)} after an error"
    if area is not None and area >= AUC_MIN:
        return f"the weights separate steps after an error from clean steps: AUC {_f(area)} ({medians})"
    return f"they do not: AUC {_f(area)} ({medians})" + ("; " + pos_text if position else "")


def plot_premise(check: dict, records: list[dict], out: Path, *, title: str = "") -> Path:
    """The premise panel: w_k on clean steps vs after an error (labels) or by step index (no labels), and the
    median d_k / d_1 by step index on correct-final vs wrong-final trajectories; the verdict as the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.0))
    multi = [r for r in records if len(_steps(r)) >= 2]
    if check["labeled"]:
        groups, names = [], []
        for key, name in (("clean", "clean steps"), ("after_error", "after an error")):
            ws = []
            for r in multi:
                seen = False
                for s in r["steps"]:
                    if s.get("w") is not None and s["k"] > 1 and seen == (key == "after_error"):
                        ws.append(s["w"])
                    seen = seen or s.get("tool_ok") is False
            groups.append(ws or [float("nan")])
            names.append(f"{name}\n(n={len(ws)})")
        left.boxplot(groups, tick_labels=names, showfliers=False)
        left.set_title(f"w_k, steps k >= 2 (AUC {_f(check['auc'])})", fontsize=10)
    else:
        by_k: dict[int, list[float]] = {}
        for r in multi:
            for s in _steps(r):
                by_k.setdefault(int(s["k"]), []).append(s["w"])
        ks = sorted(by_k)
        if ks:
            left.boxplot([by_k[k] for k in ks], tick_labels=[str(k) for k in ks], showfliers=False)
        else:
            left.text(0.5, 0.5, "no trajectory with two or more steps", ha="center", transform=left.transAxes)
        left.set_xlabel("step k")
        left.set_title("w_k by step index (no per-step labels)", fontsize=10)
    left.set_ylabel("step weight w_k")
    left.axhline(1.0, color="grey", lw=0.8, ls="--")
    for key, color in (("correct_final", "tab:green"), ("wrong_final", "tab:red")):
        pts = sorted((int(k), v) for k, v in check["d_ratio_by_k"][key].items())
        if pts:
            right.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=key.replace("_", " "))
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.set_yscale("log")
    right.set_xlabel("step k")
    right.set_ylabel("median d_k / d_1")
    right.set_title("step divergence relative to step 1", fontsize=10)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    fig.suptitle((title + "\n" if title else "") + check["verdict"], fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
