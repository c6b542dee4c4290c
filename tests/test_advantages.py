"""trainer/advantages.py: GRPO group-normalised advantages."""

from __future__ import annotations

import math

import pytest
import torch

from sodkern.trainer.advantages import grpo_advantages


def test_grpo_advantages():
    r = torch.tensor([1.0, -1.0, -1.0, 0.5, 0.3, 0.3])
    adv = grpo_advantages(r, ["a", "a", "a", "b", "c", "c"])
    # hand-computed: mean -1/3, unbiased std sqrt(4/3)
    expected = torch.tensor([4 / 3, -2 / 3, -2 / 3]) / (math.sqrt(4 / 3) + 1e-6)
    torch.testing.assert_close(adv[:3], expected)
    assert adv[3].item() == pytest.approx(0.5 / (1 + 1e-6))  # a group of one: mean 0, std 1
    torch.testing.assert_close(adv[4:], torch.zeros(2))  # equal rewards: no signal
    with pytest.raises(ValueError, match="rewards must be"):
        grpo_advantages(r, ["a"])
