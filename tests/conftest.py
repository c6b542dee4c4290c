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


@pytest.fixture(params=["torch", "tiled", "chunked", "chunked-torch-fold"])
def backend(request, monkeypatch):
    """Run a test once per strategy by forcing SODKERN_BACKEND.

    ``chunked`` runs the Triton fold kernels (in the interpreter on CPU), ``chunked-torch-fold`` the same loop
    with its torch folds (what ``chunked`` does where Triton cannot run). Both use tiles small enough that
    the test sizes span several ragged token and vocabulary tiles.
    """
    if request.param in ("tiled", "chunked"):
        pytest.importorskip("triton")
    if request.param.startswith("chunked"):
        import sodkern.ops._chunked as chunked

        monkeypatch.setattr(chunked, "TOKEN_TILE", {})
        monkeypatch.setattr(chunked, "TOKEN_TILE_DEFAULT", 16)
        monkeypatch.setattr(chunked, "VOCAB_TILE", 128)
        monkeypatch.setattr(chunked, "FUSED_TILE_ELEMENTS", {})
        monkeypatch.setattr(chunked, "FUSED_TILE_ELEMENTS_DEFAULT", 2000)
        if request.param == "chunked-torch-fold":
            monkeypatch.setattr(chunked, "triton_usable", lambda *tensors: False)
    monkeypatch.setenv("SODKERN_BACKEND", request.param.removesuffix("-torch-fold"))
    return request.param


@pytest.fixture
def device() -> str:
    return DEVICE
