"""``sodkern demo``: the whole SOD story on a laptop CPU, in minutes, for real.

    sodkern demo --quick            # the smoke run (CI): every phase, small budgets
    sodkern demo                    # the default run (9.2 min on 2 quiet cores)
    sodkern demo --seeds 3          # three RL seeds: mean ± std

The phases, each through the project's own code paths (``sodkern.trainer.train.main`` for every training
run, the rollout loop with the real code-interpreter sandbox, ``sodkern.trainer.eval.summarize``):

1. data: the synthetic task of :mod:`sodkern.trainer.demo.task` (chained arithmetic that needs the code
   interpreter), written as SFT trajectories and verl-layout problem files; a tokenizer built in code.
2. teacher: a Qwen3-architecture model from a config (random init), SFT on scripted correct trajectories.
3. student: a smaller Qwen3 model, cold-started with a short SFT (1,000 trajectories, 300 steps).
4. held-out evaluation (average@k, pass@k; the rollout loop, :func:`sodkern.trainer.eval.summarize`) of the
   teacher and the cold-start student.
5. premise check: the cold-start student's own rollouts (before any RL) scored by the teacher: do SOD's step
   weights separate the steps after a wrong tool call from clean steps (:mod:`sodkern.trainer.premise`)?
   ``premise.png``, ``premise_steps.jsonl`` and ``results.json["premise"]``.
6. RL: from that same cold-start student, ``grpo``, ``opd`` and ``sod`` with the same budget, seed after seed;
   each run evaluates the held-out split every few steps and after its last step (``eval.*`` of the trainer).
7. the report: ``results.md`` / ``results.json`` (the paper's Table 1 in miniature), ``accuracy.png`` (held-out
   accuracy over RL steps per method, and the training rollouts' accuracy) and ``step_weights.png`` (d_k and
   w_k of real SOD trajectories: stable / erroneous / recovery, or a note where a pattern did not occur).

Every number is what the run measured; the output says plainly whether SOD beat OPD.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sodkern.trainer.cli import configure_logging
from sodkern.trainer.demo import task as demo_task
from sodkern.trainer.metrics import METRICS_FILE, STEPS_FILE, read_jsonl

log = logging.getLogger("sodkern.demo")
METHODS = ("grpo", "opd", "sod")
PROGRESS_EVERY_S = 30.0  # seconds between progress lines in the log (the bar is for terminals only)
MARKER = ".sodkern-demo"  # marks a folder as the demo's own, so a re-run may replace its contents
MAX_TURNS = 6  # up to 4 tool calls + the answer, and one spare turn
MAX_RESPONSE_TOKENS = 320  # a correct response is at most ~130 tokens; an error message (a traceback) adds ~100
# A correct turn is ~25 tokens. A batch decodes until its last row stops, so one rambling turn (temperature 1.0)
# made every row of its round decode ~290 tokens: capping turns halves the rollout time; such a turn ends its
# response ("length") here instead of at MAX_RESPONSE_TOKENS, with the same reward (0).
MAX_TURN_TOKENS = 64
EVAL_TOP_P = 0.6  # the recipe's evaluation sampling (the recipe, README), temperature 1.0


@dataclass(frozen=True)
class Preset:
    """Sizes and budgets of one demo run; the field defaults are the default run, ``QUICK`` shrinks them."""

    teacher: dict = field(default_factory=lambda: TEACHER)  # tiny_qwen3 keyword arguments
    student: dict = field(default_factory=lambda: STUDENT)
    vocab_size: int = 512
    teacher_sft_examples: int = 4000
    teacher_sft_steps: int = 200  # its SFT loss is ~0.002 by step 150 of a 500-step schedule
    teacher_sft_lr: float = 3e-3
    # The cold start: strong enough that its own rollouts meet SOD's premise (issue 16; a weaker student errs in
    # ~30% of its calls, and its own first wrong call is then most of the "clean" steps: see
    # bench/results/demo/premise_designs.md), about 80% of its rollouts right at temperature 1.0. Chosen on the
    # premise numbers before any RL result; the same for every method.
    student_sft_examples: int = 1000
    student_sft_steps: int = 300
    student_sft_lr: float = 3e-3
    sft_batch_size: int = 16
    rl_prompts: int = 8  # prompts per RL step
    rl_n: int = 8  # responses per prompt
    rl_steps: int = 20  # chosen for time: one seed of the default demo within 10 min on 2 cores
    rl_lr: float = 1e-4
    rl_train_problems: int = 2000
    eval_problems: int = 64
    eval_n: int = 4  # samples per held-out problem: the k of average@k and pass@k
    eval_every: int = 10  # RL steps between held-out evaluations (and after the last step)


TEACHER = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=256)
STUDENT = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=32, intermediate_size=128)
PRESETS = {
    "default": Preset(),
    "quick": Preset(
        teacher_sft_examples=1000,
        teacher_sft_steps=120,  # 100 left the teacher at ~3% (its cosine schedule ends before the loss drops)
        student_sft_examples=256,
        student_sft_steps=200,
        rl_prompts=4,
        rl_n=4,
        rl_steps=4,
        rl_train_problems=256,
        eval_problems=16,
        eval_n=2,
        eval_every=2,
    ),
}


# ------------------------------------------------------------------------------------------ setup


def prepare_output_dir(out: Path) -> None:
    """Create ``out``; a previous demo's folder (it has the marker) is emptied, any other non-empty folder
    is refused, so the demo never deletes files it did not write."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise SystemExit(
                f"sodkern demo: --output-dir {out} exists and is not a sodkern demo folder (no {MARKER}); "
                "give a new or empty folder"
            )
        for child in out.iterdir():
            if child.name != MARKER:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by sodkern demo; its contents are replaced by the next run\n")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_data(out: Path, p: Preset) -> dict[str, Path]:
    """The SFT trajectories (teacher: many, student: a few), the RL prompts and the held-out problems."""
    sft = [demo_task.scripted_trajectory(q) for q in demo_task.make_problems(p.teacher_sft_examples, "sft")]
    rows = [{"messages": ex.messages, "tools": ex.tools} for ex in sft]
    return {
        "teacher_sft": write_jsonl(out / "data" / "sft_teacher.jsonl", rows),
        "student_sft": write_jsonl(out / "data" / "sft_student.jsonl", rows[: p.student_sft_examples]),
        "rl": write_jsonl(
            out / "data" / "rl_train.jsonl",
            [demo_task.problem_row(q) for q in demo_task.make_problems(p.rl_train_problems, "train")],
        ),
        "test": write_jsonl(
            out / "data" / "test.jsonl",
            [demo_task.problem_row(q) for q in demo_task.make_problems(p.eval_problems, "test")],
        ),
    }


