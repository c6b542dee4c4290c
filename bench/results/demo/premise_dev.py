"""How the design numbers of premise_designs.md were measured (a developer's script, not part of the product).

    python bench/results/demo/premise_dev.py OUT NPROB NSAMP [STUDENT_EXAMPLES STUDENT_STEPS]

Trains the demo preset's teacher in OUT (once; the task is whatever ``sodkern.trainer.demo.task`` is), a cold-start
student on the first STUDENT_EXAMPLES rows of the teacher's SFT file for STUDENT_STEPS steps (default: the
preset's), samples NSAMP rollouts of each of the first NPROB held-out problems at temperature 1.0 (torch seed
2000, as the demo's premise phase), and prints the premise check and the step of each rollout's first wrong call.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from sodkern.trainer import train
from sodkern.trainer.demo import demo
from sodkern.trainer.demo.coldstart import premise_records
from sodkern.trainer.premise import premise_check
from sodkern.trainer.rollout.loop import RolloutParams
from sodkern.trainer.tasks.data import load_problems


def main(argv: list[str]) -> None:
    out, nprob, nsamp = Path(argv[0]), int(argv[1]), int(argv[2])
    p = demo.PRESETS["default"]
    if len(argv) > 4:
        p = dataclasses.replace(p, student_sft_examples=int(argv[3]), student_sft_steps=int(argv[4]))
    t0, runs = time.time(), out / "runs"
    if not (runs / "teacher_sft/hf").exists():
        demo.prepare_output_dir(out)
        files, init = demo.write_data(out, p), demo.build_models(out, p)
        train.main(demo.sft_overrides(init["teacher"], files["teacher_sft"], p.teacher_sft_steps,
                                      p.teacher_sft_lr, p.sft_batch_size, runs / "teacher_sft"))  # fmt: skip
    student = runs / f"student_sft_{p.student_sft_examples}_{p.student_sft_steps}"
    if not (student / "hf").exists():
        data = out / "data" / f"sft_student_{p.student_sft_examples}.jsonl"
        rows = (out / "data/sft_teacher.jsonl").read_text().splitlines()[: p.student_sft_examples]
        data.write_text("\n".join(rows) + "\n")  # the demo's student file is the teacher file's first rows
        train.main(demo.sft_overrides(out / "models/student_init", data, p.student_sft_steps, p.student_sft_lr,
                                      p.sft_batch_size, student))  # fmt: skip
    problems = list(load_problems(out / "data/test.jsonl"))[:nprob]
    torch.manual_seed(2000)
    # as the designs were measured: no turn cap (the demo caps turns since; its own premise phase does too)
    config = RolloutParams(n=nsamp, max_turns=demo.MAX_TURNS, max_response_tokens=demo.MAX_RESPONSE_TOKENS,
                           progress=False)  # fmt: skip
    records = premise_records(student / "hf", runs / "teacher_sft/hf", problems, config)
    (student / "premise_steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    check = premise_check(records)
    (student / "premise.json").write_text(json.dumps(check, indent=1))
    keys = ("trajectories", "clean", "after_error", "auc", "d_ratio_correct", "position_r2", "holds")
    print(json.dumps({k: check[k] for k in keys}, indent=1))
    print(check["verdict"])
    first = collections.Counter(next((s["k"] for s in r["steps"] if s.get("tool_ok") is False), None) for r in records)
    print("first wrong call at step:", dict(first))
    print("right at T=1:", sum(r["correct"] for r in records) / len(records), "seconds:", time.time() - t0)


if __name__ == "__main__":
    main(sys.argv[1:])
