"""compute_stepwise_opd_weights equals the SOD fork's Python loop (sodkern.reference), log_info included.

Needs no verl: fork users run verl 0.5-era forks, so this runs in every environment.
"""

import math

import pytest
import torch

from sodkern.integrations.verl import compute_stepwise_opd_weights
from sodkern.reference import reference_compute_stepwise_opd_weights


def _check(old, ref, mask, **kw):
    weight_mask, log_info = compute_stepwise_opd_weights(old, ref, mask, **kw)
    want_mask, want_info = reference_compute_stepwise_opd_weights(old, ref, mask, **kw)
    assert weight_mask.dtype == torch.float32 and weight_mask.shape == mask.shape
    assert weight_mask.device == mask.device
    torch.testing.assert_close(weight_mask, want_mask, rtol=2e-6, atol=0)
    assert len(log_info) == len(want_info) == mask.shape[0]
    for got, want in zip(log_info, want_info):
        assert set(got) == set(want) == {"n_steps", "d_values", "w_values", "n_tokens_per_step", "boundaries"}
        assert got["n_steps"] == want["n_steps"] and type(got["n_steps"]) is int
        assert got["boundaries"] == want["boundaries"]
        assert all(type(x) is int for pair in got["boundaries"] for x in pair)
        assert all(type(p) is tuple for p in got["boundaries"])
        assert got["n_tokens_per_step"] == want["n_tokens_per_step"]
        assert all(type(n) is int for n in got["n_tokens_per_step"])
        for key in ("d_values", "w_values"):
            assert len(got[key]) == len(want[key]) and all(type(x) is float for x in got[key])
            for x, y in zip(got[key], want[key]):
                assert math.isclose(x, y, rel_tol=2e-6, abs_tol=1e-9), (key, got[key], want[key])
    return weight_mask, log_info


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_random_masks(seed, mask_dtype):
    g = torch.Generator().manual_seed(seed)
    B, T = 9, 67
    mask = torch.rand(B, T, generator=g) < 0.6
    old = -3 * torch.rand(B, T, generator=g)
    ref = -3 * torch.rand(B, T, generator=g)
    for delta in (0.2, 0.5, 3.0):
        _check(old, ref, mask.to(mask_dtype), epsilon=1e-6, delta=delta)


def test_edge_case_masks():
    B, T = 8, 13
    mask = torch.zeros(B, T, dtype=torch.int64)
    # row 0: no step; row 1: one step over the whole row; row 2: one step touching the last column
    mask[1] = 1
    mask[2, 9:] = 1
    mask[3, 0] = 1  # single-token steps, at both ends
    mask[3, 5] = 1
    mask[3, -1] = 1
    mask[4, ::2] = 1  # alternating
    mask[5, 2:4] = 1  # two steps, the second touching the end
    mask[5, 7:] = 1
    mask[6, :3] = 1  # identical divergences: every ratio exactly 1
    mask[6, 4:7] = 1
    mask[7, 1:12] = 1
    g = torch.Generator().manual_seed(0)
    old = -2 * torch.rand(B, T, generator=g)
    ref = -2 * torch.rand(B, T, generator=g)
    ref[6] = old[6] - 0.5
    ref[7] = old[7]  # d = 0 on one step: (0 + eps) / (0 + eps)
    weight_mask, info = _check(old, ref, mask)
    assert info[0] == {"n_steps": 0, "d_values": [], "w_values": [], "n_tokens_per_step": [], "boundaries": []}
    assert info[2]["boundaries"] == [(9, 13)] and info[2]["w_values"] == [1.0]
    assert info[6]["w_values"] == [1.0, 1.0]
    assert (weight_mask[mask == 0] == 0).all()


def test_tiny_shapes():
    for B, T in ((1, 1), (0, 5), (3, 1)):
        mask = torch.ones(B, T)
        old, ref = -torch.rand(B, T), -torch.rand(B, T)
        _check(old, ref, mask)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="ref_log_prob"):
        compute_stepwise_opd_weights(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"response_mask must be \[B, T\]"):
        compute_stepwise_opd_weights(torch.zeros(3), torch.zeros(3), torch.ones(3))
