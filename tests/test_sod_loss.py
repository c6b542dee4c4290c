"""sodkern.sod_loss against a float64 reference of README: The algorithm with materialised logits, both backends."""

import pytest
import torch

from sodkern.ops.sod_loss import sod_loss


def ref_weights(s, tau, mask, eps, delta):
    """Step weights by walking each row (float64)."""
    B, T = mask.shape
    w = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        runs, t = [], 0
        while t < T:
            if mask[i, t]:
                a = t
                while t < T and mask[i, t]:
                    t += 1
                runs.append((a, t))
            else:
                t += 1
        d = [float((s[i, a:b] - tau[i, a:b]).abs().mean()) for a, b in runs]
        for k, (a, b) in enumerate(runs):
            w[i, a:b] = 1.0 if k == 0 else min((d[0] + eps) / (d[k] + eps), 1 + delta)
    return w


def ref_loss(
    hidden,
    weight,
    targets,
    old,
    tau,
    adv,
    mask,
    weighting,
    *,
    eps=1e-6,
    delta=0.2,
    c=1.0,
    cl=0.2,
    ch=0.28,
    cc=3.0,
    temp=1.0,
    th=None,
    tw=None,
    divergence="logprob",
):
    """README: The algorithm written out with full float64 logits."""
    m = mask.bool()
    logits = (hidden.double() @ weight.double().T) / temp
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    adv = adv.double()
    adv = adv[:, None].expand_as(old) if adv.dim() == 1 else adv
    extra = 0.0
    if divergence == "full_kl":
        lps = torch.log_softmax(logits, -1)
        lpt = torch.log_softmax((th.double() @ tw.double().T) / temp, -1)
        kl = (lps.exp() * (lps - lpt)).sum(-1)
        w = ref_weights(kl.detach(), torch.zeros_like(kl), m, eps, delta) if weighting == "sod" else m.double()
        A = adv
        extra = c * (w * kl)[m].sum() / m.sum()
    else:
        if weighting == "sod":
            w = ref_weights(old.double(), tau.double(), m, eps, delta)
        elif weighting == "uniform":
            w = m.double()
        else:
            w = torch.zeros_like(old, dtype=torch.float64)
        A = adv + (c * w * (tau.double() - old.double()) if weighting != "none" else 0.0)
    ratio = torch.exp(torch.clamp(logp - old.double(), -20, 20))
    l1 = -A * ratio
    l2 = -A * torch.clamp(ratio, 1 - cl, 1 + ch)
    lc = torch.maximum(l1, l2)
    L = torch.where(A < 0, torch.minimum(lc, -A * cc), lc)
    return L[m].sum() / m.sum() + extra, w


def make_batch(B=3, T=29, H=24, V=83, dtype=torch.float32, seed=0, Ht=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.int64)
    mask[0, 2:9] = 1
    mask[0, 13:20] = 1
    mask[0, 24:] = 1
    mask[1, 5:27] = 1
    mask[2, ::3] = 1  # many one-token steps
    with torch.no_grad():
        logp = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    tau = (logp + torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, generator=g)
    out = dict(hidden=hidden, weight=weight, targets=targets, old=old, tau=tau, adv=adv, mask=mask)
    if Ht:
        out["th"] = torch.randn(B, T, Ht, generator=g).to(dtype)
        out["tw"] = (torch.randn(V, Ht, generator=g) * 0.3).to(dtype)
    return out


@pytest.mark.parametrize("weighting", ["sod", "uniform", "none"])
def test_loss_and_grads_match_float64(backend, weighting):
    b = make_batch()
    h = b["hidden"].clone().requires_grad_()
    W = b["weight"].clone().requires_grad_()
    out = sod_loss(h, W, b["targets"], b["old"], b["tau"], b["adv"], b["mask"], weighting=weighting, temperature=0.9)
    out.loss.backward()
    h64 = b["hidden"].double().requires_grad_()
    W64 = b["weight"].double().requires_grad_()
    ref, w = ref_loss(h64, W64, b["targets"], b["old"], b["tau"], b["adv"], b["mask"], weighting, temp=0.9)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(W.grad.double(), W64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.token_weights.double(), w, rtol=1e-5, atol=1e-6)
    for k in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "mean_token_weight"):
        assert torch.isfinite(out.metrics[k])


def test_bf16_inputs(backend):
    b = make_batch(dtype=torch.bfloat16, seed=1)
    h = b["hidden"].clone().requires_grad_()
    out = sod_loss(h, b["weight"], b["targets"], b["old"], b["tau"], b["adv"], b["mask"])
    out.loss.backward()
    ref, _ = ref_loss(b["hidden"], b["weight"], b["targets"], b["old"], b["tau"], b["adv"], b["mask"], "sod")
    torch.testing.assert_close(out.loss.double(), ref, rtol=2e-2, atol=2e-2)
    assert h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad.float()).all()


def test_sod_and_opd_differ_only_in_weights(backend):
    b = make_batch(seed=2)
    args = (b["hidden"], b["weight"], b["targets"], b["old"], b["tau"], b["adv"], b["mask"])
    sod = sod_loss(*args, weighting="sod")
    opd = sod_loss(*args, weighting="uniform")
    m = b["mask"].bool()
    opd_term = torch.where(m, b["tau"] - b["old"], 0.0)
    diff = sod.advantages - opd.advantages
    torch.testing.assert_close(diff, (sod.token_weights - opd.token_weights) * opd_term)
    torch.testing.assert_close(opd.token_weights, m.float())
    torch.testing.assert_close(sod.logp, opd.logp)


