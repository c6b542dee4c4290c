"""``sodkern.integrations.verl.compute_stepwise_opd_weights`` against the SOD fork's Python loop it replaces.

Multi-turn masks shaped like the authors' workload (assistant turns separated by tool outputs, right padding);
default 64 x 20,480 tokens, the SOD script's max response length. Prints one table row per implementation: best
time over the repeats, peak extra memory (CPU: peak RSS above the inputs), max error against the loop (weight_mask
and every d/w value of log_info), and the speed-up over the loop measured in the same run.

    python bench/verl_fork_weights.py                      # 64 x 20,480 on CPU, 1 thread
    python bench/verl_fork_weights.py --batch 8 --tokens 2048 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import peak_extra_bytes, timings  # noqa: E402

from sodkern.integrations.verl import compute_stepwise_opd_weights  # noqa: E402
from sodkern.reference import reference_compute_stepwise_opd_weights  # noqa: E402


def multi_turn_batch(batch: int, tokens: int, turns: int, seed: int, device: str):
    """``(old_log_probs, ref_log_prob, response_mask)`` ``[batch, tokens]``: up to ``turns`` assistant turns
    per row separated by tool-output gaps, then right padding (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, tokens, dtype=torch.int64)
    for i in range(batch):
        length = int(tokens * (0.5 + 0.5 * torch.rand((), generator=g)))
        n_turns = int(torch.randint(1, turns + 1, (), generator=g))
        cuts = torch.sort(torch.randint(0, length, (2 * n_turns - 1,), generator=g)).values.tolist()
        edges = [0, *cuts, length]
        for k in range(0, len(edges) - 1, 2):  # even segments are assistant turns, odd ones tool output
            mask[i, edges[k] : edges[k + 1]] = 1
    old = -4 * torch.rand(batch, tokens, generator=g)
    ref = old + 0.5 * torch.randn(batch, tokens, generator=g)
    return old.to(device), ref.to(device), mask.to(device)


def max_error(got, want) -> float:
    (w1, info1), (w2, info2) = got, want
    err = (w1.double().cpu() - w2.double().cpu()).abs().max().item() if w1.numel() else 0.0
    for a, b in zip(info1, info2):
        assert a["boundaries"] == b["boundaries"] and a["n_tokens_per_step"] == b["n_tokens_per_step"]
        for key in ("d_values", "w_values"):
            err = max([err, *(abs(x - y) for x, y in zip(a[key], b[key]))])
    return err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--turns", type=int, default=16, help="max assistant turns per row (the SOD script: 16)")
    ap.add_argument("--delta", type=float, default=0.2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--loop-repeat", type=int, default=1, help="timed calls of the Python loop (slow)")
    ap.add_argument("--repeat", type=int, default=10, help="timed calls of sodkern")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    old, ref, mask = multi_turn_batch(args.batch, args.tokens, args.turns, args.seed, args.device)
    kw = dict(epsilon=1e-6, delta=args.delta)
    loop = lambda: reference_compute_stepwise_opd_weights(old, ref, mask, **kw)
    ours = lambda: compute_stepwise_opd_weights(old, ref, mask, **kw)
    want = loop()
    rows = []
    for name, fn, repeat, warmup in (("fork loop", loop, args.loop_repeat, 0), ("sodkern", ours, args.repeat, 2)):
        seconds = timings(fn, args.device, warmup=warmup, repeat=repeat, min_total=0.0, mode="min")
        rows.append(
            {
                "impl": name,
                "seconds": seconds,
                "peak_extra_mib": (peak_extra_bytes(fn, args.device) or 0) / 2**20,
                "max_error": max_error(fn(), want),
            }
        )
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
    steps = sum(info["n_steps"] for info in want[1])
    print(
        f"compute_stepwise_opd_weights, {args.batch} x {args.tokens} tokens, {steps} steps, device={args.device}, "
        f"threads={args.threads}, torch {torch.__version__}"
    )
    print(f"| {'impl':<10} | {'time':>10} | {'peak extra':>11} | {'max error':>9} | {'speed-up':>9} |")
    print(f"|{'-' * 12}|{'-' * 12}|{'-' * 13}|{'-' * 11}|{'-' * 11}|")
    for r in rows:
        print(
            f"| {r['impl']:<10} | {r['seconds'] * 1e3:>8.1f}ms | {r['peak_extra_mib']:>7.1f} MiB | "
            f"{r['max_error']:>9.1e} | {r['speedup']:>8.0f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
