"""One GPU check: install, CUDA correctness tests, the bench at the recipe's shapes, a trainer smoke, one summary.

    python bench/gpu_check.py                       # on one H100/H200: at most 8 minutes (--budget 480)
    python bench/gpu_check.py --dry-run             # the same stages on CPU, tiny shapes (tests/test_gpu_check.py)
    python bench/gpu_check.py --prepare-wheels DIR  # here, with network: the small peer wheels the GPU image lacks

Stages, each in its own process group with its own time budget and timeout (a hung stage is killed and the next
one runs), progress lines as it goes:

1. ``install``: ``pip install --no-deps --no-build-isolation -e .`` (and the carried peer wheels of ``--wheels``,
   installed to a folder put on ``PYTHONPATH``). Dry run: pip's own ``--dry-run`` of the same command.
2. ``tests``: ``pytest tests/test_gpu_correctness.py`` (on CPU every test skips).
3. ``bench_<op>``: ``bench/run.py --preset gpu_check`` once per op (log-probs with entropy at N = 20,480 and
   H = 1,024 / 2,048 / 2,560, V = 151,936; reverse KL; SOD loss; step weights), every sodkern strategy and every
   peer present. Dry run: ``--preset tiny``.
4. ``trainer``: two SOD steps on one GPU in bf16 through ``sodkern.trainer.train`` with the HF engine: a random
   student of Qwen3-0.6B's width and vocabulary (H = 1,024, V = 151,936) and a random teacher of Qwen3-1.7B's
   width (H = 2,048), 2 layers each (the width and vocabulary decide the lm head; depth only costs time), an
   in-code tokenizer padded to V, responses of 8,192 tokens. Dry run: tiny models, 16-token responses, CPU.
5. ``summary``: ``<out>/summary.md`` and ``summary.json``: each stage's status, time and log tail, the bench
   rows, the trainer's metrics.

Exit code: 0 when every stage passed, 1 otherwise (the summary says which).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPS = ("logprobs", "reverse_kl", "sod_loss", "step_weights")
# seconds per stage on the GPU; together under the 480 s budget with room for the summary
BUDGETS = {
    "install": 50,
    "tests": 90,
    "bench_logprobs": 110,
    "bench_reverse_kl": 40,
    "bench_sod_loss": 40,
    "bench_step_weights": 15,
    "trainer": 120,
}
DRY_BUDGETS = {k: (120 if k == "trainer" else 90) for k in BUDGETS}
PEER_WHEELS = ("trl==1.16.0", "liger-kernel==0.8.5", "cut-cross-entropy==25.1.1", "verl==0.9.1")


@dataclass
class Stage:
    name: str
    cmd: list[str]
    budget: float
    env: dict[str, str] = field(default_factory=dict)
    status: str = "not run"
    seconds: float = 0.0
    log: str = ""


class Clock:
    def __init__(self, budget: float) -> None:
        self.t0 = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def say(clock: Clock, msg: str) -> None:
    print(f"[gpu_check {clock.elapsed():6.1f}s] {msg}", flush=True)


def run_stage(stage: Stage, out: Path, clock: Clock, reserve: float) -> None:
    """Run ``stage.cmd`` in its own process group; kill the group at its timeout."""
    timeout = min(stage.budget, clock.left() - reserve)
    log_path = out / "logs" / f"{stage.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if timeout < 5:
        stage.status = "skipped: no time left in the budget"
        say(clock, f"{stage.name}: {stage.status}")
        return
    say(clock, f"{stage.name}: start (timeout {timeout:.0f} s): {' '.join(stage.cmd)}")
    env = {**os.environ, **stage.env, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            stage.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
            stage.status = "ok" if rc == 0 else f"failed: exit code {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stage.status = f"timed out after {timeout:.0f} s"
    stage.seconds = time.perf_counter() - t0
    stage.log = log_path.read_text(errors="replace")[-3000:]
    say(clock, f"{stage.name}: {stage.status} in {stage.seconds:.1f} s (log: {log_path})")


# ----------------------------------------------------------------------------------------------------------
# Trainer smoke: models, data and config
# ----------------------------------------------------------------------------------------------------------


def padded_tokenizer(vocab_size: int):
    """The in-code tiny tokenizer with its BPE vocabulary padded by plain entries ``<|padN|>`` (no merges lead to
    them) to exactly ``vocab_size`` ids, so that every id a random model samples decodes (Qwen3's vocabulary is
    151,936). Vocabulary entries, not added tokens: 150K added tokens take a minute to load."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from sodkern.trainer.demo.tiny import tiny_tokenizer

    base = tiny_tokenizer()
    data = json.loads(base.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(base), vocab_size):
        vocab[f"<|pad{i}|>"] = i
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token=base.eos_token,
        pad_token=base.pad_token,
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=base.model_max_length,
    )
    tok.chat_template = base.chat_template
    if len(tok) != max(vocab_size, len(base)):
        raise RuntimeError(f"padded tokenizer has {len(tok)} ids, expected {vocab_size}")
    return tok


