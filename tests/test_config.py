"""trainer/config.py: YAML + overrides, types, unknown keys, the validation of a combination."""

from __future__ import annotations

from pathlib import Path

import pytest

from sodkern.trainer.config import Config, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


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
    bad.eval.files, bad.algorithm, bad.rollout.max_turn_tokens = [], "sod", -1
    with pytest.raises(ValueError, match=r"rollout.max_turn_tokens=-1 must be >= 0 \(0: no cap\)"):
        bad.validate()
