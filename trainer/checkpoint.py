"""Checkpoints with torch.distributed.checkpoint (DCP), and the HF export of the student.

A checkpoint is ``RUN/checkpoints/step_XXXXXXXX/``: the sharded model and optimizer state (DCP, each rank
writes its shards; loadable at another world size), one ``trainer_rank{r}.pt`` per rank (step, scheduler,
data-loader position, RNG states, non-finite counter: small, per rank because RNG states are), and a
``COMPLETE`` marker written last, so a run killed mid-save never resumes from a partial checkpoint.

:func:`export_hf` writes the student as a HF folder (``config.json``, ``model.safetensors``, tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads directly: no merge step.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sodkern.trainer.parallel import CausalLM

MARKER = "COMPLETE"


class _AppState(Stateful):
    """Model and optimizer as one DCP ``Stateful`` (sharded state dicts, FQNs of the HF model)."""

    def __init__(self, model: CausalLM, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
        )


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / MARKER).exists())


def save_checkpoint(
    root: str | Path,
    step: int,
    model: CausalLM,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Save a checkpoint of ``step`` (collective: every rank calls it) and drop all but the newest ``keep``.

    Args:
        trainer_state: this rank's picklable state (scheduler, data-loader position, counters); the RNG
            states are added here.
    """
    path = checkpoint_dir(root, step)
    rank = dist.get_rank()
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a partial save of the same step (killed mid-save)
    dist.barrier()
    dcp.save({"app": _AppState(model, optimizer)}, checkpoint_id=str(path))
    torch.save({**trainer_state, "rng": rng_state()}, path / f"trainer_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (path / MARKER).write_text(f"{step}\n")
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load_checkpoint(path: str | Path, model: CausalLM, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model and optimizer (collective) and restore this rank's RNG states; returns its trainer state."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} file)")
    state_file = path / f"trainer_rank{dist.get_rank()}.pt"
    if not state_file.exists():
        raise FileNotFoundError(
            f"{state_file} is missing: the checkpoint was written by a run with fewer ranks; resume with the "
            "same number of processes"
        )
    dcp.load({"app": _AppState(model, optimizer)}, checkpoint_id=str(path))
    state = torch.load(state_file, weights_only=False)  # our own file: python/numpy RNG states are not tensors
    set_rng_state(state.pop("rng"))
    return state


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` = newest complete one under ``root`` (None if none), ``none``
    = None, else the given folder."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a complete checkpoint folder")
    return path


def export_hf(model: CausalLM, source: str, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write the student as a HF folder loadable by ``AutoModelForCausalLM.from_pretrained`` (collective).

    Args:
        model: the sharded student.
        source: the folder the student was loaded from (its config and tokenizer are reused).
        out_dir: the destination (written by rank 0).
        dtype: dtype of the saved weights (default: the source config's dtype, else fp32).
    """
    state = get_model_state_dict(model.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        config = model.model.config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(state, assign=True, strict=True)
        plain.tie_weights()
        plain.config.use_cache = True
        saved = dtype or getattr(AutoConfig.from_pretrained(source), "dtype", None) or torch.float32
        saved = getattr(torch, saved) if isinstance(saved, str) else saved
        plain.to(saved).save_pretrained(out_dir, safe_serialization=True)
        AutoTokenizer.from_pretrained(source).save_pretrained(out_dir)
        gen = Path(source) / "generation_config.json"
        if gen.exists():
            shutil.copy(gen, Path(out_dir) / "generation_config.json")
    dist.barrier()
