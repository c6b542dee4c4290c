"""Benchmark cases: the four ops, their implementations (sodkern and its peers), inputs and float64 references.

An *op* is one computation (per-token log-probs with the entropy, per-token reverse KL, the SOD loss, the step
weights); each op has implementations: the naive torch baseline (or the public reference loop), sodkern's op
once per strategy (``backend="torch" | "chunked" | "tiled"``), and the peers where they compute the same thing:
TRL 1.16 (``ChunkedLogProbFunction``, ``ChunkedDivergenceFunction``), verl 0.9.1 (``FusedLinearForPPO``,
``linear_cross_entropy``), Liger-Kernel (fused-linear GRPO and JSD), cut-cross-entropy. Peers are imported
lazily: a peer that is not installed is reported as missing by ``bench/run.py``, one that rejects the device
as unsupported, never dropped. An implementation may return a tuple: the fwd+bwd mode back-propagates the first
element (the log-prob, the loss), the max error covers every element.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

Inputs = dict[str, torch.Tensor]
Shape = dict[str, int]
Fn = Callable[[], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# Naive torch computations. Dtype-generic: run on float64 copies of the inputs they are the float64 references.
# ----------------------------------------------------------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs, float64 for float64 inputs."""
    return torch.promote_types(t.dtype, torch.float32)


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target), logits materialised. hidden ``[N, H]``, weight ``[V, H]``, targets ``[N]`` int64 -> ``[N]``."""
    logits = (hidden @ weight.T).to(_acc(hidden))
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def naive_logprobs_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)``, logits materialised: as :func:`naive_logprobs` plus the full-vocabulary entropy
    ``[N]`` of the same softmax (what verl's actor computes beside the log-probs)."""
    logits = (hidden @ weight.T).to(_acc(hidden))
    logsm = torch.log_softmax(logits, dim=-1)
    return logsm.gather(-1, targets[:, None]).squeeze(-1), -(logsm.exp() * logsm).sum(-1)


def naive_reverse_kl(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) per token: h_s ``[N, Hs]``, w_s ``[V, Hs]``, h_t ``[N, Ht]``, w_t ``[V, Ht]`` -> ``[N]``.

    Logits are materialised; low-precision inputs are accumulated in float32."""
    ls = torch.log_softmax((h_s @ w_s.T).to(_acc(h_s)), dim=-1)
    lt = torch.log_softmax((h_t @ w_t.T).to(_acc(h_s)), dim=-1)
    return (ls.exp() * (ls - lt)).sum(-1)


def ppo_token_mean(
    logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *, sod: bool
) -> torch.Tensor:
    """PPO clipped surrogate, token mean over ``mask``. All ``[B, T]``; ``sod`` adds the log-ratio clamp
    and dual clip (c = 3); without it this is Liger's "dapo" GRPO loss (clip 0.2 / 0.28, beta = 0)."""
    log_ratio = torch.clamp(logp - old, -20.0, 20.0) if sod else logp - old
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.28))
    if sod:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * 3.0), loss)
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp_min(1)


def naive_sod_loss(inp: Inputs, token_weights: torch.Tensor) -> torch.Tensor:
    """SOD loss (README, The algorithm) with logits materialised for every token of the ``[B, T]`` batch."""
    B, T, H = inp["hidden"].shape
    logp = naive_logprobs(inp["hidden"].reshape(B * T, H), inp["weight"], inp["targets"].reshape(-1)).view(B, T)
    m = inp["mask"]
    old, tau = inp["old_logp"].to(logp.dtype), inp["teacher_logp"].to(logp.dtype)
    adv = inp["advantages"].to(logp.dtype)[:, None] + token_weights.to(logp.dtype) * (tau - old)
    return ppo_token_mean(logp, old, torch.where(m, adv, 0.0), m, sod=True)


