"""Strategy selection: the per-call ``backend=`` argument, ``SODKERN_BACKEND``, and ``auto``."""

from __future__ import annotations

import pytest
import torch

import sodkern
import sodkern.ops._chunked as chunked
from sodkern._backend import select_strategy


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("SODKERN_BACKEND", raising=False)
    assert select_strategy(torch.ones(2)) == "torch"
    assert select_strategy(torch.ones(2), backend="auto") == "torch"


def test_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv("SODKERN_BACKEND", "torch")
    assert select_strategy(torch.ones(2), backend="chunked") == "chunked"
    assert select_strategy(torch.ones(2)) == "torch"
    monkeypatch.setenv("SODKERN_BACKEND", "triton")  # old name of the tile kernels
    assert select_strategy(torch.ones(2)) == "tiled"


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_bad_name_names_its_source(monkeypatch, source):
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    if source == "argument":
        with pytest.raises(ValueError, match="backend must be 'auto', 'chunked', 'tiled' or 'torch'"):
            sodkern.linear_logprobs(h, w, y, backend="cuda")
    else:
        monkeypatch.setenv("SODKERN_BACKEND", "fast")
        with pytest.raises(ValueError, match="SODKERN_BACKEND must be"):
            sodkern.linear_logprobs(h, w, y)


def test_every_backend_per_call_gives_the_same_numbers(monkeypatch):
    """Each backend= value runs its own strategy (the chunked loop is entered only for "chunked")."""
    monkeypatch.setenv("SODKERN_BACKEND", "torch")
    calls = []
    real = chunked.logprobs_fwd
    monkeypatch.setattr(chunked, "logprobs_fwd", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(11, 11, generator=gen), torch.randn(37, 11, generator=gen) * 0.3
    y = torch.randint(0, 37, (11,), generator=gen)
    out = {b: sodkern.linear_logprobs(h, w, y, backend=b) for b in ("auto", "chunked", "tiled", "torch")}
    assert len(calls) == 1
    for b in ("chunked", "tiled", "torch"):
        torch.testing.assert_close(out[b], out["auto"], atol=1e-5, rtol=1e-5)
    kls = [sodkern.linear_reverse_kl(h, w, h, w * 0.9, backend=b) for b in ("auto", "chunked", "tiled", "torch")]
    for kl in kls[1:]:
        torch.testing.assert_close(kl, kls[0], atol=1e-5, rtol=1e-5)
