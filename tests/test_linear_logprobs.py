"""sodkern.ops.linear_logprobs against a float64 reference that materialises the logits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sodkern.ops._torch as ops
from sodkern.ops._torch import token_chunk_size
from sodkern.ops.linear_logprobs import linear_logprobs

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib leaves tests/ off sys.path
from _linear_ref import LargestTensor, assert_grad_close  # noqa: E402

H, V, T = 70, 301, 0.7  # deliberately not multiples of any block size


def reference(hidden, weight, targets, temperature):
    """fp64 log p(target) and entropy from full logits."""
    logp_all = torch.log_softmax(hidden.double() @ weight.double().T / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def make(lead, dtype, device, seed=0, scale=1.0, h=H, v=V):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, h, generator=gen) * scale).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(dtype).to(device)
    targets = torch.randint(0, v, lead, generator=gen).to(device)
    return hidden, weight, targets


def reference_grads(hidden, weight, targets, grad, temperature, grad_entropy=None):
    """fp64 autograd gradients of ``sum(logp * grad) + sum(entropy * grad_entropy)`` (either may be None)."""
    hd = hidden.detach().double().requires_grad_()
    wd = weight.detach().double().requires_grad_()
    logp, ent = reference(hd, wd, targets, temperature)
    loss = (logp * grad.double()).sum() if grad is not None else 0.0
    if grad_entropy is not None:
        loss = loss + (ent * grad_entropy.double()).sum()
    loss.backward()
    return hd.grad, wd.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(37,), (3, 13)])
def test_matches_fp64_reference(backend, device, dtype, lead, monkeypatch):
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 4 * V)  # torch path: 4-token chunks, ragged last chunk
    hidden, weight, targets = make(lead, dtype, device)
    if len(lead) == 2:
        targets = targets.int()
    hidden.requires_grad_()
    weight.requires_grad_()
    logp, ent = linear_logprobs(hidden, weight, targets, temperature=T, return_entropy=True)
    ref_logp, ref_ent = reference(hidden.detach(), weight.detach(), targets, T)
    assert logp.shape == lead and ent.shape == lead
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(logp.double().cpu(), ref_logp.cpu(), atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double().cpu(), ref_ent.cpu(), atol=5e-5, rtol=1e-5)
    assert ent.requires_grad and logp.requires_grad

    grad = torch.randn(lead, generator=torch.Generator().manual_seed(1)).to(device)
    (logp * grad).sum().backward()
    ref_gh, ref_gw = reference_grads(hidden, weight, targets, grad, T)
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert_grad_close(hidden.grad, ref_gh, dtype)
    assert_grad_close(weight.grad, ref_gw, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outputs", ["entropy", "both"])
def test_entropy_gradient_matches_fp64(backend, device, dtype, outputs, monkeypatch):
    """The entropy is differentiable: dH/dz_j = -p_j (log p_j + H), alone or added to the log-prob gradient."""
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 4 * V)
    lead = (3, 13)
    hidden, weight, targets = make(lead, dtype, device, seed=6)
    hidden.requires_grad_()
    weight.requires_grad_()
    logp, ent = linear_logprobs(hidden, weight, targets, temperature=T, return_entropy=True)
    gen = torch.Generator().manual_seed(7)
    grad_ent = torch.randn(lead, generator=gen).to(device)
    grad = torch.randn(lead, generator=gen).to(device) if outputs == "both" else None
    loss = (ent * grad_ent).sum() + ((logp * grad).sum() if grad is not None else 0.0)
    loss.backward()
    ref_gh, ref_gw = reference_grads(hidden, weight, targets, grad, T, grad_entropy=grad_ent)
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert_grad_close(hidden.grad, ref_gh.to(device), dtype)
    assert_grad_close(weight.grad, ref_gw.to(device), dtype)


def test_entropy_gradcheck_fp64_torch_path(monkeypatch):
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 22)  # 2-token chunks
    hidden, weight, targets = make((5,), torch.float64, "cpu", seed=8, h=6, v=11)
    hidden.requires_grad_()
    weight.requires_grad_()

    def f(h, w):
        logp, ent = linear_logprobs(h, w, targets, temperature=1.3, return_entropy=True)
        return logp, ent

    assert torch.autograd.gradcheck(f, (hidden, weight))
    assert torch.autograd.gradcheck(lambda h, w: f(h, w)[1], (hidden, weight))


@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_one_input_frozen(backend, device, frozen):
    hidden, weight, targets = make((21,), torch.float32, device, seed=2)
    trainable = weight if frozen == "hidden" else hidden
    trainable.requires_grad_()
    grad = torch.randn(21, generator=torch.Generator().manual_seed(3)).to(device)
    (linear_logprobs(hidden, weight, targets, temperature=1.5) * grad).sum().backward()
    ref_gh, ref_gw = reference_grads(hidden, weight, targets, grad, 1.5)
    assert (hidden.grad is None) == (frozen == "hidden")
    assert (weight.grad is None) == (frozen == "weight")
    assert_grad_close(trainable.grad, ref_gw if frozen == "hidden" else ref_gh, torch.float32)


def test_no_grad_builds_no_graph(backend, device):
    hidden, weight, targets = make((9,), torch.float32, device)
    hidden.requires_grad_()
    with torch.no_grad():
        logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert logp.grad_fn is None and not logp.requires_grad
    ref_logp, ref_ent = reference(hidden.detach(), weight, targets, 1.0)
    torch.testing.assert_close(logp.double(), ref_logp, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=5e-5, rtol=1e-5)


def test_extreme_logits_stay_finite(backend, device):
    hidden, weight, targets = make((19,), torch.float32, device, seed=4, scale=1e4)
    hidden.requires_grad_()
    weight.requires_grad_()
    logp, ent = linear_logprobs(hidden, weight, targets, temperature=T, return_entropy=True)
    logp.sum().backward()
    for t in (logp, ent, hidden.grad, weight.grad):
        assert torch.isfinite(t).all()
    ref_logp, ref_ent = reference(hidden.detach(), weight.detach(), targets, T)
    assert (logp <= 0).all() and (ent >= -1e-3).all()
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1.0)  # |logp| ~ 1e5 here
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-3, atol=1e-2)


def test_empty_input(backend, device):
    hidden, weight, _ = make((0,), torch.float32, device)
    hidden.requires_grad_()
    targets = torch.zeros(0, dtype=torch.long, device=device)
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True)
    logp.sum().backward()
    assert logp.shape == (0,) and ent.shape == (0,) and hidden.grad.shape == (0, H)


@pytest.mark.parametrize("chunk_elements", [1 << 25, 22])  # one chunk; 2-token chunks
def test_gradcheck_fp64_torch_path(monkeypatch, chunk_elements):
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", chunk_elements)
    hidden, weight, targets = make((5,), torch.float64, "cpu", seed=5, h=6, v=11)
    hidden.requires_grad_()
    weight.requires_grad_()
    assert linear_logprobs(hidden, weight, targets).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda h, w: linear_logprobs(h, w, targets, temperature=1.3), (hidden, weight))


def test_chunk_size_logic():
    for vocab in (301, 65_536, 151_936):
        chunk = token_chunk_size(vocab)
        assert chunk * vocab <= 1 << 25 < (chunk + 1) * vocab
    assert token_chunk_size(1 << 26) == 1


@pytest.mark.parametrize("n", [40, 400])
def test_torch_path_never_holds_more_than_one_chunk(monkeypatch, n):
    monkeypatch.setenv("SODKERN_BACKEND", "torch")
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 1 << 15)
    vocab, h = 4096, 4
    hidden, weight, targets = make((n,), torch.float32, "cpu", h=h, v=vocab)
    hidden.requires_grad_()
    weight.requires_grad_()
    with LargestTensor() as mode:
        linear_logprobs(hidden, weight, targets, return_entropy=True)[0].sum().backward()
    # the largest intermediate is one [chunk, V] block (8 x 4096) whatever N is; naive would be [N, V]
    assert mode.largest == token_chunk_size(vocab) * vocab == 8 * vocab


_RSS_SCRIPT = textwrap.dedent(
    """
    import os, resource, sys
    os.environ["SODKERN_BACKEND"] = "torch"
    import torch
    import sodkern.ops._torch as helpers
    import sodkern.ops.linear_logprobs as ops
    helpers._CHUNK_ELEMENTS = 1 << 20
    torch.manual_seed(0)
    V, H = 8192, 32
    w = (torch.randn(V, H) * 0.3).requires_grad_()
    inputs = {n: (torch.randn(n, H).requires_grad_(), torch.randint(0, V, (n,))) for n in (64, 1024, 8192)}
    peak = []
    for n, (h, t) in inputs.items():  # increasing N: ru_maxrss only grows
        ops.linear_logprobs(h, w, t).sum().backward()
        peak.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(peak[1] - peak[0], peak[2] - peak[1])
    """
)


def test_torch_path_peak_rss_independent_of_n():
    """Peak RSS from N=1024 to N=8192 (V=8192) grows by far less than the [N, V] fp32 logits would."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    _, growth = (int(x) for x in out.stdout.split())
    logits_growth = (8192 - 1024) * 8192 * 4  # 235 MB
    assert growth < logits_growth / 8, f"peak RSS grew by {growth / 2**20:.1f} MiB from N=1024 to N=8192"