def write_models(folder: Path, dry_run: bool) -> tuple[Path, Path]:
    """Random student and teacher folders (config, safetensors, tokenizer)."""
    from sodkern.trainer.demo.tiny import tiny_qwen3

    if dry_run:
        vocab, student, teacher = 1024, {"hidden_size": 64}, {"hidden_size": 96}
    else:  # Qwen3-0.6B / Qwen3-1.7B widths and heads, 2 layers
        vocab = 151936
        student = {"hidden_size": 1024, "num_heads": 16, "num_kv_heads": 8, "head_dim": 128, "intermediate_size": 3072}
        teacher = {"hidden_size": 2048, "num_heads": 16, "num_kv_heads": 8, "head_dim": 128, "intermediate_size": 6144}
    tok = padded_tokenizer(vocab)
    paths = []
    for name, kw, seed in (("student", student, 0), ("teacher", teacher, 1)):
        path = folder / name
        tiny_qwen3(tok, num_layers=2, seed=seed, **kw).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def trainer_overrides(out: Path, student: Path, teacher: Path, dry_run: bool) -> list[str]:
    response = 16 if dry_run else 8192
    return [
        "algorithm=sod",
        f"output_dir={out / 'trainer_run'}",
        f"student.path={student}",
        f"teacher.path={teacher}",
        f"student.dtype={'float32' if dry_run else 'bfloat16'}",
        f"data.train_files=[{ROOT / 'tests' / 'fixtures' / 'verl_mixed.jsonl'}]",
        "data.batch_size=1",
        "data.mini_batch_size=1",
        "rollout.engine=hf",
        "rollout.n=2",
        "rollout.max_prompt_tokens=1024",
        f"rollout.max_response_tokens={response}",
        "rollout.max_turns=1",
        "rollout.overlong_buffer=4",
        "train.steps=2",
        f"train.micro_batch_tokens={2 * (response + 1024)}",
        "checkpoint.every=0",
        "checkpoint.export_hf=false",
        "log.tensorboard=false",
        "log.step_log=false",
    ]


def trainer_summary(out: Path) -> dict:
    path = out / "trainer_run" / "metrics.jsonl"
    if not path.exists():
        return {"steps": 0}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = (
        "loss", "response_length/mean", "response_length/max", "time/rollout", "time/scoring", "time/update",
        "time/step", "perf/tokens_per_s", "memory/peak_gpu_gb", "memory/peak_rss_gb",
    )  # fmt: skip
    return {"steps": len(rows), "rows": [{k: r.get(k) for k in ("step", *keys) if k in r or k == "step"} for r in rows]}


# ----------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------


def bench_rows(out: Path) -> list[dict]:
    rows = []
    for op in OPS:
        for name in (f"bench_*_{op}.json", f"bench_*_{op}.partial.json"):
            found = sorted((out / "bench").glob(name))
            if found:
                rows += json.loads(found[0].read_text())["rows"]
                break
    return rows