def step_runs(mask_row: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs of True as half-open ``(start, end)`` pairs."""
    runs, t, T = [], 0, len(mask_row)
    while t < T:
        if mask_row[t]:
            a = t
            while t < T and mask_row[t]:
                t += 1
            runs.append((a, t))
        else:
            t += 1
    return runs


def step_weights64(s: torch.Tensor, tau: torch.Tensor, mask: torch.Tensor, eps=1e-6, delta=0.2) -> torch.Tensor:
    """Float64 per-token SOD step weights (README, The algorithm, steps 1-2) in plain Python floats. All ``[B, T]``."""
    diff = (s.double() - tau.double()).abs().cpu().tolist()
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i, row in enumerate((mask != 0).cpu().tolist()):
        runs = step_runs(row)
        d = [sum(diff[i][a:b]) / (b - a) for a, b in runs]
        for k, (a, b) in enumerate(runs):
            out[i, a:b] = 1.0 if k == 0 else min((d[0] + eps) / (d[k] + eps), 1.0 + delta)
    return out.to(mask.device)


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def _randn(shape, g, device, dtype, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def realistic_mask(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """``[B, T]`` bool response masks: 4-16 assistant turns per row separated by tool-output runs, then padding."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        turns = int(torch.randint(4, 17, (1,), generator=g))
        used = int(T * (0.5 + 0.5 * float(torch.rand(1, generator=g))))
        cuts = (torch.randperm(used - 1, generator=g)[: 2 * turns - 2] + 1).sort().values.tolist()
        bounds = [0, *cuts, used]
        for k in range(0, len(bounds) - 1, 2):  # even segments are assistant turns, odd ones tool output
            mask[i, bounds[k] : bounds[k + 1]] = True
    return mask


def lm_head_inputs(shape: Shape, device: str, dtype: torch.dtype, seed: int) -> Inputs:
    """hidden ``[N, H]``, weight ``[V, H]`` (logit std ~2), targets ``[N]`` int64, grad_out ``[N]`` float32."""
    g = torch.Generator().manual_seed(seed)
    N, H, V = shape["N"], shape["H"], shape["V"]
    return {
        "hidden": _randn((N, H), g, device, dtype),
        "weight": _randn((V, H), g, device, dtype, 2.0 / H**0.5),
        "targets": torch.randint(0, V, (N,), generator=g).to(device),
        "grad_out": _randn((N,), g, device, torch.float32),
    }


def kl_inputs(shape: Shape, device: str, dtype: torch.dtype, seed: int) -> Inputs:
    """Student h_s ``[N, Hs]``, w_s ``[V, Hs]``; teacher h_t ``[N, Ht]``, w_t ``[V, Ht]``; targets, grad_out ``[N]``."""
    inp = lm_head_inputs({"N": shape["N"], "H": shape["Hs"], "V": shape["V"]}, device, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    Ht = shape["Ht"]
    inp["h_t"] = _randn((shape["N"], Ht), g, device, dtype)
    inp["w_t"] = _randn((shape["V"], Ht), g, device, dtype, 2.0 / Ht**0.5)
    return inp


def sod_inputs(shape: Shape, device: str, dtype: torch.dtype, seed: int) -> Inputs:
    """hidden ``[B, T, H]``, weight ``[V, H]``, targets/mask ``[B, T]``, old/teacher log-probs ``[B, T]`` float32,
    advantages ``[B]``. old_logp = current log-prob + N(0, 0.05) so PPO ratios sit near 1 as in training."""
    B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]
    g = torch.Generator().manual_seed(seed)
    hidden = _randn((B, T, H), g, device, dtype)
    weight = _randn((V, H), g, device, dtype, 2.0 / H**0.5)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    with torch.no_grad():
        flat_h, flat_t = hidden.reshape(B * T, H), targets.reshape(-1)
        rows = max(1, (1 << 24) // V)
        cur = torch.cat(
            [naive_logprobs(flat_h[i : i + rows], weight, flat_t[i : i + rows]) for i in range(0, B * T, rows)]
        )
    old = cur.float().view(B, T) + _randn((B, T), g, device, torch.float32, 0.05)
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": targets,
        "old_logp": old,
        "teacher_logp": old + _randn((B, T), g, device, torch.float32, 0.5),
        "advantages": _randn((B,), g, device, torch.float32),
        "mask": realistic_mask(B, T, g).to(device),
    }


def step_inputs(shape: Shape, device: str, dtype: torch.dtype, seed: int) -> Inputs:
    """s, tau ``[B, T]`` float32 log-probs and a realistic ``[B, T]`` bool mask (``dtype`` is not used)."""
    B, T = shape["B"], shape["T"]
    g = torch.Generator().manual_seed(seed)
    s = -3.0 * torch.rand(B, T, generator=g)
    tau = s + torch.randn(B, T, generator=g) * (0.2 + torch.rand(B, 1, generator=g))
    return {"s": s.to(device), "tau": tau.to(device), "mask": realistic_mask(B, T, g).to(device)}


# ----------------------------------------------------------------------------------------------------------
# Implementations: build(inputs) -> zero-argument callable returning the output tensor
# ----------------------------------------------------------------------------------------------------------


STRATEGIES = ("torch", "chunked", "tiled")


def _with_backend(fn: Callable, backend: str | None) -> Callable:
    """``fn`` with ``backend=`` bound; an error (a row status) when this sodkern has no per-call backend."""
    if backend is None:
        return fn
    if "backend" not in inspect.signature(fn).parameters:
        raise RuntimeError(f"{fn.__name__} has no backend= argument in this sodkern (issue 14)")
    return functools.partial(fn, backend=backend)


def _sodkern_logprobs(backend: str | None) -> Callable[[Inputs], Fn]:
    def build(inp: Inputs) -> Fn:
        from sodkern.ops.linear_logprobs import linear_logprobs

        fn = _with_backend(linear_logprobs, backend)
        return lambda: fn(inp["hidden"], inp["weight"], inp["targets"], return_entropy=True)

    return build


def _trl_logprobs(inp: Inputs) -> Fn:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    # chunk_size 32768 and the entropy output: as TRL's GRPO trainer calls it (trl/trainer/utils.py)
    args = (inp["hidden"], inp["weight"], None, inp["targets"], 1.0, 32768, None, 1.0, ("entropy",))
    return lambda: ChunkedLogProbFunction.apply(*args)[:2]


def _verl_fused_linear(inp: Inputs) -> Fn:
    from peers import verl_module

    fused = verl_module("utils.experimental.torch_functional").FusedLinearForPPO(chunk_size=512)  # verl's default
    return lambda: fused(inp["hidden"], inp["weight"], inp["targets"])


def _verl_linear_ce(inp: Inputs) -> Fn:
    from peers import verl_module

    lce = verl_module("utils.kernel.linear_cross_entropy").linear_cross_entropy
    if not inp["hidden"].is_cuda:
        raise RuntimeError("CUDA only (verl's Triton kernels)")
    return lambda: lce(inp["hidden"], inp["weight"], inp["targets"], 1.0, "none")


def _cce_logprobs(inp: Inputs) -> Fn:
    from cut_cross_entropy import linear_cross_entropy

    return lambda: -linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], reduction="none")


