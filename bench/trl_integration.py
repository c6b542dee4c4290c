"""TRL integration benchmark: sodkern's fused head vs TRL's own, and SODTrainer vs GRPOTrainer step time.

    python bench/trl_integration.py                       # both parts, CPU, about two minutes
    python bench/trl_integration.py --part head --T 8192 --V 151936 --H 64
    python bench/trl_integration.py --part trainer --steps 4

``head``: one loss step of TRL's fused LM head (``_ChunkedLogProbFunction.apply`` with log-probs and entropy,
then the backward of ``-(logp).sum() - 0.01 * entropy.sum()``, as GRPO with an entropy bonus) at T tokens,
vocabulary V, fp32: TRL 1.16's kernel vs :class:`sodkern.integrations.trl.SodkernLogProbFunction`. Each runs in a
fresh process; peak memory is the peak RSS above the inputs (``bench/measure.py``). Max error: log-probs, entropy
and both gradients against a float64 full-logit reference at a smaller check size.

``trainer``: median seconds per optimizer step of ``GRPOTrainer`` and ``SODTrainer`` (weighting="sod", a tiny
teacher) on the same tiny random Qwen3, tokenizer, prompts and the code-interpreter tool, each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

HEADS = ("trl", "sodkern")


def head_fn(name: str):
    if name == "trl":
        from trl.kernels import ChunkedLogProbFunction

        return ChunkedLogProbFunction
    from sodkern.integrations.trl import SodkernLogProbFunction

    return SodkernLogProbFunction


def head_inputs(T: int, H: int, V: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    return hidden, weight, targets


def head_step(fn, hidden, weight, targets):
    logp, ent, *_ = fn.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("entropy",))
    (-(logp.sum()) - 0.01 * ent.sum()).backward()
    return logp.detach(), ent.detach()


def head_error(name: str, T: int, H: int, V: int) -> float:
    """Max abs error of log-probs, entropy and both gradients vs a float64 full-logit reference."""
    hidden, weight, targets = head_inputs(T, H, V)
    logp, ent = head_step(head_fn(name), hidden, weight, targets)
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    lsm = (h64 @ w64.T).log_softmax(-1)
    ref_logp = lsm.gather(1, targets[:, None]).squeeze(1)
    ref_ent = -(lsm.exp() * lsm).sum(-1)
    (-(ref_logp.sum()) - 0.01 * ref_ent.sum()).backward()
    pairs = ((logp, ref_logp), (ent, ref_ent), (hidden.grad, h64.grad), (weight.grad, w64.grad))
    return max(float((a.double() - b.detach()).abs().max()) for a, b in pairs)


def head_worker(name: str, T: int, H: int, V: int, repeat: int) -> dict:
    from measure import peak_extra_bytes

    fn = head_fn(name)
    hidden, weight, targets = head_inputs(T, H, V)
    t0 = time.perf_counter()
    mem = peak_extra_bytes(lambda: head_step(fn, hidden, weight, targets), "cpu")
    times = [time.perf_counter() - t0]  # the first call (peak memory), then repeat - 1 more, best kept
    for _ in range(repeat - 1):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        head_step(fn, hidden, weight, targets)
        times.append(time.perf_counter() - t0)
    return {"impl": name, "peak_extra_mib": None if mem is None else mem / 2**20, "time_s": min(times)}


def trainer_worker(kind: str, steps: int) -> dict:
    import logging

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    from sodkern.integrations.trl import SODConfig, SODTrainer, code_interpreter_tool, math_reward_func
    from sodkern.trainer.demo.tiny import tiny_qwen3, tiny_tokenizer

    logging.disable(logging.WARNING)
    tok = tiny_tokenizer()
    tok.response_template = qwen3_template
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "ground_truth": "4"}] * 64)
    common = dict(
        output_dir=f"/tmp/sodkern-bench-trl-{kind}",
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=64,
        max_steps=steps + 1,
        report_to="none",
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    kwargs = dict(
        model=tiny_qwen3(tok, seed=0),
        reward_funcs=math_reward_func(),
        train_dataset=data,
        processing_class=tok,
        tools=[code_interpreter_tool()],
    )
    if kind == "grpo":
        trainer = GRPOTrainer(args=GRPOConfig(**common, epsilon_high=0.28, delta=3.0), **kwargs)
    else:
        trainer = SODTrainer(args=SODConfig(**common), teacher_model=tiny_qwen3(tok, seed=1), **kwargs)
    trainer.train()
    step_times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h][1:]  # drop the warm-up
    return {"impl": kind, "step_s": statistics.median(step_times), "steps": len(step_times)}


def in_subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("head", "trainer", "all"), default="all")
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--H", type=int, default=64)
    p.add_argument("--check-T", type=int, default=256, help="tokens of the float64 error check")
    p.add_argument("--repeat", type=int, default=1, help="head steps timed (the best is kept)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        kind, *rest = a.worker
        res = head_worker(rest[0], a.T, a.H, a.V, a.repeat) if kind == "head" else trainer_worker(rest[0], a.steps)
        print(json.dumps(res))
        return 0
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU fp32")
    if a.part in ("head", "all"):
        rows = []
        for name in HEADS:
            res = in_subprocess(["head", name, "--T", str(a.T), "--V", str(a.V), "--H", str(a.H)])
            res["max_err"] = head_error(name, a.check_T, a.H, a.V)
            rows.append(res)
        base = rows[0]
        print(f"\nfused LM head, one loss step (fwd+bwd, log-probs + entropy): T={a.T} V={a.V} H={a.H}")
        print(f"{'impl':10} {'time s':>8} {'peak MiB':>10} {'max err':>10} {'time/trl':>9} {'mem/trl':>8}")
        for r in rows:
            print(
                f"{r['impl']:10} {r['time_s']:8.3f} {r['peak_extra_mib']:10.1f} {r['max_err']:10.2e} "
                f"{r['time_s'] / base['time_s']:9.2f} {r['peak_extra_mib'] / base['peak_extra_mib']:8.2f}"
            )
        print(f"(float64 check at T={a.check_T}; logits of one step would be {a.T * a.V * 4 / 2**20:.0f} MiB)")
    if a.part in ("trainer", "all"):
        rows = [in_subprocess(["trainer", kind, "--steps", str(a.steps)]) for kind in ("grpo", "sod")]
        print("\nwall time per optimizer step, tiny Qwen3 (8 generations, 64 tokens, code-interpreter tool)")
        print(f"{'trainer':10} {'s/step':>8} {'ratio':>7} {'steps':>6}")
        for r in rows:
            print(f"{r['impl']:10} {r['step_s']:8.3f} {r['step_s'] / rows[0]['step_s']:7.2f} {r['steps']:6d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
