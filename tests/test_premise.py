"""The premise check on constructed trajectories with known labels."""

from __future__ import annotations

import json
import random

import pytest

from sodkern.trainer.premise import auc, label_steps, plot_premise, premise_check


def _traj(ws: list[float], ds: list[float], oks: list[bool | None] | None, correct: bool) -> dict:
    steps = [{"k": k + 1, "d": d, "w": w} for k, (d, w) in enumerate(zip(ds, ws))]
    if oks is not None:
        for s, ok in zip(steps, oks):
            s["tool_ok"] = ok
    return {"correct": correct, "steps": steps}


def _labeled_log(weight, seed: int = 0, n: int = 200) -> list[dict]:
    """Trajectories of 4 steps (3 calls + the answer); a wrong call at a random step in half of them;
    ``weight(k, after_error, rng)`` gives each step's w (step 1: 1)."""
    rng, out = random.Random(seed), []
    for i in range(n):
        first_wrong = rng.randint(1, 3) if i % 2 else None
        oks = [None if k == 4 else (first_wrong is None or k < first_wrong) for k in range(1, 5)]
        ws = [1.0] + [weight(k, first_wrong is not None and k > first_wrong, rng) for k in range(2, 5)]
        ds = [0.5 / w for w in ws]
        out.append(_traj(ws, ds, oks, correct=first_wrong is None))
    return out


def test_auc_counts_pairs_and_ties():
    assert auc([0.9, 1.0], [0.1, 0.2]) == 1.0
    assert auc([0.1, 0.2], [0.9, 1.0]) == 0.0
    assert auc([0.5, 0.5], [0.5]) == 0.5
    assert auc([1.0, 0.3], [0.5]) == 0.5
    assert auc([], [0.1]) != auc([], [0.1])  # NaN


def test_label_steps_compares_each_call_with_the_expected_result():
    assert label_steps(["161", " 657\n", None], ["161", "657"]) == [True, True, None]
    assert label_steps(["161", "600", "2401", None], ["161", "657", "2641"]) == [True, False, False, None]
    assert label_steps(["Traceback ...", None], ["161"]) == [False, None]
    assert label_steps(["161", "657", "9"], ["161", "657"]) == [True, True, False]  # one call too many


def test_perfectly_separating_weights_give_auc_one_and_hold(tmp_path):
    log = _labeled_log(lambda k, after, rng: rng.uniform(0.05, 0.3) if after else rng.uniform(0.9, 1.2))
    check = premise_check(log)
    assert check["labeled"] and check["auc"] == 1.0 and check["holds"] is True
    assert check["clean"]["median"] >= 0.9 and check["after_error"]["median"] <= 0.3
    assert check["verdict"].startswith("the weights separate steps after an error from clean steps: AUC 1.00")
    assert check["d_ratio_correct"]["median"] == pytest.approx(0.5 / 0.5 * 1, rel=0.3)
    json.dumps(check, allow_nan=False)  # strict JSON
    path = plot_premise(check, log, tmp_path / "premise.png")
    import matplotlib.image

    assert matplotlib.image.imread(path).std() > 0.01


def test_position_only_weights_say_so():
    # w depends on the step index only: 1 at step 1, 0.02 after, errors or not (the old demo task)
    log = _labeled_log(lambda k, after, rng: 0.02 * (1 + 0.01 * rng.random()))
    check = premise_check(log)
    assert check["holds"] is False and 0.4 < check["auc"] < 0.6
    assert check["position_r2"] > 0.9
    assert check["verdict"].startswith("they do not: AUC 0.")
    assert "SOD reduces to weighting by step position here" in check["verdict"]


def test_without_labels_reports_d_ratios_by_step_for_correct_and_wrong_final():
    log = [_traj([1.0, 1.0, 0.9], [0.2, 0.2, 0.22], None, True) for _ in range(5)]
    log += [_traj([1.0, 0.1, 0.05], [0.2, 2.0, 4.0], None, False) for _ in range(5)]
    check = premise_check(log)
    assert not check["labeled"] and check["auc"] is None and check["holds"] is None
    assert check["d_ratio_by_k"]["correct_final"] == pytest.approx({2: 1.0, 3: 1.1})
    assert check["d_ratio_by_k"]["wrong_final"] == pytest.approx({2: 10.0, 3: 20.0})
    assert check["verdict"].startswith("no per-step labels; median d_k/d_1 at k=2: 1.00 on correct-final vs 10.00")


def test_sodkern_plot_writes_the_premise_check(tmp_path, capsys):
    from sodkern.trainer.plot import main

    log = _labeled_log(lambda k, after, rng: rng.uniform(0.05, 0.3) if after else rng.uniform(0.9, 1.2), n=20)
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps({"step": 1, **r}) + "\n" for r in log))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert main([str(tmp_path)]) == 0
    check = json.loads((tmp_path / "plots" / "premise.json").read_text())
    assert check["auc"] == 1.0 and check["verdict"] in capsys.readouterr().out
    assert (tmp_path / "plots" / "premise.png").read_bytes()[:4] == b"\x89PNG"


def test_a_log_without_errors_has_no_auc_and_strict_json():
    log = _labeled_log(lambda k, after, rng: rng.uniform(0.9, 1.2))
    log = [r for r in log if r["correct"]]
    check = premise_check(log)
    assert check["auc"] is None and check["holds"] is False and check["after_error"]["n"] == 0
    assert check["verdict"].startswith("no step after a wrong tool call in this log")
    json.dumps(check, allow_nan=False)


def test_a_log_of_one_step_trajectories_says_so_and_still_plots(tmp_path):
    """A run whose trajectories never reach a second step (a short SOD run's steps.jsonl): nothing to check."""
    log = [_traj([1.0], [0.3], None, correct=bool(i % 2)) for i in range(6)]
    check = premise_check(log)
    assert check["trajectories"] == 0 and check["position_r2"] is None
    assert check["verdict"] == "no trajectory with two or more weighted steps: nothing to check"
    out = plot_premise(check, log, tmp_path / "premise.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
