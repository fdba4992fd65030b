"""Triton kernels of the learner's hot path and their PyTorch reference twins."""
