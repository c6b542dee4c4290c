"""Trainer, rollouts, tools and rewards (installed as ``sodkern.trainer``)."""