def _sodkern_kl(backend: str | None) -> Callable[[Inputs], Fn]:
    def build(inp: Inputs) -> Fn:
        from sodkern.ops.linear_kl import linear_reverse_kl

        fn = _with_backend(linear_reverse_kl, backend)
        return lambda: fn(inp["hidden"], inp["weight"], inp["h_t"], inp["w_t"])

    return build


def _trl_divergence(inp: Inputs) -> Fn:
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    # beta = 1: the reverse KL(student || teacher), per token; the second output (student entropy) is dropped
    args = (inp["hidden"], inp["weight"], None, inp["h_t"], inp["w_t"], None, 1.0, 1.0)
    return lambda: ChunkedDivergenceFunction.apply(*args)[0]


def _liger_jsd(inp: Inputs) -> Fn:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    # beta = 1 is the reverse KL(student || teacher); the hard (CE) term is weighted 0. Output: token mean.
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=inp["hidden"].is_cuda)
    return lambda: loss(inp["hidden"], inp["weight"], inp["h_t"], inp["w_t"], inp["targets"])


def _naive_sod(inp: Inputs) -> Fn:
    from sodkern.ops.step_weights import stepwise_weights

    def fn() -> torch.Tensor:
        w = stepwise_weights(inp["old_logp"], inp["teacher_logp"], inp["mask"]).token_weights
        return naive_sod_loss(inp, w)

    return fn


def _sodkern_sod(backend: str | None) -> Callable[[Inputs], Fn]:
    def build(inp: Inputs) -> Fn:
        from sodkern.ops.sod_loss import sod_loss

        fn = _with_backend(sod_loss, backend)
        args = ("hidden", "weight", "targets", "old_logp", "teacher_logp", "advantages", "mask")
        return lambda: fn(*(inp[k] for k in args), weighting="sod").loss

    return build


def _liger_grpo(inp: Inputs) -> Fn:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo",
        compiled=inp["hidden"].is_cuda,
    )  # fmt: skip
    m = inp["mask"].to(torch.int64)
    return lambda: loss(
        inp["hidden"], inp["weight"], inp["targets"], m, inp["advantages"], old_per_token_logps=inp["old_logp"]
    )[0]


