"""In-process trainer tests (a world of one process, gloo): config, packing, advantages, the RL loss of each
algorithm, SFT rendering, non-finite steps, plotting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sodkern.reference import reference_stepwise_weights
from sodkern.trainer.advantages import grpo_advantages
from sodkern.trainer.config import Config, load_config, save_config
from sodkern.trainer.packing import make_micro_batch, pack

REPO = Path(__file__).resolve().parents[1]
SFT_DATA = REPO / "tests" / "fixtures" / "sft.jsonl"


@pytest.fixture(scope="module")
def world():
    from sodkern.trainer.parallel import init_distributed

    created = not dist.is_initialized()
    d = init_distributed()
    yield d
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from sodkern.trainer.demo.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "student", seed=0)


# ------------------------------------------------------------------------------------------ config


def test_config_yaml_overrides_and_errors(tmp_path):
    cfg = load_config(
        REPO / "configs" / "sod_qwen3_1.7b.yaml", ["optim.lr=2e-6", "data.train_files=[a.parquet, b.parquet]"]
    )
    assert (cfg.algorithm, cfg.rollout.n, cfg.data.batch_size, cfg.data.mini_batch_size) == ("sod", 16, 64, 16)
    assert (cfg.loss.eps, cfg.loss.delta, cfg.loss.clip_high, cfg.loss.clip_c) == (1e-6, 0.2, 0.28, 3.0)
    assert cfg.optim.lr == 2e-6 and cfg.data.train_files == ["a.parquet", "b.parquet"]
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert [Config(algorithm=a).weighting for a in ("grpo", "opd", "sod", "opsd_gt")] == [
        "none", "uniform", "sod", "sod",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown key 'optim.lrate'"):
        load_config(None, ["optim.lrate=1"])
    with pytest.raises(ValueError, match="rollout.n: expected an integer"):
        load_config(None, ["rollout.n=two"])
    with pytest.raises(ValueError, match="algorithm: expected one of"):
        load_config(None, ["algorithm=ppo"])
    bad = load_config(None, ["student.path=x", "output_dir=y", "data.train_files=[z]", "algorithm=sod"])
    with pytest.raises(ValueError, match="teacher.path"):
        bad.validate()
    bad.teacher.path = "t"
    with pytest.raises(ValueError, match="data.batch_size=64 must be a positive multiple of the world size 3"):
        bad.validate(world_size=3)
    bad.validate()
    bad.eval.n = 0
    with pytest.raises(ValueError, match="eval.n must be >= 1"):
        bad.validate()
    bad.eval.n, bad.eval.files, bad.algorithm = 4, ["heldout.parquet"], "sft"
    with pytest.raises(ValueError, match="eval.files: held-out evaluation runs with the RL rollout engine"):
        bad.validate()


# ------------------------------------------------------------------------------------------ packing


def test_pack_budget_and_scatter_split_roundtrip():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 12, 5, 30, 9]
    seqs = [torch.randint(0, 100, (n,), generator=g) for n in lengths]
    masks = [torch.rand(n, generator=g) > 0.4 for n in lengths]
    mbs = pack(seqs, masks, token_budget=32)
    assert sorted(i for mb in mbs for i in mb.index) == list(range(len(seqs)))
    assert all(mb.num_tokens <= 32 for mb in mbs)
    for mb in mbs:
        for i, (a, b) in zip(mb.index, mb.bounds):
            assert torch.equal(mb.input_ids[0, a:b], seqs[i])
            assert torch.equal(mb.position_ids[0, a:b], torch.arange(b - a))
            assert torch.equal(mb.targets[0, a : b - 1], seqs[i][1:])
            assert torch.equal(mb.loss_mask[0, a:b], torch.cat([masks[i][1:], torch.tensor([False])]))
        values = [torch.randn(int(mb.loss_mask[0, a:b].sum()), generator=g) for a, b in mb.bounds]
        row = mb.scatter(values)
        assert (row[~mb.loss_mask] == 0).all()
        assert all(torch.equal(x, y) for x, y in zip(mb.split(row), values))


def test_packed_logprobs_match_unpacked(world, tiny_path):
    """SDPA on a packed row keeps sequences apart (block-diagonal mask from the position ids)."""
    from sodkern.ops.linear_logprobs import linear_logprobs
    from sodkern.trainer.parallel import CausalLM, load_causal_lm, shard

    model = shard(CausalLM(load_causal_lm(str(tiny_path), device=world.device, dtype=torch.float32)), world.mesh,
                  compute_dtype=torch.float32)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 500, (n,), generator=g) for n in (9, 16, 5)]
    masks = [torch.ones(n, dtype=torch.bool) for n in (9, 16, 5)]

    def logprobs(mb, position_ids):
        with torch.no_grad():
            return model(mb.input_ids, position_ids, lambda h, w: linear_logprobs(h[0], w, mb.targets[0]))

    (mb,) = pack(seqs, masks, token_budget=64)
    packed = mb.split(logprobs(mb, mb.position_ids)[None])
    alone = [logprobs(one, one.position_ids)[one.loss_mask[0]] for one in (make_micro_batch([s], [m], [0])
             for s, m in zip(seqs, masks))]  # fmt: skip
    for i, lp in zip(mb.index, packed):
        torch.testing.assert_close(lp, alone[i], rtol=1e-5, atol=1e-5)
    # negative control: one running position sequence lets later sequences attend to earlier ones
    leaked = mb.split(logprobs(mb, torch.arange(mb.num_tokens)[None])[None])
    assert any(not torch.allclose(lp, alone[i], atol=1e-3) for i, lp in zip(mb.index[1:], leaked[1:]))


# ------------------------------------------------------------------------------------------ advantages


def test_grpo_advantages():
    r = torch.tensor([1.0, -1.0, -1.0, 0.5, 0.3, 0.3])
    adv = grpo_advantages(r, ["a", "a", "a", "b", "c", "c"])
    # hand-computed: mean -1/3, unbiased std sqrt(4/3)
    expected = torch.tensor([4 / 3, -2 / 3, -2 / 3]) / (math.sqrt(4 / 3) + 1e-6)
    torch.testing.assert_close(adv[:3], expected)
    assert adv[3].item() == pytest.approx(0.5 / (1 + 1e-6))  # a group of one: mean 0, std 1
    torch.testing.assert_close(adv[4:], torch.zeros(2))  # equal rewards: no signal
    with pytest.raises(ValueError, match="rewards must be"):
        grpo_advantages(r, ["a"])


# ------------------------------------------------------------------------------------------ the RL loss


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
    old_row = mb.scatter([old[i] for i in mb.index])
    tau_row = mb.scatter([tau[i] for i in mb.index])
    return trajectory_losses(hidden, weight, mb=mb, old_row=old_row, tau_row=tau_row, adv=adv, cfg=cfg,
                             num_tokens=float(mb.loss_mask.sum()))  # fmt: skip


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


# ------------------------------------------------------------------------------------------ SFT, non-finite


def test_sft_rendering_masks_assistant_turns_only(tiny_path):
    from transformers import AutoTokenizer

    from sodkern.trainer.rollout.chat import ChatFormat
    from sodkern.trainer.sft import render_sft
    from sodkern.trainer.tasks.data import load_sft

    tok = AutoTokenizer.from_pretrained(tiny_path)
    chat = ChatFormat(tok)
    ex = load_sft(SFT_DATA)[0]
    ids, mask = render_sft(ex, tok, turn_end_ids=chat.stop_token_ids, max_length=4096)
    full = tok.apply_chat_template(ex.messages, tools=ex.tools, tokenize=False)
    assert tok.decode(ids) == full
    trained = tok.decode(ids[mask])
    assert "Let me compute it." in trained and "So the answer is \\boxed{1048576}." in trained
    assert "What is 2**20?" not in trained and "1048576\n</tool_response>" not in trained
    assert "code_interpreter" in trained  # the tool call is the model's own output
    assert int((ids[mask] == tok.convert_tokens_to_ids("<tool_call>")).sum()) == 1


def test_non_finite_updates_are_skipped_then_stop(world, tiny_path, tmp_path):
    from sodkern.trainer.train import NonFiniteError, Trainer

    overrides = [f"student.path={tiny_path}", f"output_dir={tmp_path}", f"data.train_files=[{SFT_DATA}]",
                 "data.batch_size=1", "train.max_nonfinite_in_row=2", "checkpoint.every=0"]  # fmt: skip
    cfg = load_config(REPO / "configs" / "tiny_sft.yaml", overrides)
    trainer = Trainer(cfg, world)
    params = list(trainer.model.parameters())
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad.fill_(float("nan"))
    applied, norm = trainer.optimizer_step(torch.tensor(1.0))
    assert not applied and math.isnan(norm) and trainer.nonfinite_in_row == 1
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before)) and not trainer.optimizer.state
    applied, _ = trainer.optimizer_step(torch.tensor(float("inf")))  # a non-finite loss, no gradient at all
    assert not applied and trainer.nonfinite_in_row == 2
    trainer.nonfinite_in_row = 0

    with torch.no_grad():  # a NaN weight makes every loss NaN: skipped steps, then a stop; no checkpoint
        trainer.model.model.get_input_embeddings().weight.fill_(float("nan"))
    from sodkern.trainer.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        trainer.fit(logger)
    logger.close()
    assert not trainer.optimizer.state  # never stepped
    assert all(torch.equal(p.detach(), q) for p, q in list(zip(params, before))[1:])
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "hf").exists()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in logged] == [1.0, 1.0]


# ------------------------------------------------------------------------------------------ plot


def test_plot_patterns_and_curves(tmp_path):
    from sodkern.trainer.plot import classify_pattern, main, pick_examples

    assert classify_pattern([1.0, 1.05, 0.95, 1.1])[0] == "stable"
    assert classify_pattern([1.0, 0.6, 0.3, 0.25])[0] == "erroneous"
    assert classify_pattern([1.0, 0.4, 0.5, 1.1])[0] == "recovery"
    assert classify_pattern([1.0])[0] is None
    records = [
        {"step": 1, "uid": u, "sample": 0, "steps": [{"k": k + 1, "d": 0.1 / w, "w": w, "tokens": 5,
                                                      "span": [k * 8, k * 8 + 5]} for k, w in enumerate(ws)]}
        for u, ws in (("s", [1.0, 1.0, 0.9]), ("e", [1.0, 0.5, 0.2]), ("r", [1.0, 0.3, 1.2]))
    ]  # fmt: skip
    assert {p: r["uid"] for p, r in pick_examples(records).items()} == {
        "stable": "s",
        "erroneous": "e",
        "recovery": "r",
    }
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = [{"step": s, "loss": 1.0 / s, "reward/mean": -1 + 0.1 * s, "mean_w": 0.9} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    assert main([str(tmp_path)]) == 0
    for name in ("curves.png", "step_patterns.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_sodkern_train_one_process(world, tiny_path, tmp_path):
    """``sodkern train`` (one process) runs SFT, saves the config, a checkpoint and a loadable HF export."""
    from transformers import AutoModelForCausalLM

    from sodkern.trainer.cli import main as cli_main

    run = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs" / "tiny_sft.yaml"), f"student.path={tiny_path}",
            f"output_dir={run}",
            f"data.train_files=[{SFT_DATA}]", "train.steps=1"]  # fmt: skip
    assert cli_main(args) == 0
    assert dist.is_initialized()  # the caller's process group is left alone
    assert load_config(run / "config.yaml").train.steps == 1
    (metrics,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(metrics["loss"]) and metrics["skipped"] == 0 and metrics["grad_norm"] > 0
    assert (run / "checkpoints" / "step_00000001" / "COMPLETE").exists()
    exported = AutoModelForCausalLM.from_pretrained(run / "hf").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in exported.items())
