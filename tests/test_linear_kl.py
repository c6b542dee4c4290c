"""sodkern.ops.linear_kl against a float64 reference that materialises both models' logits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import sodkern.ops._torch as logprob_ops
from sodkern.ops._torch import token_chunk_size
from sodkern.ops.linear_kl import linear_reverse_kl

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib leaves tests/ off sys.path
from _linear_ref import LargestTensor, assert_grad_close  # noqa: E402

HS, HT, V, T = 70, 45, 301, 0.7  # teacher hidden size differs; nothing is a multiple of a block size


def reference(sh, sw, th, tw, temperature):
    """fp64 KL(p_s || p_t) per token from full logits."""
    log_ps = torch.log_softmax(sh.double() @ sw.double().T / temperature, dim=-1)
    log_pt = torch.log_softmax(th.double() @ tw.double().T / temperature, dim=-1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1)


def make(lead, dtype, device, seed=0, scale=1.0, hs=HS, ht=HT, v=V):
    gen = torch.Generator().manual_seed(seed)
    sh = (torch.randn(*lead, hs, generator=gen) * scale).to(dtype).to(device)
    sw = (torch.randn(v, hs, generator=gen) * 0.3).to(dtype).to(device)
    th = (torch.randn(*lead, ht, generator=gen) * scale).to(dtype).to(device)
    tw = (torch.randn(v, ht, generator=gen) * 0.3).to(dtype).to(device)
    return sh, sw, th, tw


def reference_grads(sh, sw, th, tw, grad, temperature):
    shd = sh.detach().double().requires_grad_()
    swd = sw.detach().double().requires_grad_()
    (reference(shd, swd, th, tw, temperature) * grad.double()).sum().backward()
    return shd.grad, swd.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(37,), (3, 13)])
def test_matches_fp64_reference(backend, device, dtype, lead, monkeypatch):
    monkeypatch.setattr(logprob_ops, "_CHUNK_ELEMENTS", 4 * V)  # torch path: 4-token chunks, ragged last
    sh, sw, th, tw = make(lead, dtype, device)
    sh.requires_grad_()
    sw.requires_grad_()
    th.requires_grad_()  # the teacher is a constant: it must get no gradient
    kl = linear_reverse_kl(sh, sw, th, tw, temperature=T)
    assert kl.shape == lead and kl.dtype == torch.float32
    torch.testing.assert_close(
        kl.double(), reference(sh.detach(), sw.detach(), th.detach(), tw, T), atol=5e-5, rtol=1e-5
    )

    grad = torch.randn(lead, generator=torch.Generator().manual_seed(1)).to(device)
    (kl * grad).sum().backward()
    ref_gh, ref_gw = reference_grads(sh, sw, th.detach(), tw, grad, T)
    assert sh.grad.dtype == dtype and sw.grad.dtype == dtype and th.grad is None
    assert_grad_close(sh.grad, ref_gh, dtype)
    assert_grad_close(sw.grad, ref_gw, dtype)


def test_mixed_precision_teacher(backend, device):
    sh, sw, _, _ = make((23,), torch.float32, device, seed=6)
    _, _, th, tw = make((23,), torch.bfloat16, device, seed=7)
    sh.requires_grad_()
    kl = linear_reverse_kl(sh, sw, th, tw, temperature=1.2)
    torch.testing.assert_close(kl.double(), reference(sh.detach(), sw, th, tw, 1.2), atol=5e-5, rtol=1e-5)
    kl.sum().backward()
    assert_grad_close(sh.grad, reference_grads(sh, sw, th, tw, torch.ones(23), 1.2)[0], torch.float32)


def test_identical_models_give_zero(backend, device):
    sh, sw, _, _ = make((17,), torch.float32, device, seed=2, hs=40, ht=40)
    sh.requires_grad_()
    sw.requires_grad_()
    kl = linear_reverse_kl(sh, sw, sh.detach() * 1.0, sw.detach() * 1.0)
    kl.sum().backward()
    assert kl.abs().max() < 1e-6
    assert sh.grad.abs().max() < 1e-5 and sw.grad.abs().max() < 1e-5


def test_common_logit_offset_gives_zero(backend, device):
    """A constant added to every teacher logit leaves the KL at 0 (no catastrophic cancellation)."""
    sh, sw, _, _ = make((17,), torch.float32, device, seed=3, hs=40, ht=40)
    th = torch.cat([sh, torch.full_like(sh[:, :1], 1e4)], dim=1)  # z_t = z_s + 1e4
    tw = torch.cat([sw, torch.ones_like(sw[:, :1])], dim=1)
    assert linear_reverse_kl(sh, sw, th, tw).abs().max() < 1e-4


def test_no_grad_builds_no_graph(backend, device):
    sh, sw, th, tw = make((9,), torch.float32, device)
    sw.requires_grad_()
    with torch.no_grad():
        kl = linear_reverse_kl(sh, sw, th, tw)
    assert kl.grad_fn is None and not kl.requires_grad
    torch.testing.assert_close(kl.double(), reference(sh, sw.detach(), th, tw, 1.0), atol=5e-5, rtol=1e-5)


def test_extreme_logits_stay_finite(backend, device):
    sh, sw, th, tw = make((19,), torch.float32, device, seed=4, scale=1e4)
    sh.requires_grad_()
    sw.requires_grad_()
    kl = linear_reverse_kl(sh, sw, th, tw, temperature=T)
    kl.sum().backward()
    for t in (kl, sh.grad, sw.grad):
        assert torch.isfinite(t).all()
    ref = reference(sh.detach(), sw.detach(), th, tw, T)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-4, atol=1.0)  # KL ~ 1e5 here


def test_empty_input(backend, device):
    sh, sw, th, tw = make((0,), torch.float32, device)
    sh.requires_grad_()
    kl = linear_reverse_kl(sh, sw, th, tw)
    kl.sum().backward()
    assert kl.shape == (0,) and sh.grad.shape == (0, HS)


@pytest.mark.parametrize("chunk_elements", [1 << 25, 22])  # one chunk; 2-token chunks
def test_gradcheck_fp64_torch_path(monkeypatch, chunk_elements):
    monkeypatch.setattr(logprob_ops, "_CHUNK_ELEMENTS", chunk_elements)
    sh, sw, th, tw = make((5,), torch.float64, "cpu", seed=5, hs=6, ht=4, v=11)
    sh.requires_grad_()
    sw.requires_grad_()
    assert linear_reverse_kl(sh, sw, th, tw).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda h, w: linear_reverse_kl(h, w, th, tw, temperature=1.3), (sh, sw))


@pytest.mark.parametrize("n", [40, 400])
def test_torch_path_never_holds_more_than_one_chunk(monkeypatch, n):
    monkeypatch.setenv("SODKERN_BACKEND", "torch")
    monkeypatch.setattr(logprob_ops, "_CHUNK_ELEMENTS", 1 << 15)
    sh, sw, th, tw = make((n,), torch.float32, "cpu", hs=4, ht=3, v=4096)
    sh.requires_grad_()
    sw.requires_grad_()
    with LargestTensor() as mode:
        linear_reverse_kl(sh, sw, th, tw).sum().backward()
    assert mode.largest == token_chunk_size(4096) * 4096 == 8 * 4096  # one [chunk, V] block; naive [N, V]


def _bad(**changes):
    sh, sw, th, tw = make((4,), torch.float32, "cpu", hs=6, ht=5, v=11)
    base = {"student_hidden": sh, "student_weight": sw, "teacher_hidden": th, "teacher_weight": tw}
    return base | changes


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (_bad(student_hidden=torch.ones(4, 6, dtype=torch.long)), "student_hidden"),
        (_bad(teacher_weight=torch.ones(11, 5, dtype=torch.int32)), "teacher_weight"),
        (_bad(student_hidden=torch.randn(4, 5)), "student_hidden"),
        (_bad(teacher_hidden=torch.randn(4, 6)), "teacher_hidden"),
        (_bad(teacher_hidden=torch.randn(3, 5)), "teacher_hidden"),
        (_bad(teacher_weight=torch.randn(12, 5)), "teacher_weight"),
        (_bad(student_weight=torch.randn(11, 6, dtype=torch.float64)), "student_weight"),
        (_bad(teacher_weight=torch.randn(11, 5, dtype=torch.bfloat16)), "teacher_weight"),
    ],
)
def test_bad_inputs_name_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        linear_reverse_kl(**args)


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        linear_reverse_kl(*_bad().values(), temperature=-1.0)