def build_models(out: Path, p: Preset) -> dict[str, Path]:
    """The demo tokenizer (BPE on the task's text, one token per digit, the compact tool template) and the
    randomly initialised teacher and student, saved as HF folders."""
    from sodkern.trainer.demo.tiny import tiny_qwen3, tiny_tokenizer

    tok = tiny_tokenizer(
        p.vocab_size,
        corpus=demo_task.corpus(),
        split_digits=True,
        merge_across_words=True,
        chat_template=demo_task.CHAT_TEMPLATE,
    )
    paths = {}
    for name, kwargs, seed in (("teacher", p.teacher, 1), ("student", p.student, 2)):
        path = out / "models" / f"{name}_init"
        tiny_qwen3(tok, **kwargs, max_position_embeddings=512, seed=seed).save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    return paths


# ------------------------------------------------------------------------------------------ training


COMMON = [
    "train.micro_batch_tokens=512",  # short packed rows: the block-diagonal attention of a long row costs more
    "checkpoint.every=0",
    "checkpoint.keep=1",
    "checkpoint.resume=none",
    "log.tensorboard=false",
]


def sft_overrides(student: Path, data: Path, steps: int, lr: float, batch_size: int, run_dir: Path) -> list[str]:
    return [
        "algorithm=sft",
        f"output_dir={run_dir}",
        f"student.path={student}",
        f"data.train_files=[{data}]",
        f"data.batch_size={batch_size}",
        "data.max_length=512",
        f"optim.lr={lr}",
        "optim.warmup_steps=20",
        "optim.betas=[0.9,0.98]",
        "optim.schedule=cosine",
        "optim.min_lr_ratio=0.1",
        f"train.steps={steps}",
        *COMMON,
    ]


def rl_overrides(
    method: str, student: Path, teacher: Path, data: Path, heldout: Path, p: Preset, seed: int, run_dir: Path
) -> list[str]:
    return [
        f"algorithm={method}",
        f"output_dir={run_dir}",
        f"seed={seed}",
        f"student.path={student}",
        f"teacher.path={teacher}",
        f"data.train_files=[{data}]",
        f"data.batch_size={p.rl_prompts}",
        f"data.mini_batch_size={p.rl_prompts // 2}",
        f"rollout.n={p.rl_n}",
        "rollout.max_prompt_tokens=128",
        f"rollout.max_response_tokens={MAX_RESPONSE_TOKENS}",
        f"rollout.max_turns={MAX_TURNS}",
        f"rollout.max_turn_tokens={MAX_TURN_TOKENS}",
        "rollout.tool_timeout_s=10",
        "rollout.overlong_penalty=false",
        "rollout.tool_shaping=false",
        f"optim.lr={p.rl_lr}",
        f"train.steps={p.rl_steps}",
        f"eval.files=[{heldout}]",  # held-out accuracy during training, the curves of accuracy.png
        f"eval.every={p.eval_every}",
        f"eval.n={p.eval_n}",
        f"eval.top_p={EVAL_TOP_P}",
        *COMMON,
    ]


