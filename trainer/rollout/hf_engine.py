"""The Hugging Face ``transformers`` generation engine: ``model.generate`` with its KV cache (the CPU default)."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from sodkern.trainer.rollout.loop import Completion, SamplingParams


class _LogprobRecorder(LogitsProcessor):
    """Records ``log_softmax(scores / temperature)`` of each sampled token, one step late.

    Called with the scores of step t and the ids up to step t - 1, it gathers the log-prob of the token
    sampled at step t - 1 from the distribution it kept, so only one ``[batch, vocab]`` distribution is held.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.last: torch.Tensor | None = None  # [B, V] fp32 log-probs of the latest step
        self.steps: list[torch.Tensor] = []  # per step, [B] fp32 log-prob of the sampled id

    def gather(self, ids: torch.Tensor) -> None:
        if self.last is not None:
            self.steps.append(self.last.gather(1, ids[:, None].to(self.last.device))[:, 0])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.gather(input_ids[:, -1])
        self.last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores


class HFEngine:
    """:class:`GenerationEngine` on a Hugging Face causal LM: ``model.generate`` with its KV cache.

    Prompts are sorted by length and generated in left-padded batches of at most ``max_batch_size``. Every
    sampling setting not in :class:`SamplingParams` is neutral (no repetition penalty, no min-p), whatever
    the model's ``generation_config`` says. Sampling uses the global torch RNG (``torch.manual_seed``).

    Args:
        model: the causal LM (in eval mode, on its device).
        pad_token_id: the id used for left padding (masked out).
        max_batch_size: prompts per ``model.generate`` call.
    """

    def __init__(self, model: PreTrainedModel, *, pad_token_id: int, max_batch_size: int = 64) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        order = sorted(range(len(prompt_token_ids)), key=lambda i: -len(prompt_token_ids[i]))
        out: list[Completion | None] = [None] * len(prompt_token_ids)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            for i, c in zip(chunk, self._generate_batch([prompt_token_ids[i] for i in chunk], params)):
                out[i] = c
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        device = self.model.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[row, width - len(p) :] = 1
        greedy = params.temperature <= 0
        recorder = _LogprobRecorder(1.0 if greedy else params.temperature)
        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": max(params.top_k, 0)}
        config = GenerationConfig(
            max_new_tokens=params.max_tokens,
            do_sample=not greedy,
            **({} if greedy else {**sampling, "min_p": 0.0}),
            repetition_penalty=1.0,
            eos_token_id=list(params.stop_token_ids) or None,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
        )
        result = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
        )
        new = result.sequences[:, width:]
        recorder.gather(new[:, -1])
        logprobs = torch.stack(recorder.steps, dim=1).cpu()  # [B, T]
        stops = set(params.stop_token_ids)
        completions = []
        for row in range(len(prompts)):
            ids = new[row].tolist()
            end = next((t + 1 for t, tok in enumerate(ids) if tok in stops), None)
            if end is None:
                completions.append(Completion(ids, logprobs[row].tolist(), "length"))
            else:
                completions.append(Completion(ids[:end], logprobs[row, :end].tolist(), "stop"))
        return completions