def _grpo_reference(inp: Inputs) -> torch.Tensor:
    """Float64 reference of the Liger GRPO case: GRPO advantages only, no step weights, no dual clip."""
    B, T, H = inp["hidden"].shape
    logp = naive_logprobs(inp["hidden"].reshape(B * T, H), inp["weight"], inp["targets"].reshape(-1)).view(B, T)
    adv = inp["advantages"].to(logp.dtype)[:, None].expand(B, T)
    return ppo_token_mean(logp, inp["old_logp"].to(logp.dtype), adv, inp["mask"], sod=False)


def _reference_loop(inp: Inputs) -> Fn:
    from sodkern.reference import reference_stepwise_weights

    return lambda: reference_stepwise_weights(inp["s"], inp["tau"], inp["mask"])


def _sodkern_steps(inp: Inputs) -> Fn:
    from sodkern.ops.step_weights import stepwise_weights

    return lambda: stepwise_weights(inp["s"], inp["tau"], inp["mask"]).token_weights


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    Attributes:
        name: row label.
        module: imported before running; an ImportError makes the row "missing".
        install: what to install when the module is missing.
        build: ``build(inputs) -> fn``, ``fn()`` returns the output.
        recompute: the backward pass recomputes the logits (4 GEMM passes per training step, not 3).
        reference: float64 reference when the impl computes something other than the op's reference.
        max_rows: time on at most this many rows of a ``[B, T]`` batch and scale the time by ``B / rows``.
    """

    name: str
    module: str
    install: str
    build: Callable[[Inputs], Fn]
    recompute: bool = False
    reference: Callable[[Inputs], torch.Tensor] | None = None
    max_rows: int | None = None


@dataclass(frozen=True)
class Op:
    """One computation and its implementations; ``impls[0]`` is the baseline the others are compared with.

    Attributes:
        make_inputs: ``(shape, device, dtype, seed) -> inputs``.
        reference: float64 reference output from float64 copies of the inputs.
        grad_names: inputs that receive gradients in the fwd+bwd mode; empty when the op has no backward.
        gemm: ``shape -> [(N, H, V), ...]``, the lm-head GEMMs of one forward pass (empty for memory-bound ops).
        grad_gemms: how many of those GEMMs get the two backward products (the student's, not the teacher's).
        bytes_per_token: memory floor for memory-bound ops (bytes moved per ``B·T`` token).
    """

    name: str
    make_inputs: Callable[[Shape, str, torch.dtype, int], Inputs]
    reference: Callable[[Inputs], torch.Tensor]
    impls: tuple[Impl, ...]
    grad_names: tuple[str, ...] = ()
    gemm: Callable[[Shape], list[tuple[int, int, int]]] = lambda s: []
    grad_gemms: int = 1
    bytes_per_token: int = 0

    def passes(self, backward: bool, recompute: bool) -> list[int]:
        """Passes of each GEMM: 1 forward; a training step adds 2 backward products to the GEMMs that get
        gradients, and 1 more to every GEMM when the backward recomputes the logits."""
        out = []
        for k in range(len(self.gemm({"N": 1, "H": 1, "Hs": 1, "Ht": 1, "V": 1, "B": 1, "T": 1}))):
            out.append(1 + (2 * (k < self.grad_gemms) + recompute if backward else 0))
        return out

    def floor_flops(self, shape: Shape, backward: bool, recompute: bool) -> float:
        """GEMM FLOPs of the floor: 2·N·H·V per pass."""
        passes = self.passes(backward, recompute)
        return sum(p * 2.0 * n * h * v for p, (n, h, v) in zip(passes, self.gemm(shape)))


SODKERN = "the sodkern package of this repository: pip install --no-build-isolation -e ."
LIGER = "pip install liger-kernel (or: pip install 'sodkern[gpu]')"
CCE = "pip install cut-cross-entropy"
TRL = "pip install 'trl==1.16.*'"
VERL = "pip install --no-deps 'verl==0.9.1' (its kernel modules are imported without verl's __init__)"
NAIVE = "torch"


def _strategies(
    label: str, module: str, build: Callable[[str | None], Callable[[Inputs], Fn]], recompute: set[str]
) -> tuple:
    """One row per sodkern strategy: ``sodkern <label> (torch|chunked|tiled)``; ``recompute``: the strategies
    whose backward recomputes the logits (4 GEMM passes a training step, not 3)."""
    return tuple(
        Impl(f"sodkern {label} ({b})", module, SODKERN, build(b), recompute=b in recompute) for b in STRATEGIES
    )


def require(impl: Impl) -> None:
    """Raise ImportError when ``impl``'s package is not installed. verl is looked up, not imported (its
    ``__init__`` needs Ray; :func:`peers.verl_module` imports the kernel modules alone)."""
    if impl.module == "verl":
        if "verl" not in sys.modules and importlib.util.find_spec("verl") is None:
            raise ImportError("No module named 'verl'")
        return
    importlib.import_module(impl.module)


OPS: dict[str, Op] = {
    "logprobs": Op(
        name="logprobs",
        make_inputs=lm_head_inputs,
        reference=lambda i: naive_logprobs_entropy(i["hidden"], i["weight"], i["targets"]),
        impls=(
            Impl(
                "naive torch",
                NAIVE,
                "",
                lambda i: lambda: naive_logprobs_entropy(i["hidden"], i["weight"], i["targets"]),
            ),  # fmt: skip
            Impl("trl ChunkedLogProbFunction", "trl.kernels.chunked_logprob", TRL, _trl_logprobs, recompute=True),
            Impl("verl FusedLinearForPPO (torch)", "verl", VERL, _verl_fused_linear, recompute=True),
            Impl("verl linear_cross_entropy", "verl", VERL, _verl_linear_ce, recompute=True),
            Impl(
                "cut-cross-entropy (no entropy)",
                "cut_cross_entropy",
                CCE,
                _cce_logprobs,
                recompute=True,
                reference=lambda i: naive_logprobs(i["hidden"], i["weight"], i["targets"]),
            ),  # fmt: skip
            *_strategies("linear_logprobs", "sodkern.ops.linear_logprobs", _sodkern_logprobs, set(STRATEGIES)),
        ),
        grad_names=("hidden", "weight"),
        gemm=lambda s: [(s["N"], s["H"], s["V"])],
    ),
    "reverse_kl": Op(
        name="reverse_kl",
        make_inputs=kl_inputs,
        reference=lambda i: naive_reverse_kl(i["hidden"], i["weight"], i["h_t"], i["w_t"]),
        impls=(
            Impl(
                "naive torch",
                NAIVE,
                "",
                lambda i: lambda: naive_reverse_kl(i["hidden"], i["weight"], i["h_t"], i["w_t"]),
            ),  # fmt: skip
            Impl(
                "liger fused linear JSD (beta=1)",
                "liger_kernel.chunked_loss",
                LIGER,
                _liger_jsd,
                reference=lambda i: naive_reverse_kl(i["hidden"], i["weight"], i["h_t"], i["w_t"]).mean(),
            ),  # fmt: skip
            Impl(
                "trl ChunkedDivergenceFunction (beta=1)",
                "trl.kernels.chunked_divergence",
                TRL,
                _trl_divergence,
                recompute=True,
            ),  # fmt: skip
            *_strategies("linear_reverse_kl", "sodkern.ops.linear_kl", _sodkern_kl, set(STRATEGIES)),
        ),
        grad_names=("hidden", "weight"),
        gemm=lambda s: [(s["N"], s["Hs"], s["V"]), (s["N"], s["Ht"], s["V"])],
    ),
    "sod_loss": Op(
        name="sod_loss",
        make_inputs=sod_inputs,
        reference=lambda i: naive_sod_loss(i, step_weights64(i["old_logp"], i["teacher_logp"], i["mask"])),
        impls=(
            Impl("naive torch", "sodkern.ops.step_weights", SODKERN, _naive_sod),
            Impl(
                "liger fused linear GRPO (dapo)",
                "liger_kernel.chunked_loss",
                LIGER,
                _liger_grpo,
                recompute=True,
                reference=_grpo_reference,
            ),  # fmt: skip
            # chunked: the gradient is computed in the forward (SOD's weights do not depend on the policy)
            *_strategies("sod_loss", "sodkern.ops.sod_loss", _sodkern_sod, {"torch", "tiled"}),
        ),
        grad_names=("hidden", "weight"),
        # the floor counts only response tokens: the lm head has no work to do elsewhere
        gemm=lambda s: [(s.get("tokens", s["B"] * s["T"]), s["H"], s["V"])],
    ),
    "step_weights": Op(
        name="step_weights",
        make_inputs=step_inputs,
        reference=lambda i: step_weights64(i["s"], i["tau"], i["mask"]),
        impls=(
            Impl("reference loop", "sodkern.reference", SODKERN, _reference_loop, max_rows=32),
            Impl("sodkern stepwise_weights", "sodkern.ops.step_weights", SODKERN, _sodkern_steps),
        ),
        bytes_per_token=9,  # two fp32 log-prob arrays and a 1-byte mask
    ),
}
