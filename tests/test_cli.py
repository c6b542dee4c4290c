"""What a user of the commands sees (trainer/cli.py and the ``train`` / ``eval`` mains): one-line errors with exit
status 2, ``--debug`` / ``SODKERN_DEBUG`` tracebacks, ``--print-config``, progress lines in a log."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from sodkern.trainer.cli import UserError, configure_logging
from sodkern.trainer.cli import main as cli_main
from sodkern.trainer.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


def leaf_keys(obj, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out |= leaf_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name}
    return out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["optim.lrate=1"], "unknown key 'optim.lrate'"),
        (["data.batchsize=4"], "did you mean 'data.batch_size'?"),
        (["rollout.n=two"], "rollout.n: expected an integer, got 'two'"),
        (["algorithm=ppo"], "algorithm: expected one of"),
        (["--config", "no/such.yaml"], "no/such.yaml: config file not found"),
    ],
)
def test_config_mistakes_are_one_line_and_exit_2(args, expected, capsys, monkeypatch):
    monkeypatch.delenv("SODKERN_DEBUG", raising=False)
    assert cli_main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sodkern train: error: ") and expected in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_missing_model_folder_is_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SODKERN_DEBUG", raising=False)
    data = REPO / "tests" / "fixtures" / "verl_mixed.jsonl"
    args = ["train", f"student.path={tmp_path / 'nope'}", f"output_dir={tmp_path / 'run'}",
            f"data.train_files=[{data}]", "algorithm=grpo"]  # fmt: skip
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"student.path={tmp_path / 'nope'}: no such folder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_debug_flag_and_env_show_the_traceback(monkeypatch):
    monkeypatch.delenv("SODKERN_DEBUG", raising=False)
    with pytest.raises(UserError, match="unknown key 'optim.lrate'"):
        cli_main(["train", "--debug", "optim.lrate=1"])
    monkeypatch.setenv("SODKERN_DEBUG", "1")
    with pytest.raises(UserError, match="unknown key 'optim.lrate'"):
        cli_main(["train", "optim.lrate=1"])


def test_exit_status_and_stderr_of_a_fresh_process(capsys):
    """Through a fresh interpreter too: exit status 2 and one line on stderr, nothing else."""
    cmd = [sys.executable, "-m", "sodkern.trainer.cli", "train", "optim.lrate=1"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, cwd=REPO)
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert plain.stderr.startswith("sodkern train: error: ") and plain.stdout == ""
    assert cli_main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_print_config_lists_every_key_with_its_meaning_and_loads_back(tmp_path, capsys):
    args = ["train", "--config", str(REPO / "configs" / "tiny_rl.yaml"), "optim.lr=3e-4", "--print-config"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.strip()]
    assert all(" # " in line and line.split(" # ", 1)[1].strip() for line in lines)  # every line explained
    keys, stack = set(), []
    for line in lines:
        depth = (len(line) - len(line.lstrip())) // 2
        key = line.strip().split(":", 1)[0]
        stack[depth:] = [key]
        if not line.split(" # ", 1)[0].rstrip().endswith(":"):
            keys.add(".".join(stack))
    assert keys == leaf_keys(Config())
    (tmp_path / "printed.yaml").write_text(text)
    expected = load_config(REPO / "configs" / "tiny_rl.yaml", ["optim.lr=3e-4"])
    assert load_config(tmp_path / "printed.yaml") == expected


def test_eval_mistakes_exit_2(tmp_path, capsys, monkeypatch):
    from sodkern.trainer.eval import main as eval_main

    monkeypatch.delenv("SODKERN_DEBUG", raising=False)
    assert eval_main(["--model", str(tmp_path), "--data", "x.jsonl"]) == 2
    assert "--model" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert eval_main(["--model", str(tmp_path), "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and len(err.strip().splitlines()) == 1


def test_configure_logging_once_to_stdout(capfd):
    logger = configure_logging()
    configure_logging()
    own = [h for h in logger.handlers if type(h).__name__ == "_StdoutHandler"]
    assert len(own) == 1 and logger.level == logging.INFO
    logging.getLogger("sodkern.train").info("step 1/2  loss 0.5")
    assert "sodkern INFO step 1/2  loss 0.5" in capfd.readouterr().out