@contextmanager
def watch(run_dir: Path, update):
    """Call ``update(last metrics row)`` every half second while a training run writes ``metrics.jsonl``."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            path = run_dir / METRICS_FILE
            rows = read_jsonl(path) if path.exists() else []
            if rows:
                update(rows[-1])

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        rows = read_jsonl(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).exists() else []
        if rows:
            update(rows[-1])


def run_training(overrides: list[str], run_dir: Path, progress, label: str, steps: int) -> Path:
    """``sodkern train`` in this process, with a progress bar fed by its ``metrics.jsonl`` and a progress
    line in the log every :data:`PROGRESS_EVERY_S` seconds; returns the run's exported student (``run_dir/hf``)."""
    from sodkern.trainer import train

    task = progress.add_task(label, total=steps, status="starting")
    last_line = [time.perf_counter(), 0]

    def update(row: dict) -> None:
        status = f"loss {row['loss']:.3f}" if "loss" in row else ""
        if "accuracy" in row:
            status += f"  rollout acc {100 * row['accuracy']:.0f}%"
        progress.update(task, completed=row["step"], status=status)
        now = time.perf_counter()
        if row["step"] > last_line[1] and (now - last_line[0] >= PROGRESS_EVERY_S or row["step"] == steps):
            last_line[:] = [now, row["step"]]
            log.info("%s: step %d/%d %s", label, row["step"], steps, status)

    with watch(run_dir, update):
        status = train.main(overrides)
    if status != 0:
        raise RuntimeError(f"{label}: sodkern train exited with status {status} (its error is printed above)")
    return run_dir / "hf"


# ------------------------------------------------------------------------------------------ evaluation


def rollout_params(n: int, top_p: float = 1.0):
    """The demo's sampling outside training (evaluations, the premise check): temperature 1.0 and the RL runs'
    limits on turns and tokens (:func:`rl_overrides`)."""
    from sodkern.trainer.rollout.loop import RolloutParams

    return RolloutParams(n=n, max_turns=MAX_TURNS, max_response_tokens=MAX_RESPONSE_TOKENS,
                         max_turn_tokens=MAX_TURN_TOKENS, temperature=1.0, top_p=top_p, progress=False)  # fmt: skip


def evaluate(model_dir: Path, problems: list, *, n: int, seed: int, out: Path) -> dict:
    """``sodkern eval``'s sampling, scoring and summary of ``n`` responses per held-out problem (the rollout
    loop, the real sandbox); writes its ``metrics.json`` and ``samples.jsonl`` to ``out``."""
    from sodkern.trainer.eval import sample_and_score, summarize, write_results

    torch.manual_seed(seed)
    config = rollout_params(n, top_p=EVAL_TOP_P)
    trajectories, seconds = sample_and_score(model_dir, problems, config)
    metrics = summarize(problems, trajectories, [n])
    write_results(out, problems, trajectories, metrics, {"model": str(model_dir), "seed": seed, "n": n,
                                                         "top_p": EVAL_TOP_P, "rollout_seconds": seconds})  # fmt: skip
    return metrics["all"]


