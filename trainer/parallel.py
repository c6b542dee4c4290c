"""Distributed setup, model loading and FSDP2 parallelisation.

- :func:`init_distributed`: the process group (NCCL on GPU, gloo on CPU) from torchrun's environment, or a
  world of one process for ``sodkern train``.
- :func:`load_causal_lm`: a HF causal LM from a local folder, with the attention implementation (flash-attn
  varlen when installed on GPU, SDPA otherwise), liger-kernel's Qwen3 patches on GPU, activation checkpointing.
- :class:`CausalLM`: the model with a fused head: ``forward`` hands the final hidden states and the lm-head
  weight to a function (``linear_logprobs``, ``sod_loss``), so no ``[T, V]`` logits exist and the head runs
  inside the FSDP root's forward, where its parameters are unsharded.
- :func:`shard`: ``fully_shard`` on every decoder layer, then the root; bf16 compute with fp32 gradient
  reduction on GPU; CPU offload for a frozen teacher.
- :func:`copy_weights`: the sharded student's weights into the rollout engine's plain copy.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, PreTrainedModel


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Initialise the default process group: from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` when set,
    else a single-process world (``sodkern train``). NCCL with one GPU per process, gloo on CPU."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, mesh)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bf16 on GPU, fp32 on CPU; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def attention_implementation(name: str, device: torch.device) -> str:
    """``"auto"``: flash-attn (varlen on packed rows) on GPU when installed, else SDPA (block-diagonal mask
    derived from the packed position ids)."""
    if name != "auto":
        if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ImportError("attn_implementation=flash_attention_2 needs flash-attn: pip install 'sodkern[gpu]'")
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(
    path: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str = "auto",
    liger: bool = True,
    activation_checkpointing: bool = False,
) -> PreTrainedModel:
    """A HF causal LM from the local folder ``path`` (on CPU; :func:`shard` moves it to ``device``).

    Args:
        dtype: parameter dtype (fp32 master weights for a trained student, bf16 for a GPU teacher).
        liger: apply liger-kernel's Qwen3 patches (RMSNorm, SwiGLU, RoPE) when on GPU and installed.
        activation_checkpointing: recompute each decoder layer in the backward pass.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path!r} (a local HF folder: config.json, weights)")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attention_implementation(attn_implementation, device)
    )
    qwen3_on_gpu = device.type == "cuda" and model.config.model_type == "qwen3"
    if liger and qwen3_on_gpu and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3

        apply_liger_kernel_to_qwen3(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model
        )
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


HeadFn = Callable[[torch.Tensor, torch.Tensor], Any]


class CausalLM(nn.Module):
    """A HF causal LM whose forward applies a fused head instead of computing logits.

    ``forward(input_ids, position_ids, head_fn)`` runs the decoder and returns
    ``head_fn(hidden [1, T, H], lm_head_weight [V, H])``. Wrapped by FSDP2 as the root, the head weight
    (and tied embedding) is unsharded for the duration of ``head_fn``, and gradients flow through it.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.base_model.layers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, head_fn: HeadFn) -> Any:
        """
        Args:
            input_ids: ``[1, T]`` int64 packed token ids.
            position_ids: ``[1, T]`` int64, restarting at 0 for each packed sequence.
            head_fn: called as ``head_fn(hidden, weight)``: ``hidden`` ``[1, T, H]`` final hidden states
                (compute dtype), ``weight`` ``[V, H]`` lm-head weight (same dtype).
        """
        out = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return head_fn(out.last_hidden_state, self.model.get_output_embeddings().weight)


def shard(
    model: CausalLM,
    mesh: DeviceMesh,
    *,
    compute_dtype: torch.dtype,
    offload: bool = False,
) -> CausalLM:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embedding, final norm, lm head).

    Args:
        compute_dtype: the dtype parameters are all-gathered in; with fp32 master weights and bf16 here,
            gradients are reduced in fp32 (MixedPrecisionPolicy).
        offload: keep the sharded parameters on CPU between uses (CPUOffloadPolicy; GPU meshes only).
    """
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    policy = CPUOffloadPolicy() if offload and mesh.device_type == "cuda" else OffloadPolicy()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=policy)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; a collective for DTensors: call on every rank."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def copy_weights(src: CausalLM, dst: PreTrainedModel) -> None:
    """Copy the (sharded) weights of ``src`` into the plain model ``dst`` of the same architecture, one
    parameter at a time (every rank gathers each, so this runs on all ranks)."""
    dst_state = dst.state_dict()
    for name, value in src.model.state_dict().items():
        if name not in dst_state:
            raise KeyError(f"copy_weights: {name} is not a parameter of the rollout model")
        dst_state[name].copy_(full_tensor(value))