def summary_markdown(meta: dict, stages: list[Stage], rows: list[dict], trainer: dict) -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    from report import COLUMNS, cells, versus_peers

    lines = [
        f"# sodkern GPU check{' (dry run, CPU)' if meta['dry_run'] else ''}",
        "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}; transformers "
        f"{meta['transformers']}; python {meta['python']}",
        f"- date: {meta['date']}; total {meta['seconds']:.0f} s of a {meta['budget']:.0f} s budget",
        f"- result: {'PASS' if meta['ok'] else 'FAIL'}",
        "",
        "| stage | status | seconds | budget |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.budget:.0f} |" for s in stages]
    lines += ["", "## Bench", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in rows]
    lines += versus_peers(rows)
    lines += ["", "## Trainer smoke (two SOD steps)", ""]
    if trainer.get("rows"):
        keys = list(trainer["rows"][0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in trainer["rows"]:
            lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    else:
        lines.append("no steps logged")
    failed = [s for s in stages if s.status != "ok"]
    for s in failed:
        lines += ["", f"## Log tail: {s.name} ({s.status})", "", "```", s.log[-1500:], "```"]
    return "\n".join(lines) + "\n"


def prepare_wheels(folder: Path) -> int:
    """``pip download`` the peers the GPU image lacks (pure Python: any platform), no dependencies."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    proc = subprocess.run([*cmd, *PEER_WHEELS])
    if proc.returncode == 0:
        print(f"wheels in {folder}: carry it and run: python bench/gpu_check.py --wheels {folder}")
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="the same stages on CPU at tiny shapes")
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (default 480; dry run 900)")
    ap.add_argument("--wheels", type=Path, default=None, help="folder of peer wheels to install first")
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out (install,tests,bench,trainer)")
    ap.add_argument("--prepare-wheels", type=Path, default=None, metavar="DIR", help="download the peer wheels")
    args = ap.parse_args(argv)
    if args.prepare_wheels:
        return prepare_wheels(args.prepare_wheels)

    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run on the GPU machine, or use --dry-run here")
    clock = Clock(args.budget or (900.0 if dry else 480.0))
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    budgets = DRY_BUDGETS if dry else BUDGETS
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    py = sys.executable
    env: dict[str, str] = {}
    if dry:  # the CPU run: nothing forced, no Triton interpreter (the bench measures what a user runs)
        env["SODKERN_BACKEND"] = "auto"
        env["TRITON_INTERPRET"] = "0"
    say(clock, f"out: {out}; {'dry run on CPU' if dry else torch.cuda.get_device_name(0)}; budget {clock.budget:.0f} s")

    stages: list[Stage] = []
    if "install" not in skip:
        cmd = [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]
        if args.wheels:
            site = out / "site"
            wheels = sorted(str(w) for w in args.wheels.glob("*.whl"))
            cmd = ["bash", "-c", " ".join(
                [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(site),
                 *wheels, "&&", *cmd]
            )]  # fmt: skip
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
        if dry:
            cmd = [py, "-m", "pip", "install", "--dry-run", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                   "--no-cache-dir", "--ignore-installed", "-e", "."]  # fmt: skip
        stages.append(Stage("install", cmd, budgets["install"]))
    if "tests" not in skip:
        cmd = [py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests/test_gpu_correctness.py"]
        stages.append(Stage("tests", cmd, budgets["tests"]))
    if "bench" not in skip:
        for op in OPS:
            preset = "tiny" if dry else "gpu_check"
            cmd = [py, "bench/run.py", "--preset", preset, "--ops", op, "--out", str(out / "bench")]
            cmd += ["--device", "cpu", "--no-isolate"] if dry else []
            stages.append(Stage(f"bench_{op}", cmd, budgets[f"bench_{op}"]))
    trainer_stage = None
    if "trainer" not in skip:
        cmd = [py, "-c", "from sodkern.trainer.train import main; raise SystemExit(main())",
               "--config", str(ROOT / "configs" / "tiny_rl.yaml")]  # fmt: skip
        trainer_stage = Stage("trainer", cmd, budgets["trainer"])
        stages.append(trainer_stage)

    for stage in stages:
        stage.env = {**env, **stage.env}
        if stage is trainer_stage:  # the models are written just before (they take host time, not GPU time)
            say(clock, "trainer: writing the random student and teacher")
            student, teacher = write_models(out / "models", dry)
            stage.cmd += trainer_overrides(out, student, teacher, dry)
        run_stage(stage, out, clock, reserve=5.0)
        if stage.name == "install" and args.wheels:
            os.environ["PYTHONPATH"] = stage.env["PYTHONPATH"]

    trainer = trainer_summary(out)
    if trainer_stage is not None and trainer_stage.status == "ok" and trainer["steps"] < 2:
        trainer_stage.status = f"failed: {trainer['steps']} steps logged, 2 expected"
    import transformers
    import triton

    meta = {
        "command": " ".join(["python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "dry_run": dry,
        "device": torch.cuda.get_device_name(0) if not dry else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": clock.elapsed(),
        "budget": clock.budget,
        "ok": all(s.status == "ok" for s in stages),
    }
    rows = bench_rows(out)
    (out / "summary.md").write_text(summary_markdown(meta, stages, rows, trainer))
    stage_dicts = [{k: v for k, v in vars(s).items() if k != "env"} for s in stages]
    summary = {"meta": meta, "stages": stage_dicts, "bench_rows": rows, "trainer": trainer}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    say(clock, f"summary: {out / 'summary.md'} — {'PASS' if meta['ok'] else 'FAIL'}")
    for s in stages:
        print(f"  {s.name:<20} {s.status:<40} {s.seconds:6.1f} s", flush=True)
    return 0 if meta["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
