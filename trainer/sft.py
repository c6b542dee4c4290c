"""Cold-start SFT on multi-turn agent trajectories: rendering with an assistant-token mask, and the loss.

A trajectory is rendered with the tokenizer's own chat template (tool schemas, assistant tool calls, tool
results), segment by segment, so that its tokens are exactly what a rollout would see: each assistant turn
is tokenised after the generation prompt of the conversation before it. The loss covers the assistant
turns, up to and including the end-of-turn token, and nothing else (prompt, tool results, turn framing).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from sodkern import linear_logprobs
from sodkern.trainer.packing import MicroBatch
from sodkern.trainer.tasks.data import SFTExample


def render_sft(
    example: SFTExample,
    tokenizer: PreTrainedTokenizerBase,
    *,
    turn_end_ids: list[int],
    max_length: int,
    where: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and trained-token mask of one trajectory.

    Args:
        example: the messages (and tool schemas).
        tokenizer: the student's tokenizer (with its chat template).
        turn_end_ids: ids that end an assistant turn in a rollout (``ChatFormat.stop_token_ids``: the turn
            end, and ``</tool_call>`` when it is one token): the mask covers an assistant segment up to and
            including the first of them, as a rollout's response mask does.
        max_length: the rendering is cut to this many tokens.
        where: names the example in errors (e.g. ``"sft.parquet row 3"``).

    Returns:
        ``(ids [L] int64, mask [L] bool)``, mask 1 on assistant tokens.
    """

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tools=example.tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    segments: list[tuple[str, bool]] = []
    done = ""
    msgs = example.messages
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix, full = render(msgs[:i], True), render(msgs[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError(
                f"{where or 'SFT example'}: the chat template does not render message {i} (assistant) as an "
                "extension of the conversation before it, so its tokens cannot be masked; use a template that "
                "renders earlier turns unchanged"
            )
        segments += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    segments.append((render(msgs, False)[len(done) :], False))

    ids: list[int] = []
    mask: list[bool] = []
    end = set(turn_end_ids)
    for text, trained in segments:
        seg = tokenizer.encode(text, add_special_tokens=False)
        cut = next((j + 1 for j, t in enumerate(seg) if t in end), len(seg)) if trained else 0
        ids += seg
        mask += [j < cut for j in range(len(seg))]
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask[1:]):
        raise ValueError(f"{where or 'SFT example'}: no assistant token within max_length={max_length} tokens")
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


def sft_loss(
    hidden: torch.Tensor, weight: torch.Tensor, mb: MicroBatch, num_tokens: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the trained targets of a packed micro-batch, over ``num_tokens``.

    Args:
        hidden: ``[1, T, H]`` final hidden states.
        weight: ``[V, H]`` lm-head weight (same dtype).
        mb: the micro-batch (targets and mask ``[1, T]``).
        num_tokens: the normaliser (trained tokens of the whole batch, per rank).

    Returns:
        ``(loss, nll_sum)``: the differentiable loss and the detached sum of token NLLs.
    """
    if mb.is_padding:  # keeps the collectives of every layer in step; contributes zero gradient
        return (hidden.sum() + weight.sum()) * 0.0, torch.zeros(())
    sel = mb.loss_mask[0]
    logp = linear_logprobs(hidden[0][sel], weight, mb.targets[0][sel])
    nll = -logp.sum()
    return nll / num_tokens, nll.detach()
