"""``import sodkern`` and the four ops work where Triton is not installed (the CPU torch path)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, os, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("triton is blocked for this test")
            return None

    BLOCK = sys.argv[1] == "blocked"
    if BLOCK:
        sys.meta_path.insert(0, NoTriton())
    import torch
    import sodkern

    assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "triton was imported"
    torch.manual_seed(0)
    B, T, H, V = 2, 7, 8, 19
    h = torch.randn(B, T, H, requires_grad=True)
    w = (torch.randn(V, H) * 0.3).requires_grad_()
    y = torch.randint(0, V, (B, T))
    logp, ent = sodkern.linear_logprobs(h, w, y, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    kl = sodkern.linear_reverse_kl(h, w, torch.randn(B, T, 5), torch.randn(V, 5))
    kl.sum().backward()
    mask = torch.ones(B, T)
    mask[:, :2] = 0
    mask[:, 4] = 0
    old = logp.detach()
    tau = old + 0.1 * torch.randn(B, T)
    steps = sodkern.stepwise_weights(old, tau, mask)
    out = sodkern.sod_loss(h, w, y, old, tau, torch.randn(B), mask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and int(steps.num_steps.sum()) == 4
    if BLOCK:
        assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "triton was imported"
    print("ok")
    """
)


@pytest.mark.parametrize(("triton", "backend"), [("blocked", "auto"), ("blocked", "chunked"), ("installed", "chunked")])
def test_ops_run_without_triton(triton, backend):
    """Triton not importable (auto and chunked), or installed but unusable (CPU tensors, no interpreter):
    the four ops run on their torch paths ("chunked" folds with torch)."""
    if triton == "installed":
        pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("SODKERN_BACKEND", "TRITON_INTERPRET")}
    env["SODKERN_BACKEND"] = backend
    out = subprocess.run([sys.executable, "-c", _SCRIPT, triton], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
