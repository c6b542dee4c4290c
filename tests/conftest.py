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


# ------------------------------------------------------------------------------------------ trainer fixtures


@pytest.fixture(scope="module")
def world():
    """A world of one process (gloo on CPU), destroyed after the module if this fixture created it."""
    import torch.distributed as dist

    from sodkern.trainer.parallel import init_distributed

    created = not dist.is_initialized()
    d = init_distributed()
    yield d
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """The folder of a tiny random Qwen3 student (config, safetensors, tokenizer)."""
    from sodkern.trainer.demo.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "student", seed=0)
