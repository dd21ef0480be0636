"""Triton kernels (imported lazily: Triton is only needed for the fast path)."""
