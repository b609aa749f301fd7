"""rlhf_fast: fused RLHF loss kernels (Triton, CUDA C++, host C++) with a PyTorch reference.

Importing the package has no side effects beyond registering the ``rlhf_fast::`` torch.library ops;
the compiled extension and Triton are loaded on first use.
"""

from . import nn, reference
from .backends import BackendUnavailable, explain, use_backend
from .ops import sft_loss, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "explain",
    "nn",
    "reference",
    "sft_loss",
    "token_logprobs",
    "use_backend",
]
