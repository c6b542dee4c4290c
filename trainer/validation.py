"""Held-out evaluation during RL training (verl's ``test_freq`` / ``val_before_train``).

With ``eval.files`` set, the trainer samples ``eval.n`` responses per held-out problem with the rollout engine
(the student's current weights, ``eval.temperature`` / ``eval.top_p``), scores them with the outcome reward
(correctness only: no overlong penalty or tool shaping) and logs :func:`sodkern.trainer.eval.summarize`'s
metrics as ``val/average@n``, ``val/pass@n``, ``val/maj@n``, ``val/mean_tool_calls``,
``val/mean_response_tokens`` (and ``val/SOURCE/...`` per data source when there are several) in the step's row
of ``metrics.jsonl``; the samples go to ``val_samples.jsonl`` (one line each, with the step).

It runs every ``eval.every`` steps, after the last step, and before the first when ``eval.before_train``
(logged as step 0). Each rank evaluates its share of the problems; the metrics are over all of them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch.distributed as dist

from sodkern.trainer.eval import sample_row, summarize
from sodkern.trainer.rollout import loop as ro
from sodkern.trainer.tasks.data import Problem

VAL_SAMPLES_FILE = "val_samples.jsonl"


def evaluate_student(worker, problems: list[Problem], step: int, run_dir: Path) -> dict[str, float]:
    """Sample, score and summarise ``problems`` with the current student; returns the ``val/...`` metrics.

    Args:
        worker: the run's :class:`sodkern.trainer.rl.RLWorker` (its engine, chat format, tool and config).
        problems: the held-out problems (all of them; every rank gets the same list).
        step: the training step the student has finished (0: before training).
        run_dir: the run folder (rank 0 appends the samples to ``val_samples.jsonl`` there).
    """
    cfg, d = worker.cfg, worker.d
    started = time.perf_counter()
    config = dataclasses.replace(
        worker.rollout_config, n=cfg.eval.n, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p
    )
    local = problems[d.rank :: d.world_size]
    worker.sync_engine()
    trajs = ro.rollout(local, worker.engine, worker.chat, worker.tool, config) if local else []
    worker.release_engine()
    ro.score_trajectories(
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
