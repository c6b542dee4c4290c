"""pytest-benchmark versions of the bench cases at small CPU sizes (``pytest bench/``, well under a minute).

Each case first checks its output (and, for fwd+bwd, its input gradients) against the float64 reference, then
is timed. A peer that is not installed is skipped with its install hint; one that rejects CPU tensors is
skipped with its error (``bench/run.py`` reports both as rows).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import OPS, require  # noqa: E402
from measure import _call, _detached, max_error  # noqa: E402

SMALL = {
    "logprobs": {"N": 256, "H": 64, "V": 4096},
    "reverse_kl": {"N": 128, "Hs": 64, "Ht": 96, "V": 4096},
    "sod_loss": {"B": 2, "T": 256, "H": 64, "V": 4096},
    "step_weights": {"B": 8, "T": 1024},
}
# float32 against float64: the log-softmax over 4K logits and its gradients stay well inside these
TOL = {"logprobs": 1e-4, "reverse_kl": 1e-4, "sod_loss": 1e-5, "step_weights": 1e-5}

CASES = [
    pytest.param(op.name, impl.name, backward, id=f"{op.name}-{impl.name.replace(' ', '_')}-{mode}")
    for op in OPS.values()
    for backward, mode in ((False, "fwd"), (True, "fwd+bwd"))[: 2 if op.grad_names else 1]
    for impl in op.impls
]


@pytest.mark.parametrize(("op_name", "impl_name", "backward"), CASES)
def test_case(benchmark, op_name: str, impl_name: str, backward: bool) -> None:
    op = OPS[op_name]
    impl = next(i for i in op.impls if i.name == impl_name)
    try:
        require(impl)
    except ImportError as e:
        pytest.skip(f"{impl.name} not installed ({e}): {impl.install}")
    inp = op.make_inputs(SMALL[op_name], "cpu", torch.float32, 0)
    try:
        err = max_error(op, impl, inp, backward)
    except (RuntimeError, NotImplementedError, AssertionError, ValueError) as e:
        if impl.module.startswith("sodkern") and "(tiled)" not in impl.name:
            raise
        pytest.skip(f"{impl.name} does not run on CPU: {type(e).__name__}: {e}")
    assert err < TOL[op_name], f"{impl.name}: max error {err:.3g} to the float64 reference"

    run = _detached(inp, op.grad_names if backward else ())
    unit = _call(impl.build(run), run, backward)
    grads = [run[k] for k in (op.grad_names if backward else ())]

    def setup():
        for t in grads:
            t.grad = None

    benchmark.group = f"{op_name} {'fwd+bwd' if backward else 'fwd'}"
    benchmark.pedantic(unit, setup=setup, rounds=3, warmup_rounds=1)
