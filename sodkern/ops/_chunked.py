"""The "chunked" strategy: GEMMs on ``[token tile x vocab tile]`` tiles, each tile folded by one kernel.

The logits GEMM runs in the input dtype with fp32 accumulation and an fp32 result (``torch.mm(...,
out_dtype=torch.float32)`` where the device supports it, i.e. cuBLAS on CUDA; elsewhere the two tiles are
upcast, never the whole weight). Each fp32 tile is folded into per-token statistics by a Triton kernel of
:mod:`sodkern.kernels.fold` when Triton can run (CUDA, or the interpreter), else by the torch twins below
(float64 always folds in torch). The backward recomputes each tile, turns it into ``dz`` (the input dtype
where the GEMM takes it), and accumulates ``grad_hidden`` in fp32 ``[N, H]`` and ``grad_weight`` one vocab
tile at a time in fp32 ``[vocab tile, H]``: no fp32 copy of the weight or of its gradient.

Extra memory: one logits tile (``TOKEN_TILE x VOCAB_TILE`` fp32, two for the KL) plus O(N) statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from sodkern._backend import triton_usable

TOKEN_TILE = {"cuda": 4096}  # tokens per tile by device type; other devices use TOKEN_TILE_DEFAULT
TOKEN_TILE_DEFAULT = 1024
VOCAB_TILE = 32768
FUSED_TILE_ELEMENTS = {"cuda": 1 << 27}  # [tokens, V] fp32 logits block of the fused (3-GEMM) loss
FUSED_TILE_ELEMENTS_DEFAULT = 1 << 25


def tiles(n: int, size: int) -> Iterator[slice]:
    """Slices of ``size`` covering ``range(n)`` (the last one ragged)."""
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def token_tile(device: torch.device) -> int:
    return TOKEN_TILE.get(device.type, TOKEN_TILE_DEFAULT)


@functools.cache
def _mm_out_dtype(device_type: str, dtype: torch.dtype) -> bool:
    """Does ``torch.mm(a, b, out_dtype=torch.float32)`` run for ``dtype`` operands on this device type?"""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation and result (fp64 for fp64 operands), in the operands' dtype."""
    acc = acc_dtype(a.dtype)
    if a.dtype == b.dtype == acc:
        return a @ b
    if a.dtype == b.dtype and _mm_out_dtype(a.device.type, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.to(acc) @ b.to(acc)


def dz_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype of the ``dz`` tile fed to the gradient GEMMs: the input dtype where it has an fp32-output GEMM."""
    acc = acc_dtype(dtype)
    return dtype if dtype == acc or _mm_out_dtype(device.type, dtype) else acc


def fold_kernels(*tensors: torch.Tensor) -> ModuleType | None:
    """The Triton fold module when it can run on these tensors (not float64), else None (torch folds)."""
    if any(t.dtype == torch.float64 for t in tensors) or not triton_usable(*tensors):
        return None
    from sodkern.kernels import fold  # lazy: Triton only when used

    return fold


# ---------------------------------------------------------------- torch folds (twins of kernels/fold.py)


def _fold_lse_torch(
    z: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    inv_t: float,
    m: torch.Tensor,
    s: torch.Tensor,
    zt: torch.Tensor,
    t: torch.Tensor | None,
) -> None:
    """Torch twin of :func:`sodkern.kernels.fold.fold_lse` (scales and shifts the scratch tile ``z`` in place)."""
    z = z.mul_(inv_t) if inv_t != 1.0 else z
    m_new = torch.maximum(m, z.amax(dim=1))
    alpha = torch.exp(m - m_new)
    d = z.sub_(m_new[:, None])  # z - m_new (z is a scratch tile)
    e = d.exp()
    if t is not None:
        shift = torch.where(s > 0, m - m_new, 0.0) * s
        t.copy_(alpha * (t + shift) + (e * d).sum(dim=1))
    s.copy_(s * alpha + e.sum(dim=1))
    local = targets.long() - vocab_start
    inside = (local >= 0) & (local < z.shape[1])
    rows = inside.nonzero().squeeze(1)
    zt[rows] = d[rows, local[rows]] + m_new[rows]
    m.copy_(m_new)


def _fold_kl_torch(
    zs: torch.Tensor,
    zt: torch.Tensor,
    inv_t: float,
    ms: torch.Tensor,
    ss: torch.Tensor,
    mt: torch.Tensor,
    st: torch.Tensor,
    a: torch.Tensor,
) -> None:
    """Torch twin of :func:`sodkern.kernels.fold.fold_kl` (overwrites the scratch tiles)."""
    zs, zt = zs.mul_(inv_t), zt.mul_(inv_t)
    ms_new = torch.maximum(ms, zs.amax(dim=1))
    mt_new = torch.maximum(mt, zt.amax(dim=1))
    alpha_s = torch.exp(ms - ms_new)
    ds, dt = zs.sub_(ms_new[:, None]), zt.sub_(mt_new[:, None])  # shifted logits (scratch tiles)
    es = ds.exp()
    started = ss > 0  # before the first tile both maxes are -inf (and a = ss = 0)
    shift = ((torch.where(started, ms, ms_new) - ms_new) + (mt_new - torch.where(started, mt, mt_new))) * ss
    st.copy_(st * torch.exp(mt - mt_new) + dt.exp().sum(dim=1))
    a.copy_(alpha_s * (a + shift) + (es * ds.sub_(dt)).sum(dim=1))
    ss.copy_(ss * alpha_s + es.sum(dim=1))
    ms.copy_(ms_new)
    mt.copy_(mt_new)


def _logprob_grad_torch(
    z: torch.Tensor,
    out: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    lse: torch.Tensor,
    g: torch.Tensor | None,
    ent: torch.Tensor | None,
    ge: torch.Tensor | None,
    inv_t: float,
) -> None:
    """Torch twin of :func:`sodkern.kernels.fold.logprob_grad` (overwrites the scratch tile ``z``)."""
    log_p = z.mul_(inv_t).sub_(lse[:, None])
    p = log_p.exp()
    if ge is not None:  # -g_ent p (log p + H)
        dz = log_p.add_(ent[:, None]).mul_(p).mul_(-ge[:, None])
        if g is not None:
            dz.addcmul_(p, g[:, None], value=-1.0)
    else:
        dz = p.mul_(-g[:, None])
    if g is not None:
        local = targets.long() - vocab_start
        inside = ((local >= 0) & (local < z.shape[1])).nonzero().squeeze(1)
        dz[inside, local[inside]] += g[inside]
    out.copy_(dz.mul_(inv_t))


def _kl_grad_torch(
    zs: torch.Tensor,
    zt: torch.Tensor,
    out: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    kl: torch.Tensor,
    g: torch.Tensor,
    inv_t: float,
) -> None:
    """Torch twin of :func:`sodkern.kernels.fold.kl_grad` (overwrites the scratch tiles)."""
    log_ps = zs.mul_(inv_t).sub_(lse_s[:, None])
    dz = zt.mul_(inv_t).sub_(lse_t[:, None]).neg_().add_(log_ps).sub_(kl[:, None])
    out.copy_(dz.mul_(log_ps.exp_()).mul_(g[:, None] * inv_t))


# ---------------------------------------------------------------- linear_logprobs


def logprobs_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_t: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``hidden [N, H]``, ``weight [V, H]``, ``targets [N]`` -> ``(logp, lse, entropy)`` ``[N]`` fp32 (fp64
    for fp64 inputs; entropy None unless asked)."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    kern = fold_kernels(hidden, weight)
    fold = kern.fold_lse if kern is not None else _fold_lse_torch
    m = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)
    s, zt = torch.zeros_like(m), torch.zeros_like(m)
    t = torch.zeros_like(m) if entropy else None
    for rows in tiles(n, token_tile(hidden.device)):
        h = hidden[rows]
        for cols in tiles(v, VOCAB_TILE):
            z = mm_acc(h, weight[cols].T)
            fold(z, targets[rows], cols.start, inv_t, m[rows], s[rows], zt[rows], t[rows] if entropy else None)
    log_s = torch.log(s)
    ent = log_s - t / s if entropy else None
    return (zt - m) - log_s, m + log_s, ent


def logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor | None,
    inv_t: float,
    need_hidden: bool,
    need_weight: bool,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp) + sum(grad_entropy * entropy)``; ``[N]`` fp32 per-token inputs
    (either gradient may be None). Returns ``(grad_hidden [N, H], grad_weight [V, H])`` in the input dtype."""
    acc = acc_dtype(hidden.dtype)
    g = grad_logp.to(acc).contiguous() if grad_logp is not None else None
    ge = grad_entropy.to(acc).contiguous() if grad_entropy is not None else None
    kern = fold_kernels(hidden, weight)
    grad_fold = kern.logprob_grad if kern is not None else _logprob_grad_torch

    def tile_dz(rows: slice, cols: slice, z: torch.Tensor, out: torch.Tensor) -> None:
        grad_fold(
            z, out, targets[rows], cols.start, lse[rows], g[rows] if g is not None else None,
            entropy[rows] if ge is not None else None, ge[rows] if ge is not None else None, inv_t,
        )  # fmt: skip

    return head_grads(hidden, weight, need_hidden, need_weight, tile_dz)


def head_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    need_hidden: bool,
    need_weight: bool,
    tile_dz: Callable[[slice, slice, torch.Tensor, torch.Tensor], None],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward through ``z = hidden @ weight.T``, vocab tile outer, token tile inner.

    ``tile_dz(rows, cols, z, out)`` writes ``dL/dz`` of the recomputed fp32 tile ``z`` into ``out`` (may
    overwrite ``z``; ``out`` may be ``z``); the KL's ``tile_dz`` recomputes the teacher tile itself.
    """
    (n, h), v = hidden.shape, weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    gdt = dz_dtype(hidden.dtype, hidden.device)
    gh = torch.zeros((n, h), dtype=acc, device=hidden.device) if need_hidden else None
    gw = torch.empty_like(weight) if need_weight else None
    for cols in tiles(v, VOCAB_TILE):
        w_c = weight[cols]
        gw_c = torch.zeros((w_c.shape[0], h), dtype=acc, device=hidden.device) if need_weight else None
        for rows in tiles(n, token_tile(hidden.device)):
            h_r = hidden[rows]
            z = mm_acc(h_r, w_c.T)
            dz = z if gdt == z.dtype else torch.empty(z.shape, dtype=gdt, device=z.device)
            tile_dz(rows, cols, z, dz)
            if gh is not None:
                gh[rows] += mm_acc(dz, w_c)
            if gw_c is not None:
                gw_c += mm_acc(dz.T, h_r)
        if gw is not None:
            gw[cols] = gw_c
    return (gh.to(hidden.dtype) if gh is not None else None), gw


# ---------------------------------------------------------------- linear_reverse_kl


def reverse_kl_fwd(
    sh: torch.Tensor, sw: torch.Tensor, th: torch.Tensor, tw: torch.Tensor, inv_t: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student ``sh [N, Hs]``, ``sw [V, Hs]``; teacher ``th [N, Ht]``, ``tw [V, Ht]`` ->
    ``(kl, lse_s, lse_t)`` ``[N]`` fp32 (fp64 for fp64 student inputs)."""
    n, v = sh.shape[0], sw.shape[0]
    acc = acc_dtype(sh.dtype)
    kern = fold_kernels(sh, sw, th, tw)
    fold = kern.fold_kl if kern is not None else _fold_kl_torch
    ms = torch.full((n,), float("-inf"), dtype=acc, device=sh.device)
    mt = ms.clone()
    ss, st, a = torch.zeros_like(ms), torch.zeros_like(ms), torch.zeros_like(ms)
    for rows in tiles(n, token_tile(sh.device)):
        for cols in tiles(v, VOCAB_TILE):
            zs = mm_acc(sh[rows], sw[cols].T)
            zt = mm_acc(th[rows], tw[cols].T).to(acc)
            fold(zs, zt, inv_t, ms[rows], ss[rows], mt[rows], st[rows], a[rows])
    log_ss, log_st = torch.log(ss), torch.log(st)
    kl = a / ss - log_ss + log_st  # E_ps[z_s - z_t] - lse_s + lse_t, with the maxes cancelled
    return kl, ms + log_ss, mt + log_st


def reverse_kl_bwd(
    sh: torch.Tensor,
    sw: torch.Tensor,
    th: torch.Tensor,
    tw: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    kl: torch.Tensor,
    grad_kl: torch.Tensor,
    inv_t: float,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_kl * kl)`` w.r.t. the student's ``sh`` and ``sw`` (input dtype)."""
    acc = acc_dtype(sh.dtype)
    g = grad_kl.to(acc).contiguous()
    kern = fold_kernels(sh, sw, th, tw)
    grad_fold = kern.kl_grad if kern is not None else _kl_grad_torch

    def tile_dz(rows: slice, cols: slice, z: torch.Tensor, out: torch.Tensor) -> None:
        zt = mm_acc(th[rows], tw[cols].T).to(acc)
        grad_fold(z, zt, out, lse_s[rows], lse_t[rows], kl[rows], g[rows], inv_t)

    return head_grads(sh, sw, need_hidden, need_weight, tile_dz)


# ---------------------------------------------------------------- fused loss: gradient in the forward


def fused_logprob_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    inv_t: float,
    token_loss: Callable[[torch.Tensor, slice], torch.Tensor],
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A loss ``sum over token tiles of token_loss(logp[rows], rows)`` and its gradient in 3 GEMM passes.

    ``token_loss(logp_rows, rows)`` returns a scalar from the ``[rows]`` log-probs and must not depend on other
    tokens' log-probs (true for SOD: weights and advantages come from the rollout, not the current policy),
    so each token's upstream gradient is known as soon as its log-prob is. Per token tile the ``[tile, V]``
    fp32 logits block (at most ``FUSED_TILE_ELEMENTS``) is computed once (pass 1), folded, turned into ``dz``
    in place, then ``dz @ weight`` (pass 2) and ``dz.T @ hidden`` (pass 3) accumulate in fp32.

    Returns:
        ``(loss, logp [N], grad_hidden [N, H] or None, grad_weight [V, H] or None)``; the loss is a 0-dim
        tensor, ``logp`` fp32 (fp64 for fp64 inputs), gradients in the input dtype.
    """
    (n, h), v = hidden.shape, weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    kern = fold_kernels(hidden, weight)
    fold = kern.fold_lse if kern is not None else _fold_lse_torch
    grad_fold = kern.logprob_grad if kern is not None else _logprob_grad_torch
    gdt = dz_dtype(hidden.dtype, hidden.device)
    budget = FUSED_TILE_ELEMENTS.get(hidden.device.type, FUSED_TILE_ELEMENTS_DEFAULT)
    logp = torch.empty(n, dtype=acc, device=hidden.device)
    gh = torch.empty((n, h), dtype=acc, device=hidden.device) if need_hidden else None
    gw = torch.zeros((v, h), dtype=acc, device=hidden.device) if need_weight else None
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    for rows in tiles(n, max(1, budget // max(v, 1))):
        h_r, tg = hidden[rows], targets[rows]
        nr = h_r.shape[0]
        z = torch.empty((nr, v), dtype=acc, device=hidden.device)
        for cols in tiles(v, VOCAB_TILE):  # pass 1: logits
            z[:, cols] = mm_acc(h_r, weight[cols].T)
        m = torch.full((nr,), float("-inf"), dtype=acc, device=hidden.device)
        s, zt = torch.zeros_like(m), torch.zeros_like(m)
        zc = z if kern is not None else z.clone()  # the torch fold scales its tile in place
        fold(zc, tg, 0, inv_t, m, s, zt, None)
        log_s = torch.log(s)
        logp[rows] = lp = (zt - m) - log_s
        with torch.enable_grad():
            lp = lp.detach().requires_grad_()
            tile_loss = token_loss(lp, rows)
            (g,) = torch.autograd.grad(tile_loss, lp)
        loss += tile_loss.detach()
        dz = z if gdt == acc else torch.empty((nr, v), dtype=gdt, device=hidden.device)
        grad_fold(z, dz, tg, 0, m + log_s, g.to(acc).contiguous(), None, None, inv_t)
        if gh is not None:
            gh[rows] = 0.0
        for cols in tiles(v, VOCAB_TILE):  # passes 2 and 3: dz @ weight, dz.T @ hidden
            if gh is not None:
                gh[rows] += mm_acc(dz[:, cols], weight[cols])
            if gw is not None:
                gw[cols] += mm_acc(dz[:, cols].T, h_r)
    return (
        loss,
        logp,
        gh.to(hidden.dtype) if gh is not None else None,
        gw.to(weight.dtype) if gw is not None else None,
    )
