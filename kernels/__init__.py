"""Triton kernels of sodkern (installed as ``sodkern.kernels``)."""
