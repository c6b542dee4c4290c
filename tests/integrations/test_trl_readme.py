"""The README's "SOD in TRL" snippet runs as it is (tiny models, CPU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPET = re.compile(r"<!-- sod-in-trl:start -->\s*```python\n(.*?)```\s*<!-- sod-in-trl:end -->", re.S)


def test_readme_snippet_runs(tmp_path):
    match = SNIPPET.search(README.read_text())
    assert match, "README has no sod-in-trl snippet between its markers"
    code = match.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    script = tmp_path / "snippet.py"
    script.write_text(code + "\nprint('SNIPPET OK')\n")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=None
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SNIPPET OK" in proc.stdout
    assert (tmp_path / "sod-trl").is_dir()
