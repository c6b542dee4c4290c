"""``sodkern eval``: sample a model n times per problem (with the code interpreter); average@k, pass@k, maj@k.

Per data source (and over all problems):

- ``average@k``: mean accuracy of the first k samples of each problem, averaged over problems;
- ``pass@k``: the unbiased estimator ``1 - C(n - c, k) / C(n, k)`` from all n samples (c of them correct);
- ``maj@k``: whether the most frequent extracted answer among the first k samples is correct (samples
  without an answer do not vote; a tie goes to the answer seen first);
- mean tool calls, mean response length (tokens), finish reasons.

Writes ``metrics.json`` and ``samples.jsonl`` (one line per sample) to ``--output-dir`` and prints a table.

The trainer's held-out evaluation (verl's ``test_freq`` / ``val_before_train``) is :func:`evaluate_student`:
with ``eval.files`` set, it samples ``eval.n`` responses per held-out problem with the rollout engine (the
student's current weights, ``eval.temperature`` / ``eval.top_p``), scores them with the outcome reward
(correctness only: no overlong penalty or tool shaping) and logs :func:`summarize`'s metrics as
``val/average@n``, ``val/pass@n``, ``val/maj@n``, ``val/mean_tool_calls``, ``val/mean_response_tokens`` (and
``val/SOURCE/...`` per data source when there are several) in the step's row of ``metrics.jsonl``; the
samples go to ``val_samples.jsonl`` (one line each, with the step). It runs every ``eval.every`` steps, after
the last step, and before the first when ``eval.before_train`` (logged as step 0). Each rank evaluates its
share of the problems; the metrics are over all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sodkern.trainer.rollout.loop import RolloutParams, Trajectory
from sodkern.trainer.tasks.data import Problem, load_problems

if TYPE_CHECKING:
    from sodkern.trainer.rl import RLWorker

log = logging.getLogger("sodkern.eval")

VAL_SAMPLES_FILE = "val_samples.jsonl"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n - c, k) / C(n, k)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: expected 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent answer (None = no answer, no vote; ties: first seen) is a correct one."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return next(ok for a, ok in zip(answers, correct) if a == winner)


def summarize(
    problems: Sequence[Problem], trajectories: Sequence[Trajectory], ks: Sequence[int]
) -> dict[str, dict[str, Any]]:
    """Metrics per data source and over ``"all"`` problems (the module docstring defines them).

    Args:
        problems: the evaluated problems.
        trajectories: their scored samples (``reward`` set), the same number ``n`` for every problem.
        ks: the k values, each in ``1..n``.
    """
    samples: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajectories:
        if t.reward is None:
            raise ValueError(f"trajectories: sample {t.sample_index} of {t.uid!r} has no reward; score it first")
        samples[t.uid].append(t)
    groups: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        groups[p.data_source].append(p)
    groups["all"] = list(problems)
    out = {}
    for source, group in groups.items():
        rows: dict[str, list[float]] = defaultdict(list)
        finish: Counter[str] = Counter()
        for p in group:
            ts = sorted(samples[p.uid], key=lambda t: t.sample_index)
            n = len(ts)
            correct = [bool(t.reward.correct) for t in ts]
            answers = [None if t.reward.extracted is None else str(t.reward.extracted).strip() for t in ts]
            for k in ks:
                if not 1 <= k <= n:
                    raise ValueError(f"k={k}: expected 1 <= k <= n, and problem {p.uid!r} has n={n} samples")
                rows[f"average@{k}"].append(sum(correct[:k]) / k)
                rows[f"pass@{k}"].append(pass_at_k(n, sum(correct), k))
                rows[f"maj@{k}"].append(float(majority_correct(answers[:k], correct[:k])))
            rows["mean_score"] += [t.reward.score for t in ts]
            rows["mean_tool_calls"] += [t.num_tool_calls for t in ts]
            rows["mean_response_tokens"] += [len(t.response_ids) for t in ts]
            finish.update(t.finish_reason for t in ts)
        out[source] = {"problems": len(group), **{k: sum(v) / len(v) for k, v in rows.items()}}
        out[source]["finish_reasons"] = dict(finish)
    return out


def print_table(metrics: dict[str, dict[str, Any]], ks: Sequence[int]) -> None:
    """Print ``metrics`` (from :func:`summarize`): a row per metric, a column per data source."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sodkern eval (accuracies in %)")
    table.add_column("metric")
    for source in metrics:
        table.add_column(source, justify="right")
    table.add_row("problems", *(str(m["problems"]) for m in metrics.values()))
    for name in [f"{m}@{k}" for k in ks for m in ("average", "pass", "maj")]:
        table.add_row(name, *(f"{100 * m[name]:.2f}" for m in metrics.values()))
    table.add_row("tool calls", *(f"{m['mean_tool_calls']:.2f}" for m in metrics.values()))
    table.add_row("response tokens", *(f"{m['mean_response_tokens']:.1f}" for m in metrics.values()))
    Console().print(table)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sodkern eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="folder of a Hugging Face causal LM and its tokenizer")
    ap.add_argument("--data", required=True, nargs="+", help=".parquet or .jsonl problem files")
    ap.add_argument("--n", type=int, default=32, help="samples per problem (default 32)")
    ap.add_argument("--k", type=int, nargs="+", help="k values for the @k metrics (default: n)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.6, help="nucleus sampling (the recipe's eval: 0.6)")
    ap.add_argument("--top-k", type=int, default=-1, help="top-k sampling; <= 0 disables it")
    ap.add_argument("--max-turns", type=int, default=16, help="assistant turns per sample")
    ap.add_argument(
        "--max-turn-tokens",
        type=int,
        default=0,
        help="tokens per assistant turn; a turn that reaches it ends the sample (0: no cap)",
    )
    ap.add_argument("--max-response-tokens", type=int, default=20480)
    ap.add_argument("--output-dir", default="eval_results", help="metrics.json and samples.jsonl go here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    ap.add_argument("--limit", type=int, help="evaluate only the first N problems of each file")
    ap.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument(
        "--template-kwargs",
        default="{}",
        help="JSON chat-template variables, e.g. '{\"enable_thinking\": false}'",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (or SODKERN_DEBUG=1)")
    return ap


def sample_row(t: Trajectory, data_source: str, **extra: Any) -> dict[str, Any]:
    """One line of ``samples.jsonl``: a scored trajectory's outcome, counts and text (``extra`` keys first)."""
    return {
        **extra,
        "uid": t.uid,
        "data_source": data_source,
        "sample_index": t.sample_index,
        "correct": t.reward.correct,
        "score": t.reward.score,
        "extracted": t.reward.extracted,
        "num_turns": t.num_turns,
        "num_tool_calls": t.num_tool_calls,
        "response_tokens": len(t.response_ids),
        "finish_reason": t.finish_reason,
        "text": t.text,
    }


def sample_and_score(
    model_path: str | Path,
    problems: Sequence[Problem],
    config: RolloutParams,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 64,
    template_kwargs: dict | None = None,
) -> tuple[list[Trajectory], float]:
    """Load a HF model folder, sample ``config.n`` trajectories per problem with the code interpreter and
    score them with each problem's reward (seed torch before calling for a reproducible run).

    Returns:
        the scored trajectories (problem-major) and the seconds the sampling took.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sodkern.trainer.rollout.chat import ChatFormat
    from sodkern.trainer.rollout.hf_engine import HFEngine
    from sodkern.trainer.rollout.loop import rollout, score_trajectories
    from sodkern.trainer.sandbox import CodeInterpreter

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    chat = ChatFormat(tokenizer, template_kwargs=template_kwargs)  # the training prompts' tool schema
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = HFEngine(model, pad_token_id=pad, max_batch_size=batch_size)
    started = time.perf_counter()
    trajectories = rollout(problems, engine, chat, CodeInterpreter(), config)
    seconds = time.perf_counter() - started
    score_trajectories(trajectories, problems, max_response_tokens=config.max_response_tokens)
    return trajectories, seconds


def write_results(
    out: Path, problems: Sequence[Problem], trajectories: Sequence[Trajectory], metrics: dict, run: dict
) -> None:
    """``out/metrics.json`` (``{"config": run, "metrics": metrics}``) and ``out/samples.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"config": run, "metrics": metrics}, indent=2) + "\n")
    sources = {p.uid: p.data_source for p in problems}
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(sample_row(t, sources[t.uid]), ensure_ascii=False) + "\n" for t in trajectories)


