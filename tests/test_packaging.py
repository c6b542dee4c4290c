"""The wheel maps kernels/ -> sodkern.kernels and trainer/ -> sodkern.trainer, and installs no top-level `kernels`."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_exposes_subpackages():
    import sodkern.kernels
    import sodkern.kernels.step_weights
    import sodkern.trainer

    assert Path(sodkern.kernels.__file__).parent.name == "kernels"
    assert hasattr(sodkern.kernels.step_weights, "step_sums")
    assert sodkern.trainer.__name__ == "sodkern.trainer"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("scikit_build_core")
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = out.glob("sodkern-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "sodkern/__init__.py" in names
    assert "sodkern/kernels/step_weights.py" in names
    assert "sodkern/trainer/cli.py" in names
    top_level = {n.split("/")[0] for n in names}
    assert "kernels" not in top_level and "trainer" not in top_level, sorted(top_level)
    assert not any("__pycache__" in n for n in names)
    assert "sodkern/trainer/sandbox/sodkern-sandbox" in names  # the native launcher built by CMakeLists.txt
    assert not any(n.endswith((".c", ".h")) for n in names)
