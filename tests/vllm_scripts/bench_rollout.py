"""Rollout tokens/s of the HF engine and the vLLM engine (turn-synchronous and continuous batching) on the same
tiny Qwen3 and the same prompts, on this machine's CPU (or GPU).

    VLLM_CPU_KVCACHE_SPACE=1 python tests/vllm_scripts/bench_rollout.py --trajectories 32 --tokens 256

Prints one JSON line per engine: generated (mask = 1) tokens per wall-clock second (best, median) and per
CPU second of the process (median), tool calls.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sodkern.trainer.demo.tiny import save_tiny
from sodkern.trainer.rollout.chat import ChatFormat
from sodkern.trainer.rollout.hf_engine import HFEngine
from sodkern.trainer.rollout.loop import RolloutParams, rollout
from sodkern.trainer.sandbox import CodeInterpreter
from sodkern.trainer.tasks.data import Problem

QUESTIONS = [
    "What is 2 + 2?",
    "Compute the sum of the first 100 positive integers.",
    "How many ways are there to choose 3 of 10 books?",
    "Solve 3x + 5 = 20.",
]


def measure(name: str, run, problems, config, repeats: int) -> None:
    """Tokens per wall-clock second (best and median of ``repeats`` rollouts after one warm-up) and per CPU
    second of this process (threads included, the sandbox's processes not): on a shared machine the wall
    clock depends on the neighbours, the CPU time much less."""
    run(problems, config)  # warm-up: vLLM's first batches of each size are slow (kernel setup)
    rates, per_cpu, calls = [], [], 0
    for i in range(repeats):
        torch.manual_seed(i)
        wall, cpu = time.perf_counter(), time.process_time()
        trajectories = run(problems, config)
        tokens = sum(sum(t.response_mask) for t in trajectories)
        rates.append(tokens / (time.perf_counter() - wall))
        per_cpu.append(tokens / (time.process_time() - cpu))
        calls += sum(t.num_tool_calls for t in trajectories)
    rates.sort()
    per_cpu.sort()
    row = {
        "engine": name,
        "best_tokens_per_s": round(rates[-1], 1),
        "median_tokens_per_s": round(rates[len(rates) // 2], 1),
        "median_tokens_per_cpu_s": round(per_cpu[len(per_cpu) // 2], 1),
    }
    print(json.dumps({**row, "tool_calls": calls, "repeats": repeats}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trajectories", type=int, default=32, help="problems x n")
    parser.add_argument("--tokens", type=int, default=256, help="max response tokens")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64, help="tiny Qwen3 hidden size")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sodkern.trainer.rollout.vllm_async import rollout_async
    from sodkern.trainer.rollout.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory() as folder:
        save_tiny(folder, hidden_size=args.hidden, num_layers=args.layers, intermediate_size=2 * args.hidden)
        tok = AutoTokenizer.from_pretrained(folder)
        chat, tool = ChatFormat(tok), CodeInterpreter()
        n = max(1, args.trajectories // len(QUESTIONS))
        messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
        problems = [Problem(f"q{i}", "bench", "math", m, "0") for i, m in enumerate(messages)]
        config = RolloutParams(n=n, max_turns=args.max_turns, max_response_tokens=args.tokens, progress=False)

        if not args.skip_hf:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            hf = HFEngine(model, pad_token_id=tok.pad_token_id, max_batch_size=64)
            measure("hf", lambda p, c: rollout(p, hf, chat, tool, c), problems, config, args.repeats)
            del model, hf

        vllm = VLLMEngine(folder, dtype="float32", max_model_len=4096, max_num_seqs=64, enforce_eager=args.eager)
        measure("vllm", lambda p, c: rollout(p, vllm, chat, tool, c), problems, config, args.repeats)
        measure("vllm_async", lambda p, c: rollout_async(p, vllm, chat, tool, c), problems, config, args.repeats)
        vllm.close()


if __name__ == "__main__":
    main()
