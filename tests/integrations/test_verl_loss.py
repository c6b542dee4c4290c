"""SOD inside verl 0.9.1: the loss the engine worker builds for the actor, against float64 SOD (README: The algorithm).

The configs come from verl's own YAML (hydra compose with the README's override lines), the micro-batches from
verl's own padding removal and micro-batch split, the loss function is ``partial(distillation_ppo_loss, ...)`` from
``verl.workers.engine_workers`` exactly as its actor builds it. Run as a script
(``python test_verl_loss.py``) it prints verl's own modes' losses and gradients as JSON: the test runs it with
``VERL_USE_EXTERNAL_PLUGINS=none`` to show verl's own losses are unchanged by the installed plugin.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
import verl  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.engine.utils import prepare_micro_batches  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.28, 3.0
COEF, DELTA, EPS = 0.7, 0.2, 1e-6
ENTROPY_COEFF = 0.01
P, R = 5, 12  # padded prompt and response widths
MICRO = 2  # ppo_micro_batch_size_per_gpu

# The README's overrides for SOD (the teacher pool lines are the test's stand-ins).
SOD_OVERRIDES = [
    "algorithm.adv_estimator=grpo",
    "distillation.enabled=true",
    "distillation.n_gpus_per_node=2",
    "distillation.nnodes=1",
    "distillation.teacher_models.teacher_model.model_path=/models/teacher",
    "distillation.distillation_loss.loss_mode=sod",
    "distillation.distillation_loss.use_task_rewards=true",
    f"distillation.distillation_loss.distillation_loss_coef={COEF}",
    "distillation.distillation_loss._target_=sodkern.integrations.verl.loss.SODDistillationLossConfig",
    f"+distillation.distillation_loss.sod_delta={DELTA}",
    f"+distillation.distillation_loss.sod_eps={EPS}",
    "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
    f"actor_rollout_ref.actor.clip_ratio_low={CLIP_LOW}",
    f"actor_rollout_ref.actor.clip_ratio_high={CLIP_HIGH}",
    f"actor_rollout_ref.actor.clip_ratio_c={CLIP_C}",
    f"actor_rollout_ref.actor.entropy_coeff={ENTROPY_COEFF}",
    f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={MICRO}",
]


def verl_configs(overrides: list[str]):
    """``(actor_config, distillation_config)`` as verl's engine worker builds them from the composed YAML."""
    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    distillation = omega_conf_to_dataclass(cfg.distillation)
    return actor, distillation


def batch(seed: int = 0):
    """A padded batch as verl's driver holds it before ``left_right_2_no_padding``, plus the float64 truth.

    Rows (response mask 0 on tool output and padding): one step; no step; a step touching the last column;
    three steps; two steps with single-token ones; a step from the first response token to the end.
    """
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [5, 3, 4, 5, 2, 5]
    resp_lens = [9, 7, 12, 12, 10, 12]
    steps = [[(0, 7)], [], [(8, 12)], [(0, 3), (5, 8), (10, 11)], [(0, 1), (4, 5), (7, 10)], [(0, 12)]]
    B = len(prompt_lens)
    attention = torch.zeros(B, P + R, dtype=torch.int64)
    mask = torch.zeros(B, R, dtype=torch.int64)
    for b in range(B):
        attention[b, P - prompt_lens[b] : P + resp_lens[b]] = 1
        for a, e in steps[b]:
            mask[b, a:e] = 1
    ids = torch.randint(1, 50, (B, P + R), generator=g) * attention
    old = (-3 * torch.rand(B, R, generator=g)) * attention[:, P:]
    tau = (old + 0.8 * torch.randn(B, R, generator=g)) * attention[:, P:]
    cur = old + 0.3 * torch.randn(B, R, generator=g)  # the current policy's log-probs
    adv_row = torch.randn(B, generator=g)
    # teacher log-probs of the whole sequence, verl's layout: position p holds log p(token p + 1)
    teacher_full = -torch.rand(B, P + R, 1, generator=g)
    teacher_full[:, P - 1 : P - 1 + R, 0] = tau
    td = TensorDict(
        {
            "prompts": ids[:, :P],
            "responses": ids[:, P:],
            "input_ids": ids,
            "attention_mask": attention,
            "position_ids": (attention.cumsum(1) - 1).clamp_min(0),
            "response_mask": mask,
            "old_log_probs": old.float(),
            "advantages": (adv_row[:, None] * mask).float(),
            "teacher_logprobs": teacher_full.float(),
            "teacher_ids": ids[:, :, None],
        },
        batch_size=[B],
    )
    truth = {"old": old.double(), "tau": tau.double(), "cur": cur.double(), "adv_row": adv_row.double()}
    truth["entropy"] = torch.rand(B, R, generator=g).double()
    truth.update(mask=mask.bool(), prompt_lens=prompt_lens, resp_lens=resp_lens, steps=steps)
    return td, truth


