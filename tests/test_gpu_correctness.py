"""GPU correctness: every sodkern kernel compiled for CUDA, against float64 references (skipped without CUDA).

Each test runs for both CUDA strategies ("tiled" and "chunked"); the sod_loss test also compares the chunked
strategy's gradient-in-the-forward path against the torch path.

Run on a GPU machine with ``pytest -q tests/test_gpu_correctness.py``. The last test crosses 2^31 elements of
the virtual ``[N, V]`` logits (Qwen3's vocabulary at N = 20,480) to check the kernels' int64 offsets.
"""

import pytest
import torch

import sodkern
from sodkern.reference import reference_stepwise_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True, params=["tiled", "chunked"])
def strategy(request, monkeypatch):
    """Every test runs once per CUDA strategy: the all-Triton tile kernels and cuBLAS tiles + Triton folds."""
    monkeypatch.setenv("SODKERN_BACKEND", request.param)
    return request.param


def _inputs(N, H, V, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, H, device="cuda", generator=g).to(dtype)
    w = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).to(dtype)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    return h, w, y


def _ref_logp(h, w, y, temperature):
    logits = (h.double() @ w.double().T) / temperature
    lsm = torch.log_softmax(logits, -1)
    return lsm.gather(-1, y[:, None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("N,H,V", [(1000, 512, 32003), (77, 1024, 151936)])
def test_linear_logprobs_cuda(dtype, tol, N, H, V):
    h, w, y = _inputs(N, H, V, dtype)
    h.requires_grad_()
    w.requires_grad_()
    logp, ent = sodkern.linear_logprobs(h, w, y, temperature=0.8, return_entropy=True)
    g, g_ent = torch.randn_like(logp), torch.randn_like(ent)  # the entropy is differentiable too
    (logp * g + ent * g_ent).sum().backward()
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref, ref_ent = _ref_logp(h64, w64, y, 0.8)
    (ref * g.double() + ref_ent * g_ent.double()).sum().backward()
    torch.testing.assert_close(logp.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_linear_reverse_kl_cuda(dtype, tol):
    hs, ws, _ = _inputs(300, 256, 20011, dtype, seed=1)
    ht, wt, _ = _inputs(300, 384, 20011, dtype, seed=2)
    hs.requires_grad_()
    kl = sodkern.linear_reverse_kl(hs, ws, ht, wt, temperature=1.1)
    kl.sum().backward()
    h64 = hs.detach().double().requires_grad_()
    lps = torch.log_softmax(h64 @ ws.double().T / 1.1, -1)
    lpt = torch.log_softmax(ht.double() @ wt.double().T / 1.1, -1)
    ref = (lps.exp() * (lps - lpt)).sum(-1)
    ref.sum().backward()
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(hs.grad.double(), h64.grad, rtol=tol, atol=tol)


def test_stepwise_weights_cuda():
    g = torch.Generator().manual_seed(0)
    B, T = 16, 5000
    mask = (torch.rand(B, T, generator=g) < 0.8) & (torch.rand(B, T, generator=g).cumsum(1) % 50 > 5)
    s = -torch.rand(B, T, generator=g) * 3
    tau = -torch.rand(B, T, generator=g) * 3
    out = sodkern.stepwise_weights(s.cuda(), tau.cuda(), mask.cuda())
    ref = reference_stepwise_weights(s[:4], tau[:4], mask[:4])
    torch.testing.assert_close(out.token_weights[:4].cpu(), ref, rtol=1e-5, atol=1e-6)
    cpu = sodkern.stepwise_weights(s, tau, mask)  # torch path on CPU
    torch.testing.assert_close(out.token_weights.cpu(), cpu.token_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.step_weights.cpu(), cpu.step_weights, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_sod_loss_cuda_matches_torch_path(monkeypatch):
    B, T, H, V = 4, 300, 256, 32003
    h, w, y = _inputs(B * T, H, V, torch.bfloat16, seed=3)
    h = h.view(B, T, H).requires_grad_()
    y = y.view(B, T)
    mask = torch.zeros(B, T, device="cuda")
    mask[:, 20:120] = 1
    mask[:, 150:290] = 1
    old = -torch.rand(B, T, device="cuda")
    tau = -torch.rand(B, T, device="cuda")
    adv = torch.randn(B, device="cuda")
    out = sodkern.sod_loss(h, w, y, old, tau, adv, mask)
    out.loss.backward()
    monkeypatch.setenv("SODKERN_BACKEND", "torch")
    h2 = h.detach().clone().requires_grad_()
    ref = sodkern.sod_loss(h2, w, y, old, tau, adv, mask)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(h.grad.float(), h2.grad.float(), rtol=5e-2, atol=5e-3)


def test_int64_offsets_beyond_2_31():
    N, H, V = 20480, 128, 151936  # N * V = 3.1e9 > 2^31
    h, w, y = _inputs(N, H, V, torch.bfloat16, seed=4)
    logp = sodkern.linear_logprobs(h, w, y)
    idx = torch.tensor([0, N // 2, N - 1], device="cuda")
    ref, _ = _ref_logp(h[idx], w, y[idx], 1.0)
    torch.testing.assert_close(logp[idx].double(), ref, rtol=2e-2, atol=2e-2)
