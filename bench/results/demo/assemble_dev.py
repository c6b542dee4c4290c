"""The end of `sodkern demo`'s main (results.json / results.md / figures) on /tmp/demo3: the teacher, cold start,
held-out evaluations and premise phase of the demo's own run, the RL runs of rl_seed.py (the demo's overrides)."""

import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from sodkern.trainer.demo import demo
from sodkern.trainer.demo import plots as demo_plots
from sodkern.trainer.metrics import METRICS_FILE, STEPS_FILE, read_jsonl
from sodkern.trainer.plot import pattern_counts, plot_patterns
from sodkern.trainer.premise import plot_premise, premise_check

out, p, seeds = Path("/tmp/demo3"), demo.PRESETS["default"], [0, 1, 2]
runs = out / "runs"
evals = {"teacher": {}, "cold-start": {}}
for label in evals:
    for s in seeds:
        evals[label][s] = json.loads((out / "eval" / f"seed{s}" / label / "metrics.json").read_text())["metrics"]["all"]
for m in demo.METHODS:
    evals[m] = {s: demo.final_eval(runs / f"seed{s}" / m, p.eval_n) for s in seeds}
# phase times of the demo's own log (/tmp/demo3.log); RL: the per-run wall times of rl_seed.py (3 seeds in parallel)
timings = {
    "data and models": 0.1 * 60,
    "teacher SFT": 5.4 * 60,
    "student cold-start SFT": 2.1 * 60,
    "evaluation of teacher and cold start": 2.4 * 60,
    "premise check of the cold start": 0.7 * 60,
}
rl = [json.loads((out / f"rl_times_seed{s}.json").read_text()) for s in seeds]
for m in demo.METHODS:
    timings[f"RL {m}"] = sum(t[m] for t in rl)
wall = sum(v for k, v in timings.items() if not k.startswith("RL")) + max(sum(t.values()) for t in rl)
premise_records = read_jsonl(out / "premise_steps.jsonl")
premise = premise_check(premise_records)
rl_runs = {m: {s: runs / f"seed{s}" / m for s in seeds} for m in demo.METHODS}
curves = {m: {s: read_jsonl(d / METRICS_FILE) for s, d in r.items()} for m, r in rl_runs.items()}
sod_steps = [{**r, "seed": s} for s, d in rl_runs["sod"].items() for r in read_jsonl(d / STEPS_FILE)]
results = demo_plots.summarize_results(
    evals, k=p.eval_n, timings=timings, wall_s=wall, preset={"name": "default", **asdict(p)}, seeds=seeds
)
results["patterns"] = pattern_counts(sod_steps)
results["premise"] = {"cold_start": premise, "sod_runs": premise_check(sod_steps)}
results["how_run"] = (
    "sodkern demo --seeds 3 up to and with its premise phase; its RL phase (the demo's overrides, "
    "seed after seed per method) run as three processes, one per seed, at the same time"
)
plot_premise(
    premise,
    premise_records,
    out / "premise.png",
    title="premise check: the cold-start student's own rollouts (temperature 1.0), before any RL",
)
demo_plots.plot_accuracy(curves, evals, p.eval_n, out / "accuracy.png")
plot_patterns(
    sod_steps,
    out / "step_weights.png",
    delta=0.2,
    title="SOD step divergences and weights of real trajectories from the demo's sod run(s)",
)
(out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
(out / "results.md").write_text(demo_plots.results_markdown(results))
demo_plots.print_results(results, Console(width=140))
print(premise["verdict"])
