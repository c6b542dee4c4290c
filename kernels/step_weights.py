"""Triton kernels for SOD step weights: segmented per-step reductions over padded ``[B, T]`` rows.

A *step* is a maximal run of ``mask != 0`` tokens in a row. Three passes, one program per row, each sweeping
the row in blocks of ``BLOCK_T`` tokens with carries between blocks:

1. ``_count_steps_kernel``   reads the mask, writes the number of steps per row (``K`` = max over rows is
                              needed on the host to size the ``[B, K]`` outputs).
2. ``_step_sums_kernel``     reads student/teacher log-probs and the mask, and writes, for each step, the sum of
                              ``|s - tau|`` (a segmented scan, so each step is summed on its own, never as a
                              difference of long prefix sums) and the token count, at the step's last token.
3. ``_token_weights_kernel`` reads the mask and the ``[B, K]`` step weights, writes the per-token weights.

Bytes moved per token: 1 (mask) + 9 (s, tau, mask) + 5 (mask, weight out) with a bool mask; the tiny
``[B, K]`` arithmetic between passes 2 and 3 is done by the caller in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segsum_combine(flag_a, sum_a, flag_b, sum_b):
    # (flag, value) pairs: a set flag in the right operand starts a new segment.
    return flag_a | flag_b, tl.where(flag_b != 0, sum_b, sum_a + sum_b)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _load_mask(mask_row, t, T):
    """Mask values at positions ``t`` (int64 vector) as int32 0/1; 0 outside [0, T)."""
    inside = (t >= 0) & (t < T)
    m = tl.load(mask_row + t, mask=inside, other=0)
    return (m != 0).to(tl.int32)


@triton.jit
def _count_steps_kernel(mask_ptr, num_steps_ptr, T, stride_mb, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    mask_row = mask_ptr + row * stride_mb
    lanes = tl.arange(0, BLOCK_T).to(tl.int64)
    count = tl.zeros((), dtype=tl.int64)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + lanes
        m = _load_mask(mask_row, t, T)
        prev = _load_mask(mask_row, t - 1, T)
        count += tl.sum((m & (1 - prev)).to(tl.int64), axis=0)
    tl.store(num_steps_ptr + row, count)


@triton.jit
def _step_sums_kernel(
    s_ptr,
    tau_ptr,
    mask_ptr,
    sums_ptr,
    counts_ptr,
    T,
    K,
    stride_sb,
    stride_tb,
    stride_mb,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    mask_row = mask_ptr + row * stride_mb
    lanes = tl.arange(0, BLOCK_T).to(tl.int64)
    steps_before = tl.zeros((), dtype=tl.int64)  # steps started in earlier blocks
    carry_sum = tl.zeros((), dtype=tl.float32)  # running sum of the step open at the block boundary
    carry_start = tl.full((), -1, dtype=tl.int64)  # first token of that step
    for t0 in range(0, T, BLOCK_T):
        t = t0 + lanes
        inside = t < T
        m = _load_mask(mask_row, t, T)
        prev = _load_mask(mask_row, t - 1, T)
        nxt = _load_mask(mask_row, t + 1, T)
        start = m & (1 - prev)
        end = m & (1 - nxt)
        s = tl.load(s_ptr + row * stride_sb + t, mask=inside, other=0.0).to(tl.float32)
        tau = tl.load(tau_ptr + row * stride_tb + t, mask=inside, other=0.0).to(tl.float32)
        # tl.where, not a product with the mask: log-probs outside the mask may be non-finite.
        x = tl.where(m != 0, tl.abs(s - tau), 0.0)
        # continue the step left open by the previous block (unless lane 0 starts a new one)
        x = tl.where((lanes == 0) & (start == 0), x + carry_sum, x)
        _, seg_sum = tl.associative_scan((start, x), 0, _segsum_combine)
        step_start = tl.associative_scan(tl.where(start != 0, t, carry_start), 0, _max_combine)
        step_id = steps_before + tl.cumsum(start, 0).to(tl.int64) - 1
        out = row * K + step_id
        is_end = (end != 0) & inside
        tl.store(sums_ptr + out, seg_sum, mask=is_end)
        tl.store(counts_ptr + out, (t - step_start + 1).to(tl.float32), mask=is_end)
        last = lanes == BLOCK_T - 1
        carry_sum = tl.sum(tl.where(last, seg_sum, 0.0), axis=0)
        carry_start = tl.max(tl.where(last, step_start, -1), axis=0)
        steps_before += tl.sum(start.to(tl.int64), axis=0)


@triton.jit
def _token_weights_kernel(mask_ptr, step_w_ptr, out_ptr, T, K, stride_mb, stride_ob, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    mask_row = mask_ptr + row * stride_mb
    lanes = tl.arange(0, BLOCK_T).to(tl.int64)
    steps_before = tl.zeros((), dtype=tl.int64)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + lanes
        inside = t < T
        m = _load_mask(mask_row, t, T)
        prev = _load_mask(mask_row, t - 1, T)
        start = m & (1 - prev)
        step_id = steps_before + tl.cumsum(start, 0).to(tl.int64) - 1
        w = tl.load(step_w_ptr + row * K + step_id, mask=(m != 0) & inside, other=0.0)
        tl.store(out_ptr + row * stride_ob + t, w, mask=inside)
        steps_before += tl.sum(start.to(tl.int64), axis=0)


def _block_t(T: int, interpret: bool) -> int:
    if interpret:
        return 32  # small blocks keep the interpreter fast and exercise the carries in tests
    return max(128, min(2048, triton.next_power_of_2(T)))


def count_steps(mask: torch.Tensor, *, interpret: bool = False) -> torch.Tensor:
    """Number of steps per row.

    Args:
        mask: ``[B, T]`` any dtype, values 0/1, last dim contiguous.
    Returns:
        ``[B]`` int64.
    """
    B, T = mask.shape
    num_steps = torch.empty(B, dtype=torch.int64, device=mask.device)
    if B == 0:
        return num_steps
    _count_steps_kernel[(B,)](mask, num_steps, T, mask.stride(0), BLOCK_T=_block_t(T, interpret))
    return num_steps


def step_sums(
    old_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor, K: int, *, interpret: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step sums of ``|s - tau|`` and token counts.

    Args:
        old_logp: ``[B, T]`` float (any float dtype), last dim contiguous.
        teacher_logp: ``[B, T]`` float, last dim contiguous.
        mask: ``[B, T]`` any dtype, values 0/1, last dim contiguous.
        K: number of step slots (>= the largest step count of any row).
    Returns:
        ``(sums, counts)``, both ``[B, K]`` float32; slots beyond a row's step count hold 0.
    """
    B, T = mask.shape
    sums = torch.zeros(B, K, dtype=torch.float32, device=mask.device)
    counts = torch.zeros(B, K, dtype=torch.float32, device=mask.device)
    if B == 0 or K == 0:
        return sums, counts
    _step_sums_kernel[(B,)](
        old_logp,
        teacher_logp,
        mask,
        sums,
        counts,
        T,
        K,
        old_logp.stride(0),
        teacher_logp.stride(0),
        mask.stride(0),
        BLOCK_T=_block_t(T, interpret),
    )
    return sums, counts


def token_weights(mask: torch.Tensor, step_weights: torch.Tensor, *, interpret: bool = False) -> torch.Tensor:
    """Scatter step weights onto their tokens.

    Args:
        mask: ``[B, T]`` any dtype, values 0/1, last dim contiguous.
        step_weights: ``[B, K]`` float32, contiguous; only slots below each row's step count are read.
    Returns:
        ``[B, T]`` float32, 0 where the mask is 0.
    """
    B, T = mask.shape
    K = step_weights.shape[1]
    out = torch.empty(B, T, dtype=torch.float32, device=mask.device)
    if B == 0 or K == 0:
        return out.zero_()
    _token_weights_kernel[(B,)](
        mask, step_weights, out, T, K, mask.stride(0), out.stride(0), BLOCK_T=_block_t(T, interpret)
    )
    return out
