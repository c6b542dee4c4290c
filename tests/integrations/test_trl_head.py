"""use_sodkern_head(): TRL's fused LM head served by sodkern, against TRL's own kernel and in a GRPO run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

import trl.trainer.utils as trl_utils  # noqa: E402
from trl.kernels import ChunkedLogProbFunction  # noqa: E402

from sodkern.integrations.trl import (  # noqa: E402
    SodkernLogProbFunction,
    sodkern_head_active,
    use_sodkern_head,
    use_trl_head,
)


@pytest.fixture(autouse=True)
def trl_head_after():
    yield
    use_trl_head()


def head_inputs(n=37, h=24, v=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_apply_matches_trl_kernel_with_entropy_gradient(temperature):
    outs, grads = [], []
    g = torch.Generator().manual_seed(1)
    up_logp, up_ent = torch.randn(37, generator=g), torch.randn(37, generator=g)
    for fn in (ChunkedLogProbFunction, SodkernLogProbFunction):
        hidden, weight, targets = head_inputs()
        logp, ent, *rest = fn.apply(hidden, weight, None, targets, temperature, 128, None, 1.0, ("entropy",))
        assert all(x is None for x in rest)
        ((logp * up_logp).sum() + (ent * up_ent).sum()).backward()
        outs.append((logp.detach(), ent.detach()))
        grads.append((hidden.grad, weight.grad))
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1]):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)


def test_apply_without_entropy_and_fallback_for_extra_outputs():
    hidden, weight, targets = head_inputs()
    logp, ent, *_ = SodkernLogProbFunction.apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, ())
    assert ent is None
    ref = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, ())[0]
    torch.testing.assert_close(logp, ref, atol=2e-5, rtol=1e-5)
    # outputs sodkern does not compute, and a bias, go to TRL's kernel unchanged
    extra = SodkernLogProbFunction.apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, ("is_top1",))
    assert extra[4] is not None
    bias = torch.randn(weight.shape[0])
    with_bias = SodkernLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 128, None, 1.0, ())[0]
    ref = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 128, None, 1.0, ())[0]
    torch.testing.assert_close(with_bias, ref)


def test_use_sodkern_head_is_idempotent_and_undoable():
    original = trl_utils._ChunkedLogProbFunction
    assert not sodkern_head_active()
    use_sodkern_head()
    use_sodkern_head()
    assert trl_utils._ChunkedLogProbFunction is SodkernLogProbFunction and sodkern_head_active()
    use_trl_head()
    assert trl_utils._ChunkedLogProbFunction is original and not sodkern_head_active()
    use_trl_head()  # a no-op now
    assert trl_utils._ChunkedLogProbFunction is original


def grpo_run(tmp_path, tok, sodkern: bool):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from sodkern.trainer.demo.tiny import tiny_qwen3

    if sodkern:
        use_sodkern_head()
    else:
        use_trl_head()
    data = Dataset.from_list([{"prompt": "Let x be the number of apples.", "answer": "5"}] * 8)
    args = GRPOConfig(
        output_dir=str(tmp_path / ("sodkern" if sodkern else "trl")),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        max_steps=3,
        learning_rate=1e-2,
        entropy_coef=0.05,  # the entropy bonus: its gradient goes through the head too
        report_to="none",
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )

    def length_reward(completions, **kwargs):
        return [float(len(c)) / 10 for c in completions]

    trainer = GRPOTrainer(
        model=tiny_qwen3(tok, seed=0), reward_funcs=length_reward, args=args, train_dataset=data, processing_class=tok
    )
    calls = []
    if sodkern:
        inner = SodkernLogProbFunction.apply

        class Counting(SodkernLogProbFunction):
            @staticmethod
            def apply(*a, **k):
                calls.append(1)
                return inner(*a, **k)

        trl_utils._ChunkedLogProbFunction = Counting
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [(h["loss"], h["grad_norm"], h["entropy"]) for h in logs], calls


def test_grpo_run_with_sodkern_head_matches_trl_head(tmp_path, tiny_tok):
    trl_logs, _ = grpo_run(tmp_path, tiny_tok, sodkern=False)
    sk_logs, calls = grpo_run(tmp_path, tiny_tok, sodkern=True)
    assert calls, "sodkern's head was not called"
    assert len(trl_logs) == len(sk_logs) == 3
    assert any(abs(g) > 0 for _, g, _ in trl_logs)
    for (l1, g1, e1), (l2, g2, e2) in zip(trl_logs, sk_logs):
        assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-6)
        assert g2 == pytest.approx(g1, rel=1e-4, abs=1e-6)
        assert e2 == pytest.approx(e1, rel=1e-5)