def _bad(**changes):
    hidden, weight, targets = make((4,), torch.float32, "cpu", h=6, v=11)
    args = {"hidden": hidden, "weight": weight, "targets": targets, "temperature": 1.0} | changes
    return args


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (_bad(hidden=torch.ones(4, 6, dtype=torch.long)), "hidden"),
        (_bad(weight=torch.ones(11, 6, dtype=torch.long)), "weight"),
        (_bad(hidden=torch.randn(4, 7)), "hidden"),
        (_bad(weight=torch.randn(11 * 6)), "weight"),
        (_bad(weight=torch.randn(11, 6, dtype=torch.float64)), "weight"),
        (_bad(targets=torch.zeros(5, dtype=torch.long)), "targets"),
        (_bad(targets=torch.zeros(4)), "targets"),
        (_bad(targets=torch.tensor([0, 1, 11, 2])), "targets"),
        (_bad(targets=torch.tensor([0, -1, 1, 2])), "targets"),
        (_bad(temperature=0.0), "temperature"),
        (_bad(temperature=float("nan")), "temperature"),
    ],
)
def test_bad_inputs_name_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        linear_logprobs(args["hidden"], args["weight"], args["targets"], temperature=args["temperature"])


def test_gradcheck_fp64_chunked(monkeypatch):
    """The chunked loop in float64 (torch folds), over ragged token and vocabulary tiles, logp and entropy."""
    import sodkern.ops._chunked as chunked

    monkeypatch.setattr(chunked, "TOKEN_TILE_DEFAULT", 2)
    monkeypatch.setattr(chunked, "VOCAB_TILE", 4)
    hidden, weight, targets = make((5,), torch.float64, "cpu", seed=9, h=6, v=11)
    hidden.requires_grad_()
    weight.requires_grad_()

    def f(h, w):
        return linear_logprobs(h, w, targets, temperature=1.3, return_entropy=True, backend="chunked")

    assert f(hidden, weight)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(f, (hidden, weight))
