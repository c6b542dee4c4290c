"""Padding-free batches: sequences packed into token-budget micro-batches (dynamic batch size).

Each micro-batch is one row ``[1, T]``: the sequences one after another, position ids restarting at 0 for
each (so flash-attn varlen, or SDPA with the block-diagonal causal mask transformers derives from the
position ids, keeps every sequence to itself). Position ``t`` predicts ``targets[t]``, the next token of the
same sequence; ``loss_mask[t]`` says whether that target is trained (a student / assistant token). A
sequence's last position has no target (mask 0), so a run of mask 1 never crosses two sequences.

Per-token values (rollout log-probs, advantages, ...) travel per sequence as 1-D tensors over its trained
tokens in order (``[n_i]``, ``n_i = mask.sum()``); :meth:`MicroBatch.scatter` lays them out on the packed row
and :meth:`MicroBatch.split` takes them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class MicroBatch:
    """One packed row.

    Attributes:
        input_ids: ``[1, T]`` int64 token ids.
        position_ids: ``[1, T]`` int64, restarting at 0 for each sequence.
        targets: ``[1, T]`` int64 next token of the same sequence (0 at a sequence's last position).
        loss_mask: ``[1, T]`` bool, 1 where the target is trained.
        index: the input positions of the packed sequences (empty for a padding micro-batch).
        bounds: ``(start, end)`` of each packed sequence in the row.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    index: list[int]
    bounds: list[tuple[int, int]]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def is_padding(self) -> bool:
        """A stand-in micro-batch that only keeps the ranks' collectives in step."""
        return not self.index

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.targets.to(device),
            self.loss_mask.to(device),
            self.index,
            self.bounds,
        )

    def scatter(self, values: list[torch.Tensor]) -> torch.Tensor:
        """``[1, T]`` float32 row from per-sequence values: ``values[i]`` is ``[n_i]`` for input ``index[i]``'s
        trained tokens (in order) or a scalar broadcast to them; 0 outside the mask."""
        out = torch.zeros(self.loss_mask.shape, dtype=torch.float32, device=self.loss_mask.device)
        for (a, b), v in zip(self.bounds, values):
            m = self.loss_mask[0, a:b]
            out[0, a:b][m] = v.to(out.device, torch.float32) if torch.is_tensor(v) else float(v)
        return out

    def split(self, row: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of :meth:`scatter`: ``row [1, T]`` -> per-sequence ``[n_i]`` values on trained tokens."""
        return [row[0, a:b][self.loss_mask[0, a:b]] for a, b in self.bounds]


def make_micro_batch(sequences: list[torch.Tensor], masks: list[torch.Tensor], index: list[int]) -> MicroBatch:
    """Pack ``sequences`` (each ``[L_i]`` int64) with token masks ``masks`` (each ``[L_i]`` bool, 1 on trained
    tokens: a token is trained when it is the target of the previous position) into one row."""
    ids, pos, tgt, msk, bounds = [], [], [], [], []
    start = 0
    for seq, m in zip(sequences, masks):
        n = seq.shape[0]
        if m.shape != seq.shape:
            raise ValueError(f"mask of sequence {index[len(bounds)]} has shape {tuple(m.shape)}, ids {(n,)}")
        ids.append(seq)
        pos.append(torch.arange(n, dtype=torch.long))
        tgt.append(torch.cat([seq[1:], seq.new_zeros(1)]))
        msk.append(torch.cat([m[1:].bool(), m.new_zeros(1, dtype=torch.bool)]))
        bounds.append((start, start + n))
        start += n
    if not ids:  # padding micro-batch: one token, nothing trained
        ids, pos, tgt, msk = [torch.zeros(1, dtype=torch.long)] * 3 + [torch.zeros(1, dtype=torch.bool)]
        ids, pos, tgt, msk = [ids], [pos], [tgt], [msk]
    return MicroBatch(
        torch.cat(ids)[None], torch.cat(pos)[None], torch.cat(tgt)[None], torch.cat(msk)[None], index, bounds
    )


def pack(sequences: list[torch.Tensor], masks: list[torch.Tensor], token_budget: int) -> list[MicroBatch]:
    """First-fit-decreasing packing of sequences into micro-batches of at most ``token_budget`` tokens.

    A sequence longer than the budget gets a micro-batch of its own. Deterministic (ties by input order).

    Args:
        sequences: ``[L_i]`` int64 token ids, prompt and response.
        masks: ``[L_i]`` bool/0-1, 1 on trained tokens (student- / assistant-generated).
        token_budget: tokens per micro-batch.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(sequences)), key=lambda i: (-sequences[i].shape[0], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        n = sequences[i].shape[0]
        for b, load in enumerate(loads):
            if load + n <= token_budget:
                bins[b].append(i)
                loads[b] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    return [make_micro_batch([sequences[i] for i in b], [masks[i] for i in b], b) for b in bins]


def pad_to_common_count(micro_batches: list[MicroBatch], group: dist.ProcessGroup | None = None) -> list[MicroBatch]:
    """Append padding micro-batches so every rank runs the same number of forward/backward passes (FSDP's
    collectives run per pass). A no-op without an initialised process group."""
    if not dist.is_initialized():
        return micro_batches
    count = torch.tensor([len(micro_batches)], dtype=torch.long)
    if dist.get_backend(group) == "nccl":
        count = count.cuda()
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    missing = int(count.item()) - len(micro_batches)
    return micro_batches + [make_micro_batch([], [], []) for _ in range(missing)]
