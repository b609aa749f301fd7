"""Triton kernels of rlhf_fast, one file per op; installed as ``rlhf_fast.kernels``."""
