"""The demo's RL phase for one seed (grpo, opd, sod in the demo's order and with its exact overrides), on the
teacher / cold-start student / data an interrupted `sodkern demo --seeds 3 --output-dir /tmp/demo3` wrote."""

import json
import shutil
import sys
import time
from pathlib import Path

from sodkern.trainer import train
from sodkern.trainer.cli import configure_logging
from sodkern.trainer.demo import demo

out, seed = Path("/tmp/demo3"), int(sys.argv[1])
configure_logging()
p = demo.PRESETS["default"]
runs = out / "runs"
times = {}
for method in demo.METHODS:
    run_dir = runs / f"seed{seed}" / method
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t = time.perf_counter()
    rl = demo.rl_overrides(
        method,
        runs / "student_sft/hf",
        runs / "teacher_sft/hf",
        out / "data/rl_train.jsonl",
        out / "data/test.jsonl",
        p,
        seed,
        run_dir,
    )
    assert train.main(rl) == 0
    times[method] = time.perf_counter() - t
    print("done", method, seed, times[method], demo.final_eval(run_dir, p.eval_n), flush=True)
    (out / f"rl_times_seed{seed}.json").write_text(json.dumps(times))
