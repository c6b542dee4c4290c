"""trainer/train.py in process (a world of one process, gloo): non-finite steps, ``sodkern train`` for SFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sodkern.trainer.config import load_config

REPO = Path(__file__).resolve().parents[1]
SFT_DATA = REPO / "tests" / "fixtures" / "sft.jsonl"


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


def test_sodkern_train_one_process(world, tiny_path, tmp_path, capfd):
    """``sodkern train`` (one process) runs SFT, saves the config, a checkpoint and a loadable HF export."""
    from transformers import AutoModelForCausalLM

    from sodkern.trainer.cli import main as cli_main

    run = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs" / "tiny_sft.yaml"), f"student.path={tiny_path}",
            f"output_dir={run}",
            f"data.train_files=[{SFT_DATA}]", "train.steps=1"]  # fmt: skip
    assert cli_main(args) == 0
    log = capfd.readouterr().out  # progress lines go to stdout as lines, terminal or not
    assert "sodkern INFO step 1/1  loss " in log and "saved checkpoint" in log and "exported the student" in log
    assert dist.is_initialized()  # the caller's process group is left alone
    assert load_config(run / "config.yaml").train.steps == 1
    (metrics,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(metrics["loss"]) and metrics["skipped"] == 0 and metrics["grad_norm"] > 0
    assert (run / "checkpoints" / "step_00000001" / "COMPLETE").exists()
    exported = AutoModelForCausalLM.from_pretrained(run / "hf").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in exported.items())