def test_grpo_has_no_teacher_term(backend):
    b = make_batch(seed=3)
    args = (b["hidden"], b["weight"], b["targets"], b["old"])
    a = sod_loss(*args, b["tau"], b["adv"], b["mask"], weighting="none")
    z = sod_loss(*args, None, b["adv"], b["mask"], weighting="none")
    torch.testing.assert_close(a.loss, z.loss)
    m = b["mask"].bool()
    torch.testing.assert_close(a.advantages, torch.where(m, b["adv"][:, None].expand_as(m), 0.0))


def test_full_kl_variant(backend):
    b = make_batch(seed=4, Ht=31)
    h = b["hidden"].clone().requires_grad_()
    out = sod_loss(
        h,
        b["weight"],
        b["targets"],
        b["old"],
        None,
        b["adv"],
        b["mask"],
        divergence="full_kl",
        teacher_hidden=b["th"],
        teacher_weight=b["tw"],
    )
    out.loss.backward()
    h64 = b["hidden"].double().requires_grad_()
    ref, w = ref_loss(
        h64,
        b["weight"],
        b["targets"],
        b["old"],
        None,
        b["adv"],
        b["mask"],
        "sod",
        th=b["th"],
        tw=b["tw"],
        divergence="full_kl",
    )
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.token_weights.double(), w, rtol=1e-5, atol=1e-6)
    assert "distill_loss" in out.metrics


def test_per_token_advantages_and_num_tokens(backend):
    b = make_batch(seed=5)
    adv_bt = b["adv"][:, None].expand(b["old"].shape).contiguous()
    args = (b["hidden"], b["weight"], b["targets"], b["old"], b["tau"])
    one = sod_loss(*args, b["adv"], b["mask"])
    two = sod_loss(*args, adv_bt, b["mask"])
    torch.testing.assert_close(one.loss, two.loss)
    n = int(b["mask"].sum())
    half = sod_loss(*args, b["adv"], b["mask"], num_tokens=2 * n)
    torch.testing.assert_close(half.loss, one.loss / 2)


def test_rows_without_steps_give_no_nan(backend):
    b = make_batch(seed=6)
    mask = b["mask"].clone()
    mask[1] = 0
    h = b["hidden"].clone().requires_grad_()
    out = sod_loss(
        h, b["weight"], b["targets"], b["old"], b["tau"].masked_fill(mask == 0, float("nan")), b["adv"], mask
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all()
    assert (h.grad[1] == 0).all()
    empty = sod_loss(h, b["weight"], b["targets"], b["old"], b["tau"], b["adv"], torch.zeros_like(mask))
    assert float(empty.loss.detach()) == 0.0


def test_bad_inputs():
    b = make_batch()
    args = [b["hidden"], b["weight"], b["targets"], b["old"], b["tau"], b["adv"], b["mask"]]
    with pytest.raises(ValueError, match="weighting"):
        sod_loss(*args, weighting="equal")
    with pytest.raises(ValueError, match="advantages"):
        sod_loss(*args[:5], b["adv"][:2], b["mask"])
    with pytest.raises(ValueError, match="teacher_logp"):
        sod_loss(*args[:4], None, *args[5:])
    with pytest.raises(ValueError, match="old_logp"):
        sod_loss(*args[:3], b["old"][:, :5], *args[4:])
    with pytest.raises(ValueError, match="targets"):
        sod_loss(args[0], args[1], b["targets"] + 1000, *args[3:])
    bad_tau = b["tau"].clone()
    bad_tau[b["mask"].bool()] = float("inf")
    with pytest.raises(ValueError, match="teacher_logp"):
        sod_loss(*args[:4], bad_tau, *args[5:])
    with pytest.raises(ValueError, match="full_kl"):
        sod_loss(*args, divergence="full_kl")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fold", ["triton", "torch"])
def test_chunked_computes_the_gradient_in_the_forward(monkeypatch, dtype, fold):
    """backend="chunked": one fused pass (3 GEMMs per tile, ragged token tiles) gives the float64 loss and
    gradients of both inputs, scaled by the loss's upstream gradient; the log-prob op is not called."""
    import sodkern.ops._chunked as chunked
    import sodkern.ops.sod_loss as sod_ops

    if fold == "triton":
        pytest.importorskip("triton")
    else:
        monkeypatch.setattr(chunked, "triton_usable", lambda *tensors: False)
    monkeypatch.setattr(chunked, "FUSED_TILE_ELEMENTS_DEFAULT", 83 * 7)  # 7-token tiles
    monkeypatch.setattr(chunked, "VOCAB_TILE", 32)
    monkeypatch.setattr(sod_ops, "linear_logprobs", None)  # the fused path must not need it
    b = make_batch(dtype=dtype, seed=6)
    h = b["hidden"].clone().requires_grad_()
    W = b["weight"].clone().requires_grad_()
    out = sod_loss(h, W, b["targets"], b["old"], b["tau"], b["adv"], b["mask"], temperature=0.9, backend="chunked")
    (2.5 * out.loss).backward()
    h64 = b["hidden"].double().requires_grad_()
    W64 = b["weight"].double().requires_grad_()
    ref, _ = ref_loss(h64, W64, b["targets"], b["old"], b["tau"], b["adv"], b["mask"], "sod", temp=0.9)
    (2.5 * ref).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=tol, atol=tol)
    for got, want in ((h.grad, h64.grad), (W.grad, W64.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol * 10, atol=tol * want.abs().max().item())
