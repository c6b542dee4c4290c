"""SODTrainer on real TRL 1.16: tool calls run in sodkern's sandbox through TRL's tool loop, and the advantages
and loss the trainer uses match independent computations."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402

from sodkern.integrations.trl import SODConfig, SODTrainer, code_interpreter_tool, math_reward_func  # noqa: E402

PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]  # the prompt the tiny student was taught (conftest.py)


def dataset(n: int = 8):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": PROMPT, "ground_truth": "4"}] * n)


def config(tmp_path, **overrides) -> SODConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=64,
        max_steps=2,
        learning_rate=1e-4,
        report_to="none",
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    return SODConfig(**{**base, **overrides})


class Recording(SODTrainer):
    """Keeps each micro-batch's inputs, the loss output, and float64 full-logit log-probs of both models."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def _compute_loss(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        ref = {name: full_logps(m, ids, attn, inputs["completion_ids"]) for name, m in self._models().items()}
        loss = super()._compute_loss(model, inputs)
        self.records.append((dict(inputs), self.last_loss_output, ref, loss.detach()))
        return loss

    def _models(self):
        models = {"student": self.accelerator.unwrap_model(self.model)}
        if self.teacher_model is not None:
            models["teacher"] = self.accelerator.unwrap_model(self.teacher_model)
        return models


@torch.no_grad()
def full_logps(model, ids, attn, completion_ids) -> torch.Tensor:
    """``[B, T]`` float64 log-probs of the completion tokens from the model's materialised logits."""
    logits = model(input_ids=ids, attention_mask=attn).logits.double()
    T = completion_ids.shape[1]
    logp = logits[:, :-1][:, -T:].log_softmax(-1)
    return logp.gather(-1, completion_ids[..., None]).squeeze(-1)


def sod_reference(s, tau, mask, a_grpo, *, eps=1e-6, delta=0.2, c=1.0):
    """README: The algorithm in float64 Python loops: steps, d_k, w_k and ``A_t = A_grpo + c * w_k * (tau - s) * m``."""
    B, T = mask.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    w_all = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        runs, t = [], 0
        while t < T:
            if mask[b, t]:
                start = t
                while t < T and mask[b, t]:
                    t += 1
                runs.append((start, t))
            else:
                t += 1
        d = [sum(abs(float(s[b, i]) - float(tau[b, i])) for i in range(a, e)) / (e - a) for a, e in runs]
        for k, (a, e) in enumerate(runs):
            w = 1.0 if k == 0 else min((d[0] + eps) / (d[k] + eps), 1.0 + delta)
            for i in range(a, e):
                w_all[b, i] = w
                adv[b, i] = float(a_grpo[b]) + c * w * (float(tau[b, i]) - float(s[b, i]))
    return adv, w_all


class CountingSandbox:
    """sodkern's LocalSandbox, recording what it ran (to see TRL's tool loop reach the sandbox)."""

    def __init__(self, box):
        self.box, self.ran = box, []

    def run(self, code: str, stdin: str | None = None):
        result = self.box.run(code, stdin)
        self.ran.append((code, result.stdout))
        return result


def run(tmp_path, make_models, sandbox, tokenizer, **overrides):
    student, teacher = make_models()
    counting = CountingSandbox(sandbox)
    calls = counting.ran
    trainer = Recording(
        model=student,
        teacher_model=teacher,
        reward_funcs=math_reward_func(),
        args=config(tmp_path, **overrides),
        train_dataset=dataset(),
        processing_class=tokenizer,
        tools=[code_interpreter_tool(counting)],
    )
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    return trainer, calls, before


@pytest.fixture(scope="module")
def sod_run(tmp_path_factory, make_models, sandbox, tiny_tok):
    """One 2-step SOD run shared by the tests below (they only read it or restore what they change)."""
    return run(tmp_path_factory.mktemp("sod"), make_models, sandbox, tiny_tok)


def test_sod_trainer_runs_tools_in_sandbox_and_trains(sod_run):
    trainer, calls, before = sod_run
    # TRL's tool loop called the sandboxed interpreter, which really ran the code.
    assert calls, "the student made no tool call"
    assert any(out.strip() in ("4", "5") for code, out in calls if code in ("print(2 + 2)", "print(2 + 3)")), calls
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert any(h["tools/call_frequency"] > 0 for h in logs)
    assert all(math.isfinite(h["loss"]) for h in logs)
    for key in ("sod/mean_token_weight", "sod/mean_step_divergence", "sod/frac_stable", "sod/frac_recovery"):
        assert all(key in h for h in logs), key
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"
    # tool-result tokens are outside the loss mask, so some trajectory has several steps
    assert any((r[0]["tool_mask"] == 0).any() for r in trainer.records)


