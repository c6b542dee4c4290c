"""The demo's report: the results table (Markdown, JSON, terminal), the accuracy curves and the step-weight
figure. Everything here reads what the runs wrote; nothing is adjusted or filtered by outcome."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

LABELS = {
    "teacher": "Teacher (SFT, reference)",
    "cold-start": "Student, cold-start SFT",
    "grpo": "+ GRPO",
    "opd": "+ OPD (uniform weights)",
    "sod": "+ SOD (step weights)",
}
COLORS = {"grpo": "tab:gray", "opd": "tab:orange", "sod": "tab:blue"}
TEACHER_LEARNED = 0.5  # held-out average@k above which the report says the teacher learned the task


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "per_seed": values,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
    }


def _fmt(s: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    text = f"{scale * s['mean']:.{digits}f}"
    return text if s["std"] is None else f"{text} ± {scale * s['std']:.{digits}f}"


def summarize_results(
    evals: dict[str, dict[int, dict]],
    *,
    k: int,
    timings: dict[str, float],
    wall_s: float,
    preset: dict,
    seeds: list[int],
) -> dict[str, Any]:
    """The results: per model, each metric per seed with mean and std; the SOD-vs-OPD comparison; notes.

    Args:
        evals: ``evals[model][seed]``: the ``"all"`` row of :func:`sodkern.trainer.eval.summarize`.
        k: the k of average@k / pass@k (samples per held-out problem).
    """
    keys = (f"average@{k}", f"pass@{k}", "mean_tool_calls", "mean_response_tokens")
    models = {
        name: {key: _stats([per_seed[s][key] for s in seeds]) for key in keys} for name, per_seed in evals.items()
    }
    avg = f"average@{k}"
    diffs = [evals["sod"][s][avg] - evals["opd"][s][avg] for s in seeds]
    diff = _stats(diffs)
    sod, opd = models["sod"][avg]["mean"], models["opd"][avg]["mean"]
    if diff["mean"] <= 0:
        verdict = (
            f"SOD did not beat OPD at this scale: {avg} {100 * sod:.1f}% (SOD) vs {100 * opd:.1f}% (OPD), "
            f"difference {100 * diff['mean']:+.1f} points."
        )
    elif diff["std"] is not None and diff["mean"] <= diff["std"]:
        verdict = (
            f"SOD scored above OPD ({100 * sod:.1f}% vs {100 * opd:.1f}% {avg}, {_fmt(diff)} points over "
            f"{len(seeds)} seeds), but within the seed-to-seed spread: not a clear win at this scale."
        )
    else:
        verdict = (
            f"SOD beat OPD: {avg} {100 * sod:.1f}% vs {100 * opd:.1f}% ({_fmt(diff)} points"
            + (f" over {len(seeds)} seeds" if len(seeds) > 1 else ", one seed: run --seeds 3 for the spread")
            + ")."
        )
    teacher = models["teacher"][avg]["mean"]
    teacher_note = (
        f"The teacher learned the task: {avg} {100 * teacher:.1f}%."
        if teacher >= TEACHER_LEARNED
        else f"The teacher did NOT learn the task well ({avg} {100 * teacher:.1f}%): its distillation signal is "
        "weak, so OPD and SOD have little to distil (the --quick budgets are too small for it; run the default)."
    )
    cold = models["cold-start"][avg]["mean"]
    best_rl = max(("grpo", "opd", "sod"), key=lambda m: models[m][avg]["mean"])
    return {
        "k": k,
        "seeds": seeds,
        "models": models,
        "sod_minus_opd": diff,
        "verdict": verdict,
        "teacher_note": teacher_note,
        "cold_start_note": (
            f"The cold-start student solves {100 * cold:.1f}% ({avg}); the best RL method here is "
            f"{best_rl.upper()} at {100 * models[best_rl][avg]['mean']:.1f}%."
        ),
        "timings_s": timings,
        "wall_time_s": wall_s,
        "preset": preset,
    }


# ------------------------------------------------------------------------------------------ table


def table_rows(results: dict) -> list[list[str]]:
    k = results["k"]
    rows = []
    for name, label in LABELS.items():
        m = results["models"][name]
        rows.append(
            [
                label,
                _fmt(m[f"average@{k}"]),
                _fmt(m[f"pass@{k}"]),
                _fmt(m["mean_tool_calls"], 1.0, 2),
                _fmt(m["mean_response_tokens"], 1.0, 1),
            ]
        )
    return rows


def _header(results: dict) -> list[str]:
    k = results["k"]
    return ["method", f"average@{k} (%)", f"pass@{k} (%)", "tool calls", "response tokens"]


def _notes(results: dict) -> list[str]:
    p, pat = results["preset"], results["patterns"]
    phases = ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in results["timings_s"].items())
    return [
        f"**SOD vs OPD:** {results['verdict']}",
        f"**Teacher:** {results['teacher_note']}",
        f"**Student:** {results['cold_start_note']}",
        f"**Step-weight patterns** among the SOD trajectories with at least 2 steps: stable {pat['stable']}, "
        f"erroneous {pat['erroneous']}, recovery {pat['recovery']}, none of these {pat['other']}.",
        *_premise_notes(results.get("premise")),
        f"**Setup:** preset `{p['name']}`; held-out split of {p['eval_problems']} problems x {p['eval_n']} samples "
        f"(temperature 1.0, top-p 0.6; the RL rows are the evaluation each run made after its last step, the teacher "
        f"and cold-start rows the same evaluation of their saved models, one sampling seed per seed); RL "
        f"{p['rl_steps']} steps x {p['rl_prompts']} prompts x {p['rl_n']} responses per method and seed, "
        f"lr {p['rl_lr']:g}; seeds {results['seeds']}.",
        f"**Wall time:** {results['wall_time_s'] / 60:.1f} min ({phases}).",
    ]


def _premise_notes(premise: dict | None) -> list[str]:
    if not premise:
        return []
    cold = premise["cold_start"]
    holds = {True: "holds", False: "does NOT hold", None: "cannot be checked"}[cold["holds"]]
    notes = [f"**Premise of SOD, cold-start student's own rollouts before any RL:** {cold['verdict']}. The premise "
             f"{holds} by the demo's thresholds (median w_k >= 0.8 on clean steps, <= 0.5 after the first wrong "
             f"tool call, AUC >= 0.8; {cold['trajectories']} trajectories with 2+ steps)."]  # fmt: skip
    if cold.get("d_ratio_correct") and cold["d_ratio_correct"]["median"] is not None:
        notes[0] += f" Median d_k/d_1 on fully correct trajectories: {cold['d_ratio_correct']['median']:.2f}."
    notes.append(f"**Premise in the SOD runs' step log** (no per-step labels there): {premise['sod_runs']['verdict']}.")
    return notes


def results_markdown(results: dict) -> str:
    """The results as Markdown: the table (the paper's Table 1 in miniature) and the notes."""
    head = _header(results)
    lines = ["# sodkern demo: results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    lines += [""] + [f"- {note}" for note in _notes(results)]
    return "\n".join(lines) + "\n"


def print_results(results: dict, console) -> None:
    from rich.table import Table

    table = Table(title="sodkern demo: held-out accuracy (every number measured by this run)")
    for i, name in enumerate(_header(results)):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)
    for note in _notes(results):
        console.print(note.replace("**", ""))


# ------------------------------------------------------------------------------------------ figures


def _moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def _band(ax, x: list[int], series: list[list[float]], color: str, label: str) -> None:
    """Mean over seeds (thick), each seed (thin), min-max band when there are several seeds; in percent."""
    mean = [statistics.fmean(col) for col in zip(*series)]
    ax.plot(x, [100 * v for v in mean], color=color, lw=2, label=label, marker="o" if len(x) < 12 else None)
    if len(series) > 1:
        lo, hi = [min(col) for col in zip(*series)], [max(col) for col in zip(*series)]
        ax.fill_between(x, [100 * v for v in lo], [100 * v for v in hi], color=color, alpha=0.15)
        for s in series:
            ax.plot(x, [100 * v for v in s], color=color, lw=0.6, alpha=0.4)


def plot_accuracy(
    curves: dict[str, dict[int, list[dict]]], evals: dict[str, dict[int, dict]], k: int, out: Path
) -> Path:
    """Left: held-out average@k over RL steps per method (step 0: the cold-start student), with the teacher
    as a reference line. Right: accuracy of each step's training rollouts (moving average).

    Args:
        curves: ``curves[method][seed]``: the rows of the RL run's ``metrics.jsonl`` (``val/average@k`` rows:
            the held-out evaluations it made during training).
        evals: ``evals[model][seed]``: held-out metrics of ``"teacher"`` and ``"cold-start"``.
        k: the k of average@k.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avg = f"average@{k}"
    seeds = sorted(evals["cold-start"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.4))
    for method, per_seed in curves.items():
        val = {s: [r for r in rows if f"val/{avg}" in r] for s, rows in per_seed.items()}
        x = [0] + [r["step"] for r in val[seeds[0]]]
        series = [[evals["cold-start"][s][avg]] + [r[f"val/{avg}"] for r in val[s]] for s in seeds]
        _band(left, x, series, COLORS[method], LABELS[method])
        train = [[r["accuracy"] for r in rows if "accuracy" in r] for rows in per_seed.values()]
        steps = min(len(t) for t in train)
        window = max(1, steps // 6)
        _band(right, list(range(1, steps + 1)), [_moving_average(t[:steps], window) for t in train],
              COLORS[method], LABELS[method])  # fmt: skip
    teacher = statistics.fmean(evals["teacher"][s][avg] for s in seeds)
    left.set_ylabel(f"held-out {avg} (%)")
    left.set_title(f"Held-out accuracy (top-p 0.6, {k} samples per problem); step 0 = cold-start;\n"
                   f"the teacher: {100 * teacher:.1f}%", fontsize=9)  # fmt: skip
    right.set_ylabel("accuracy of the step's rollouts (%)")
    right.set_title(f"Training rollouts (temperature 1.0), moving average over {window} steps", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(seeds)} seed{'s' * (len(seeds) > 1)}: thick = mean, thin = each seed, band = min-max",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