def micro_batches(td: TensorDict) -> list[TensorDict]:
    """What the FSDP engine hands the loss: no-padding layout, global token count, fixed-size micro-batches."""
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(
        td,
        global_batch_size=td.shape[0],
        dp_size=1,
        batch_num_tokens=int(td["loss_mask"].sum()),
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=MICRO,
        calculate_entropy=True,
    )
    mbs, _ = prepare_micro_batches(data=td, dp_group=None, same_micro_num_in_dp=True)
    return mbs


def run_verl_loss(loss_fn, td: TensorDict, truth: dict) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Sum of the loss over micro-batches, and d loss / d current log-prob and entropy of each response token."""
    total = 0.0
    grad_logp = torch.zeros(truth["cur"].shape, dtype=torch.float64)
    grad_ent = torch.zeros_like(grad_logp)
    row0 = 0
    for mb in micro_batches(td):
        offsets = mb["input_ids"].offsets()
        n = offsets[-1].item()
        logp_values = torch.randn(n).float()  # prompt positions: values the loss must ignore
        ent_values = torch.rand(n).float()
        where = []
        for j in range(mb.shape[0]):
            b = row0 + j
            start = offsets[j].item() + truth["prompt_lens"][b] - 1
            pos = torch.arange(start, start + truth["resp_lens"][b])
            logp_values[pos] = truth["cur"][b, : truth["resp_lens"][b]].float()
            ent_values[pos] = truth["entropy"][b, : truth["resp_lens"][b]].float()
            where.append((b, pos))
        logp_values.requires_grad_(True)
        ent_values.requires_grad_(True)
        model_output = {
            "log_probs": torch.nested.nested_tensor_from_jagged(logp_values, offsets),
            "entropy": torch.nested.nested_tensor_from_jagged(ent_values, offsets),
        }
        loss, metrics = loss_fn(model_output=model_output, data=mb, dp_group=None)
        loss.backward()
        total += loss.item()
        for b, pos in where:
            grad_logp[b, : len(pos)] = logp_values.grad[pos].double()
            grad_ent[b, : len(pos)] = ent_values.grad[pos].double()
        row0 += mb.shape[0]
    return total, grad_logp, grad_ent


def sod_reference(truth: dict, weighting: str, loss_agg_mode: str) -> torch.Tensor:
    """Float64 SOD loss (README: The algorithm) as a function of the current log-probs and entropy."""
    old, tau, cur, ent, m = truth["old"], truth["tau"], truth["cur"], truth["entropy"], truth["mask"]
    B, T = m.shape
    w = torch.zeros(B, T, dtype=torch.float64)
    for b, spans in enumerate(truth["steps"]):
        d = [(old[b, a:e] - tau[b, a:e]).abs().mean().item() for a, e in spans]
        for k, (a, e) in enumerate(spans):
            w[b, a:e] = 1.0 if (k == 0 or weighting == "uniform") else min((d[0] + EPS) / (d[k] + EPS), 1 + DELTA)
    adv = truth["adv_row"][:, None] * m + COEF * w * (tau - old) * m
    ratio = torch.exp(cur - old)
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
    per_token = torch.where(adv < 0, torch.minimum(clipped, -adv * CLIP_C), clipped) - ENTROPY_COEFF * ent
    per_token = per_token * m
    if loss_agg_mode == "token-mean":
        return per_token.sum() / m.sum()
    assert loss_agg_mode == "seq-mean-token-mean"
    n = m.sum(1)
    return (per_token.sum(1)[n > 0] / n[n > 0]).sum() / B


def _grads_of_reference(truth: dict, weighting: str, loss_agg_mode: str):
    t = dict(truth)
    t["cur"] = truth["cur"].clone().requires_grad_(True)
    t["entropy"] = truth["entropy"].clone().requires_grad_(True)
    loss = sod_reference(t, weighting, loss_agg_mode)
    loss.backward()
    return loss.item(), t["cur"].grad, t["entropy"].grad


def engine_loss_fn(actor_config, distillation_config):
    """The actor's loss function exactly as ``verl.workers.engine_workers`` builds it with distillation on."""
    import verl.workers.engine_workers as engine_workers

    return partial(engine_workers.distillation_ppo_loss, config=actor_config, distillation_config=distillation_config)