# ------------------------------------------------------------------------------------------ the demo


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sodkern demo", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the smoke run (CI): every phase, small budgets")
    ap.add_argument("--seeds", type=int, default=1, help="RL seeds (and evaluation seeds); >1 reports mean ± std")
    ap.add_argument("--output-dir", default="sodkern-demo", help="where everything goes (default ./sodkern-demo)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    return args


def final_eval(run_dir: Path, k: int) -> dict:
    """The held-out metrics the RL run logged after its last step (``val/...`` of ``metrics.jsonl``)."""
    row = [r for r in read_jsonl(run_dir / METRICS_FILE) if f"val/average@{k}" in r][-1]
    return {key.removeprefix("val/"): v for key, v in row.items() if key.startswith("val/")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sodkern.trainer.demo import coldstart
    from sodkern.trainer.demo import plots as demo_plots
    from sodkern.trainer.plot import pattern_counts, plot_patterns
    from sodkern.trainer.premise import plot_premise, premise_check
    from sodkern.trainer.tasks.data import load_problems

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    console = Console()
    configure_logging()  # one line per phase and a periodic progress line, on stdout: ``sodkern demo > demo.log``
    logging.getLogger("sodkern.train").setLevel(logging.WARNING)  # the demo's own progress line covers training
    name = "quick" if args.quick else "default"
    p, seeds, out = PRESETS[name], list(range(args.seeds)), Path(args.output_dir).resolve()
    prepare_output_dir(out)
    started, timings = time.perf_counter(), {}
    console.rule(f"sodkern demo ({name}, {args.seeds} seed{'s' * (args.seeds > 1)}) -> {out}")
    columns = [TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}")]  # fmt: skip

    @contextmanager
    def phase(label: str):
        t = time.perf_counter()
        log.info("phase: %s", label)
        yield
        timings[label] = time.perf_counter() - t
        log.info("phase done: %s (%.1f min)", label, timings[label] / 60)

    with Progress(*columns, console=console) as progress:
        with phase("data and models"):
            files, init = write_data(out, p), build_models(out, p)
        runs = out / "runs"
        with phase("teacher SFT"):
            sft = sft_overrides(init["teacher"], files["teacher_sft"], p.teacher_sft_steps, p.teacher_sft_lr,
                                p.sft_batch_size, runs / "teacher_sft")  # fmt: skip
            teacher = run_training(sft, runs / "teacher_sft", progress, "teacher SFT", p.teacher_sft_steps)
        with phase("student cold-start SFT"):
            sft = sft_overrides(init["student"], files["student_sft"], p.student_sft_steps, p.student_sft_lr,
                                p.sft_batch_size, runs / "student_sft")  # fmt: skip
            student = run_training(sft, runs / "student_sft", progress, "student cold-start SFT", p.student_sft_steps)
        with phase("evaluation of teacher and cold start"):
            problems = list(load_problems(files["test"]))
            task = progress.add_task(f"held-out eval ({len(problems)}x{p.eval_n})", total=2 * len(seeds), status="")
            evals: dict[str, dict[int, dict]] = {"teacher": {}, "cold-start": {}}
            for label, model_dir in (("teacher", teacher), ("cold-start", student)):
                for seed in seeds:
                    progress.update(task, status=f"{label} seed {seed}")
                    evals[label][seed] = evaluate(model_dir, problems, n=p.eval_n, seed=1000 + seed,
                                                  out=out / "eval" / f"seed{seed}" / label)  # fmt: skip
                    progress.advance(task)
                    log.info("held-out eval of the %s (seed %d): average@%d %.1f%%", label, seed, p.eval_n,
                             100 * evals[label][seed][f"average@{p.eval_n}"])  # fmt: skip
        with phase("premise check of the cold start"):
            torch.manual_seed(2000)
            premise_records = coldstart.premise_records(student, teacher, problems, rollout_params(p.eval_n))
            write_jsonl(out / "premise_steps.jsonl", premise_records)
            premise = premise_check(premise_records)
            log.info("premise check of the cold start: %s", premise["verdict"])
        for method in METHODS:
            evals[method], timings[f"RL {method}"] = {}, 0.0
        for seed in seeds:  # seed after seed: a run stopped early still has every method of its first seeds
            for method in METHODS:
                t = time.perf_counter()
                log.info("phase: RL %s (seed %d)", method, seed)
                run_dir = runs / f"seed{seed}" / method
                rl = rl_overrides(method, student, teacher, files["rl"], files["test"], p, seed, run_dir)
                run_training(rl, run_dir, progress, f"RL {method} (seed {seed})", p.rl_steps)
                evals[method][seed] = final_eval(run_dir, p.eval_n)
                timings[f"RL {method}"] += time.perf_counter() - t
                log.info("phase done: RL %s (seed %d): held-out %s %.1f%%", method, seed, f"average@{p.eval_n}",
                         100 * evals[method][seed][f"average@{p.eval_n}"])  # fmt: skip

    rl_runs = {m: {s: runs / f"seed{s}" / m for s in seeds} for m in METHODS}
    curves = {m: {s: read_jsonl(d / METRICS_FILE) for s, d in r.items()} for m, r in rl_runs.items()}
    sod_steps = [{**r, "seed": s} for s, d in rl_runs["sod"].items() for r in read_jsonl(d / STEPS_FILE)]
    wall = time.perf_counter() - started
    results = demo_plots.summarize_results(evals, k=p.eval_n, timings=timings, wall_s=wall,
                                           preset={"name": name, **asdict(p)}, seeds=seeds)  # fmt: skip
    results["patterns"] = pattern_counts(sod_steps)
    results["premise"] = {"cold_start": premise, "sod_runs": premise_check(sod_steps)}
    cold_title = "premise check: the cold-start student's own rollouts (temperature 1.0), before any RL"
    plot_premise(premise, premise_records, out / "premise.png", title=cold_title)
    demo_plots.plot_accuracy(curves, evals, p.eval_n, out / "accuracy.png")
    title = "SOD step divergences and weights of real trajectories from the demo's sod run(s)"
    plot_patterns(sod_steps, out / "step_weights.png", delta=0.2, title=title)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(demo_plots.results_markdown(results))
    demo_plots.print_results(results, console)
    console.print(f"wrote {out / 'results.md'}, results.json, accuracy.png, step_weights.png, premise.png "
                  f"({wall / 60:.1f} min)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