def test_sod_advantages_match_float64_reference(sod_run):
    trainer, _, _ = sod_run
    assert trainer.records
    for inputs, out, ref, loss in trainer.records:
        mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
        s, tau = inputs["old_per_token_logps"].double(), inputs["teacher_logps"].double()
        # s and tau are the log-probs of the sampled tokens (float64 full-logit recomputation)
        for got, name in ((s, "student"), (tau, "teacher")):
            want = torch.where(mask, ref[name], 0.0)
            torch.testing.assert_close(torch.where(mask, got, 0.0), want, atol=2e-5, rtol=0, msg=name)
        adv, w = sod_reference(ref["student"], ref["teacher"], mask, inputs["advantages"].double())
        torch.testing.assert_close(out.advantages.double(), adv, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.token_weights.double(), w, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(loss)


def test_uniform_differs_from_sod_only_by_weights(sod_run):
    trainer, _, _ = sod_run
    inputs = trainer.records[0][0]
    model = trainer.model
    outs = {}
    for weighting in ("sod", "uniform"):
        trainer.args.weighting = weighting
        loss = SODTrainer._compute_loss(trainer, model, inputs)
        outs[weighting] = (loss.detach(), trainer.last_loss_output)
    trainer.args.weighting = "sod"
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
    s, tau, a = inputs["old_per_token_logps"], inputs["teacher_logps"], inputs["advantages"][:, None]
    sod, uni = outs["sod"][1], outs["uniform"][1]
    torch.testing.assert_close(uni.token_weights, mask.float())
    for o in (sod, uni):  # the same formula, only w differs
        torch.testing.assert_close(o.advantages, torch.where(mask, a + o.token_weights * (tau - s), 0.0))
    torch.testing.assert_close(sod.logp, uni.logp)
    assert not torch.equal(sod.token_weights, uni.token_weights), "SOD weights all 1 on this batch"


def test_none_equals_trl_grpo_loss_per_token(sod_run):
    trainer, _, _ = sod_run
    inputs = dict(trainer.records[0][0])
    g = torch.Generator().manual_seed(0)
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    # move the ratios off 1 and give both advantage signs, so the clip and the dual clip both act
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"] + 0.8 * torch.randn(mask.shape, generator=g)
    inputs["advantages"] = torch.tensor([1.5, -2.0, 0.7, -0.4])
    trainer.args.weighting = "none"
    model = trainer.model
    try:
        total = (SODTrainer._compute_loss(trainer, model, inputs), GRPOTrainer._compute_loss(trainer, model, inputs))
        torch.testing.assert_close(total[0], total[1], atol=1e-6, rtol=1e-5)
        positions = mask.nonzero().tolist()
        for b, t in positions[:: max(1, len(positions) // 20)]:
            one = dict(inputs)
            one["tool_mask"] = torch.zeros_like(mask)
            one["tool_mask"][b, t] = 1
            ours = SODTrainer._compute_loss(trainer, model, one)
            trl_loss = GRPOTrainer._compute_loss(trainer, model, one)
            torch.testing.assert_close(ours, trl_loss, atol=1e-6, rtol=1e-5, msg=f"token ({b}, {t})")
    finally:
        trainer.args.weighting = "sod"


def test_teacher_with_another_vocabulary_is_refused(tmp_path, tiny_tok):
    from sodkern.trainer.demo.tiny import tiny_qwen3

    with pytest.raises(ValueError, match=r"teacher's vocabulary \(300 .*student's \(" + str(len(tiny_tok))):
        SODTrainer(
            model=tiny_qwen3(tiny_tok),
            teacher_model=tiny_qwen3(300),
            reward_funcs=math_reward_func(),
            args=config(tmp_path),
            train_dataset=dataset(),
            processing_class=tiny_tok,
        )


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"weighting": "dense"}, "weighting"),
        ({"loss_type": "grpo"}, "loss_type"),
        ({"beta": 0.1}, "beta"),
    ],
)
def test_config_rejects_unsupported_settings(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **overrides)
