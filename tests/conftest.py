"""Test setup: run Triton kernels in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before Triton is imported, so it is set here, at
collection time, before any sodkern module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test once per backend by forcing SODKERN_BACKEND."""
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("SODKERN_BACKEND", request.param)
    return request.param


@pytest.fixture
def device() -> str:
    return DEVICE
