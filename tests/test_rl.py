"""trainer/rl.py: the RL loss of each algorithm on a packed micro-batch (grpo, opd, sod differ as defined)."""

from __future__ import annotations

import torch

from sodkern.reference import reference_stepwise_weights
from sodkern.trainer.config import Config
from sodkern.trainer.packing import pack


def _rl_batch():
    """Two trajectories with several steps (runs of mask 1 between tool outputs), packed in one row."""
    g = torch.Generator().manual_seed(3)
    masks = [
        torch.tensor([0] * 4 + [1] * 5 + [0] * 3 + [1] * 4 + [0] * 2 + [1] * 6, dtype=torch.bool),
        torch.tensor([0] * 3 + [1] * 3 + [0] * 2 + [1] * 7, dtype=torch.bool),
    ]
    seqs = [torch.randint(0, 50, (m.numel(),), generator=g) for m in masks]
    (mb,) = pack(seqs, masks, token_budget=128)
    old = [-torch.rand(int(m[1:].sum()), generator=g) * 3 for m in masks]
    tau = [o + torch.randn(o.shape, generator=g) for o in old]
    return mb, old, tau


def _losses(algorithm, mb, old, tau, hidden, weight, adv):
    from sodkern.trainer.rl import trajectory_losses

    cfg = Config(algorithm=algorithm)
    old_logp = mb.scatter([old[i] for i in mb.index])
    teacher_logp = mb.scatter([tau[i] for i in mb.index])
    return trajectory_losses(hidden, weight, mb=mb, old_logp=old_logp, teacher_logp=teacher_logp, advantages=adv,
                             cfg=cfg, num_tokens=float(mb.loss_mask.sum()))  # fmt: skip


def test_sod_and_opd_differ_only_in_the_weights_and_grpo_has_no_teacher_term():
    mb, old, tau = _rl_batch()
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, mb.num_tokens, 16, generator=g)
    weight = torch.randn(50, 16, generator=g)
    adv = torch.tensor([0.7, -1.3])
    out = {a: _losses(a, mb, old, tau, hidden, weight, adv)[1] for a in ("grpo", "opd", "sod")}
    for j, (i, (a, b)) in enumerate(zip(mb.index, mb.bounds)):
        m = mb.loss_mask[0, a:b]
        s, t = old_row_slice(mb, old, a, b), old_row_slice(mb, tau, a, b)
        grpo, opd, sod = (out[k][j] for k in ("grpo", "opd", "sod"))
        # identical policy part: same current log-probs in all three
        torch.testing.assert_close(sod.logp, grpo.logp)
        torch.testing.assert_close(opd.logp, grpo.logp)
        # grpo: A_t = A_grpo on every trained token, nothing from the teacher
        torch.testing.assert_close(grpo.advantages[0], torch.where(m, adv[i], 0.0))
        # opd: A_grpo + c * 1 * (tau - s); sod: A_grpo + c * w_k * (tau - s), w of this trajectory alone
        torch.testing.assert_close(opd.advantages[0] - grpo.advantages[0], torch.where(m, t - s, 0.0))
        w_ref = reference_stepwise_weights(s[None], t[None], m[None].float(), eps=1e-6, delta=0.2)[0]
        torch.testing.assert_close(sod.token_weights[0], w_ref)
        torch.testing.assert_close(sod.advantages[0] - grpo.advantages[0], torch.where(m, w_ref * (t - s), 0.0))
        assert sod.steps is not None and int(sod.steps.num_steps[0]) == (3 if i == 0 else 2)
        assert (w_ref[m] != 1).any()  # the two algorithms do differ here, through the weights only

    # grpo's loss does not depend on the teacher at all
    loss_a, _ = _losses("grpo", mb, old, tau, hidden, weight, adv)
    loss_b, _ = _losses("grpo", mb, old, [x + 5 for x in tau], hidden, weight, adv)
    assert torch.equal(loss_a, loss_b)
    # with a teacher whose per-step divergence is flat (w = 1 everywhere), sod and opd give the same loss
    flat = [o - 0.5 for o in old]
    loss_sod, _ = _losses("sod", mb, old, flat, hidden, weight, adv)
    loss_opd, _ = _losses("opd", mb, old, flat, hidden, weight, adv)
    torch.testing.assert_close(loss_sod, loss_opd)
    loss_sod, _ = _losses("sod", mb, old, tau, hidden, weight, adv)
    loss_opd, _ = _losses("opd", mb, old, tau, hidden, weight, adv)
    assert not torch.allclose(loss_sod, loss_opd)


def old_row_slice(mb, values, a, b):
    return mb.scatter([values[i] for i in mb.index])[0, a:b]