def evaluate_student(worker: RLWorker, problems: list[Problem], step: int, run_dir: Path) -> dict[str, float]:
    """The trainer's held-out evaluation (see the module docstring): sample, score and summarise ``problems``
    with the current student; returns the ``val/...`` metrics (and ``time/eval``).

    Args:
        worker: the run's :class:`sodkern.trainer.rl.RLWorker` (its engine, chat format, tool and config).
        problems: the held-out problems (all of them; every rank gets the same list).
        step: the training step the student has finished (0: before training).
        run_dir: the run folder (rank 0 appends the samples to ``val_samples.jsonl`` there).
    """
    import torch.distributed as dist

    from sodkern.trainer.rollout.loop import rollout, score_trajectories

    cfg, d = worker.cfg, worker.d
    started = time.perf_counter()
    params = dataclasses.replace(
        worker.rollout_params, n=cfg.eval.n, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p
    )
    local = problems[d.rank :: d.world_size]
    worker.sync_engine()
    trajs = rollout(local, worker.engine, worker.chat, worker.tool, params) if local else []
    worker.release_engine()
    score_trajectories(
        trajs, local, max_response_tokens=cfg.rollout.max_response_tokens, sandbox=worker.sandbox,
        overlong_penalty=False, tool_shaping=False, reward_fn=cfg.rollout.reward_fn or None,
    )  # fmt: skip
    gathered: list = [None] * d.world_size
    dist.all_gather_object(gathered, trajs)
    trajs = [t for part in gathered for t in part]
    summary = summarize(problems, trajs, [cfg.eval.n])
    metrics: dict[str, float] = {}
    keys = [f"average@{cfg.eval.n}", f"pass@{cfg.eval.n}", f"maj@{cfg.eval.n}", "mean_tool_calls",
            "mean_response_tokens"]  # fmt: skip
    for source, row in summary.items():
        if source == "all" or len(summary) > 2:  # "all" plus one source: the same numbers twice
            prefix = "val/" if source == "all" else f"val/{source}/"
            metrics.update({prefix + k: float(row[k]) for k in keys})
    metrics["time/eval"] = time.perf_counter() - started
    if d.is_main:
        sources = {p.uid: p.data_source for p in problems}
        with open(run_dir / VAL_SAMPLES_FILE, "a") as f:
            f.writelines(json.dumps(sample_row(t, sources[t.uid], step=step)) + "\n" for t in trajs)
    return metrics


