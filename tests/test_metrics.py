"""trainer/metrics.py: the engine-vs-trainer gap (one implementation, additive over trajectories), the update's
named sums, the rollout metrics and the progress line."""

from __future__ import annotations

import math

import pytest
import torch

from sodkern.trainer.metrics import (
    UPDATE_SUMS,
    LogprobGap,
    UpdateTotals,
    logprob_mismatch,
    progress_line,
    rollout_metrics,
    update_metrics,
)


def test_gap_sums_add_up_to_the_gap_of_the_concatenation():
    g = torch.Generator().manual_seed(0)
    rollout = [-torch.rand(n, generator=g) * 4 for n in (5, 1, 9)]
    old = [r + 0.3 * torch.randn(r.shape, generator=g) for r in rollout]
    total = sum((LogprobGap.of(o, r) for o, r in zip(old, rollout)), LogprobGap())
    whole = logprob_mismatch(torch.cat(old), torch.cat(rollout))
    assert total.tokens == 15
    for key, value in total.metrics().items():
        assert value == pytest.approx(whole[key], rel=1e-6, abs=1e-9)
    d = (torch.cat(old) - torch.cat(rollout)).double()
    assert total.metrics()["rollout/kl_k3"] == pytest.approx(float((d.exp() - 1 - d).mean()), rel=1e-9)
    assert LogprobGap.of(torch.empty(0), torch.empty(0)).metrics()["rollout/logprob_diff_abs_mean"] == 0.0


def test_update_totals_are_named_and_reduced_once(world):
    totals = UpdateTotals(UPDATE_SUMS, world.device)
    for loss, norm in ((0.5, 2.0), (1.5, 4.0)):
        totals.add("loss", torch.tensor(loss))
        totals.add("grad_norm", norm)
    totals.add("tokens", torch.tensor(10.0))
    totals.add("ppo_kl", torch.tensor(0.2) * 10)
    sums = totals.all_reduce()
    assert set(sums) == set(UPDATE_SUMS)
    metrics = update_metrics(sums, world_size=1, num_updates=2, skipped=0, full_kl=False)
    assert metrics["loss"] == pytest.approx(1.0) and metrics["grad_norm"] == pytest.approx(3.0)
    assert metrics["ppo_kl"] == pytest.approx(0.2) and metrics["skipped"] == 0.0
    assert "distill_loss" not in metrics and "distill_loss" in update_metrics(
        sums, world_size=1, num_updates=2, skipped=1, full_kl=True
    )


def test_rollout_metrics_pop_the_private_fields():
    records = [
        {"reward": 1.0, "correct": True, "response_length": 10, "num_tool_calls": 2, "num_turns": 3,
         "finish_reason": "eos", "tokens": 30, "gap": LogprobGap(abs_sum=1.0, abs_max=0.5, tokens=10),
         "steps": [{"k": 1, "d": 0.1, "w": 1.0}, {"k": 2, "d": 0.2, "w": 0.5}]},
        {"reward": -1.0, "correct": False, "response_length": 20, "num_tool_calls": 0, "num_turns": 1,
         "finish_reason": "length", "tokens": 40, "gap": LogprobGap(abs_sum=3.0, abs_max=0.9, tokens=10),
         "steps": [{"k": 1, "d": None, "w": None}]},
    ]  # fmt: skip
    m = rollout_metrics(records, rollout_seconds=2.0)
    assert (m["reward/mean"], m["accuracy"], m["finish/length"], m["tokens"]) == (0.0, 0.5, 0.5, 70.0)
    assert m["rollout/logprob_diff_abs_mean"] == pytest.approx(0.2) and m["rollout/logprob_diff_abs_max"] == 0.9
    assert m["rollout/tokens_per_s"] == 15.0
    assert m["mean_d"] == pytest.approx(0.15) and m["mean_w"] == pytest.approx(0.75)
    assert all("gap" not in r and "tokens" not in r for r in records)


def test_progress_line():
    line = progress_line(3, 10, {"loss": 0.5, "reward/mean": -0.25, "val/average@4": 0.5, "val/aime/pass@4": 1.0,
                                 "time/step": 3.21, "skipped": 0.0}, eta_s=90)  # fmt: skip
    assert line == "step 3/10  loss 0.5000  reward -0.250  val/average@4 0.500  skipped 0  s/step 3.2  eta 1.5 min"
    assert "nan" in progress_line(1, 1, {"loss": math.nan}, eta_s=0)