def test_plugin_loaded_by_import_verl():
    import verl.workers.engine_workers as engine_workers
    from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY, DISTILLATION_SETTINGS_REGISTRY

    assert getattr(engine_workers.distillation_ppo_loss, "sodkern_wrapped", False)
    for mode in ("sod", "sod_uniform"):
        assert mode in DISTILLATION_LOSS_REGISTRY and DISTILLATION_SETTINGS_REGISTRY[mode].use_estimator


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("mode", ["sod", "sod_uniform"])
def test_sod_loss_matches_float64(mode, loss_agg_mode):
    overrides = [
        *SOD_OVERRIDES,
        f"distillation.distillation_loss.loss_mode={mode}",
        f"actor_rollout_ref.actor.loss_agg_mode={loss_agg_mode}",
    ]
    actor_config, distillation_config = verl_configs(overrides)
    assert distillation_config.distillation_loss.sod_delta == DELTA
    td, truth = batch()
    loss, grad_logp, grad_ent = run_verl_loss(engine_loss_fn(actor_config, distillation_config), td, truth)
    weighting = "sod" if mode == "sod" else "uniform"
    want, want_grad_logp, want_grad_ent = _grads_of_reference(truth, weighting, loss_agg_mode)
    err = max(abs(loss - want), (grad_logp - want_grad_logp).abs().max().item())
    err = max(err, (grad_ent - want_grad_ent).abs().max().item())
    print(f"{mode} {loss_agg_mode}: loss {loss:.6f} (float64 {want:.6f}), max loss/grad difference {err:.2e}")
    assert math.isclose(loss, want, rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(grad_logp, want_grad_logp, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_ent, want_grad_ent, rtol=1e-4, atol=1e-6)
    # the weighting matters on this batch: sod and sod_uniform are different losses
    other = _grads_of_reference(truth, "uniform" if mode == "sod" else "sod", loss_agg_mode)[0]
    assert abs(other - want) > 1e-3


def readme_overrides() -> list[str]:
    """The override lines of the README's "SOD in verl" command, with its shell variables filled in."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("## SOD in verl", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.strip().rstrip("\\").strip() for line in block.splitlines()]
    lines = [line for line in lines if "=" in line and not line.startswith(("export", "python", "#"))]
    return [line.replace("$TOOL_CONFIG", "/tools.yaml").replace("$TEACHER", "/models/teacher") for line in lines]


def test_readme_overrides_build_verl_configs():
    overrides = readme_overrides()
    assert "distillation.distillation_loss.loss_mode=sod" in overrides and len(overrides) > 20
    actor_config, distillation_config = verl_configs(
        [*overrides, f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={MICRO}"]
    )
    loss_config = distillation_config.distillation_loss
    assert (loss_config.loss_mode, loss_config.sod_delta, loss_config.sod_eps) == ("sod", 0.2, 1e-6)
    assert loss_config.use_task_rewards and loss_config.loss_settings.use_estimator
    assert (actor_config.clip_ratio_low, actor_config.clip_ratio_high, actor_config.clip_ratio_c) == (0.2, 0.28, 3.0)
    assert actor_config.policy_loss.loss_mode == "vanilla" and actor_config.loss_agg_mode == "token-mean"


def test_sod_needs_task_rewards():
    overrides = [*SOD_OVERRIDES, "distillation.distillation_loss.use_task_rewards=false"]
    actor_config, distillation_config = verl_configs(overrides)
    td, truth = batch()
    with pytest.raises(ValueError, match="use_task_rewards=true"):
        run_verl_loss(engine_loss_fn(actor_config, distillation_config), td, truth)


def test_defaults_without_the_config_target():
    """Without the ``_target_`` line the SOD keys cannot be set, and the defaults (eps 1e-6, delta 0.2) apply."""
    overrides = [o for o in SOD_OVERRIDES if "_target_" not in o and "+distillation" not in o]
    actor_config, distillation_config = verl_configs(overrides)
    assert not hasattr(distillation_config.distillation_loss, "sod_delta")
    td, truth = batch()
    loss = run_verl_loss(engine_loss_fn(actor_config, distillation_config), td, truth)[0]
    assert math.isclose(loss, _grads_of_reference(truth, "sod", "token-mean")[0], rel_tol=1e-5, abs_tol=1e-6)


# verl's own modes with the plugin installed but not selected (k1 through the policy gradient, k3 supervised).
VERL_MODES = {
    "k3": ["distillation.distillation_loss.loss_mode=k3", "distillation.distillation_loss.use_policy_gradient=false"],
    "k1": ["distillation.distillation_loss.loss_mode=k1", "distillation.distillation_loss.use_policy_gradient=true"],
}


def verl_mode_numbers(mode: str) -> dict:
    base = [o for o in SOD_OVERRIDES if "distillation.distillation_loss" not in o]
    actor_config, distillation_config = verl_configs([*base, *VERL_MODES[mode]])
    td, truth = batch()
    loss, grad_logp, grad_ent = run_verl_loss(engine_loss_fn(actor_config, distillation_config), td, truth)
    return {"loss": loss, "grad_logp": grad_logp.tolist(), "grad_entropy": grad_ent.tolist()}


def test_verl_losses_unchanged_when_not_selected():
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    without = json.loads(proc.stdout.strip().splitlines()[-1])
    assert without.pop("plugin_loaded") is False
    assert sorted(without) == sorted(VERL_MODES)
    for mode, numbers in without.items():
        with_plugin = verl_mode_numbers(mode)
        assert with_plugin["loss"] == numbers["loss"], mode
        assert with_plugin["grad_logp"] == numbers["grad_logp"], mode
        assert with_plugin["grad_entropy"] == numbers["grad_entropy"], mode
        assert any(g != 0 for row in with_plugin["grad_logp"] for g in row), mode


if __name__ == "__main__":
    import verl.workers.engine_workers as _engine_workers

    numbers = {mode: verl_mode_numbers(mode) for mode in VERL_MODES}
    numbers["plugin_loaded"] = bool(getattr(_engine_workers.distillation_ppo_loss, "sodkern_wrapped", False))
    print(json.dumps(numbers))