def main(argv: list[str] | None = None) -> int:
    from sodkern.trainer.cli import configure_logging, debug_enabled, exit_on_user_error

    args = _parser().parse_args(argv)
    debug = debug_enabled(args.debug)
    configure_logging(debug)
    return exit_on_user_error("sodkern eval", lambda: evaluate(args), debug=debug)


def evaluate(args: argparse.Namespace) -> int:
    """``sodkern eval`` with parsed arguments: sample, score, summarise, write and print."""
    from sodkern.trainer.cli import UserError

    ks = args.k or [args.n]
    if args.n < 1 or any(not 1 <= k <= args.n for k in ks):
        raise UserError(f"--n must be >= 1 and every --k in 1..n (n={args.n}, k={ks})")
    try:
        template_kwargs = json.loads(args.template_kwargs)
    except json.JSONDecodeError as e:
        raise UserError(f"--template-kwargs is not valid JSON: {e}") from None
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else None
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    if not (Path(args.model) / "config.json").exists():
        raise UserError(f"--model {args.model}: not a Hugging Face model folder (no config.json there)")
    problems: list[Problem] = []
    for path in args.data:
        try:
            problems += list(load_problems(path))[: args.limit]
        except (ValueError, OSError) as e:  # a missing file or a bad row, named by the loader
            raise UserError(str(e)) from e
    if not problems:
        raise UserError(f"--data: no problems in {' '.join(args.data)}")
    repeated = [uid for uid, count in Counter(p.uid for p in problems).items() if count > 1]
    if repeated:
        raise UserError(f"--data: problem uids must be unique; repeated: {repeated[:5]}")
    config = RolloutParams(
        n=args.n,
        max_turns=args.max_turns,
        max_response_tokens=args.max_response_tokens,
        max_turn_tokens=args.max_turn_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        progress=not args.no_progress,
    )
    log.info("sampling %d problem(s) x %d with %s on %s", len(problems), args.n, args.model, device)
    trajectories, seconds = sample_and_score(args.model, problems, config, device=device, dtype=dtype,
                                             batch_size=args.batch_size, template_kwargs=template_kwargs)  # fmt: skip
    metrics = summarize(problems, trajectories, ks)
    generated = sum(sum(t.response_mask) for t in trajectories)
    run = {**vars(args), "k": ks, "rollout_seconds": seconds, "generated_tokens": generated}
    out = Path(args.output_dir)
    write_results(out, problems, trajectories, metrics, run)
    print_table(metrics, ks)
    log.info("wrote %s and %s", out / "metrics.json", out / "samples.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
