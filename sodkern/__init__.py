"""sodkern: fused kernels for SOD (step-wise on-policy distillation)."""
__version__ = "0.1.0"
