"""Without the [train] extra, the sodkern command says in one line which extra to install and exits 2."""

import subprocess
import sys

import pytest

from sodkern.trainer.cli import TRAIN_MODULES, main, missing_train_modules


@pytest.mark.parametrize("blocked", ["transformers", "math_verify"])
def test_missing_train_extra_is_one_line_and_exit_2(blocked):
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"  # the import system's own way to make an import fail
        "from sodkern.trainer.cli import main\n"
        "raise SystemExit(main(['train', 'config.yaml']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert blocked in lines[0] and 'pip install "sodkern[train]"' in lines[0]
    assert proc.stdout == ""


def test_with_the_extra_nothing_is_missing(capsys):
    assert "transformers" in TRAIN_MODULES
    assert missing_train_modules() == []
    assert main(["--help"]) == 0
    assert "usage: sodkern" in capsys.readouterr().out
