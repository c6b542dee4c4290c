"""verl's fused-kernel model forward served by sodkern equals verl's materialised path (verl issue #2656).

``forward_with_triton_backend`` (what ``use_fused_kernels=true`` + ``impl_backend=triton`` installs as the model's
forward) on a tiny random Qwen3, against the model's logits through verl's ``logprobs_from_logits`` /
``entropy_from_logits``: log-probs, entropy and the parameter gradients of both, on both sodkern backends.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
import verl.utils.kernel.linear_cross_entropy as lce  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from verl.models.transformers.dense_common import forward_with_triton_backend  # noqa: E402
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits  # noqa: E402

from sodkern.integrations.verl.fused_head import linear_cross_entropy  # noqa: E402

TEMPERATURE = 0.7


def tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=211,  # not a multiple of any block size
        hidden_size=40,  # verl's own kernel needs a multiple of 128; sodkern does not
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=10,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).float()
    with torch.no_grad():  # a random head large enough that the entropy is far from log V
        model.lm_head.weight.mul_(20)
    return model


def fused(model, ids):
    out = forward_with_triton_backend(model, input_ids=ids, return_dict=True, temperature=TEMPERATURE)
    return out.log_probs, out.entropy


def materialised(model, ids):
    logits = model(input_ids=ids).logits.div(TEMPERATURE).reshape(-1, model.config.vocab_size)
    labels = torch.roll(ids, shifts=-1, dims=-1).reshape(-1)
    return logprobs_from_logits(logits, labels), entropy_from_logits(logits)


def grads(model, out: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (out * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_forward_equals_materialised(backend, monkeypatch):
    monkeypatch.setattr(lce, "linear_cross_entropy", linear_cross_entropy)  # what the plugin installs
    model = tiny_qwen3()
    ids = torch.randint(0, model.config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(1))
    n = ids.numel()
    g = torch.Generator().manual_seed(2)
    w_logp, w_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)

    logp, ent = fused(model, ids)
    ref_logp, ref_ent = materialised(model, ids)
    assert logp.shape == ent.shape == (n,) and logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=2e-5)
    assert ent.requires_grad, "the entropy must carry a gradient (verl's entropy bonus backpropagates through it)"

    for idx, (weights, name) in enumerate(((w_logp, "log-prob"), (w_ent, "entropy"))):
        got = grads(model, fused(model, ids)[idx], weights)
        want = grads(model, materialised(model, ids)[idx], weights)
        assert got.keys() == want.keys() and "lm_head.weight" in got
        for key in want:
            scale = want[key].abs().max().clamp_min(1e-6)
            err = ((got[key] - want[key]).abs().max() / scale).item()
            assert err < 1e-4, f"{name} gradient of {key}: relative max error {err:.2e}"


def test_reductions_and_errors():
    torch.manual_seed(0)
    h, w = torch.randn(2, 5, 8), torch.randn(17, 8)
    labels = torch.randint(0, 17, (2, 5))
    logp, ent = linear_cross_entropy(h, w, labels, 1.0, "none")
    assert logp.shape == ent.shape == (10,)
    torch.testing.assert_close(linear_cross_entropy(h, w, labels, 1.0, "sum")[0], logp.sum())
    torch.testing.assert_close(linear_cross_entropy(h, w, labels, 1.0, "mean")[0], logp.mean())
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, labels, 1.0, "max")


def test_plugin_serves_the_kernel_only_when_asked():
    if os.environ.get("SODKERN_VERL_FUSED_KERNEL", "0") in ("", "0"):  # this process imported verl without it
        assert lce.linear_cross_entropy is not linear_cross_entropy
    env = {**os.environ, "SODKERN_VERL_FUSED_KERNEL": "1"}
    code = "import verl.utils.kernel.linear_cross_entropy as m; print(m.linear_cross_entropy.__module__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "sodkern.integrations.verl.fused_head"
